"""How collected results compare with the paper's figures, and the paper's model selection."""

from __future__ import annotations

from gmoe_bench.engine.run import LOWER_IS_BETTER
from gmoe_bench.reports.paper_figures import PAPER_SEEDS, family, paper_figure
from gmoe_bench.reports.stats import LEVEL
from gmoe_bench.reports.table import ConfigResult


def comparison_table(results: list[ConfigResult]) -> str:
    """Ours next to the paper's figure of the same model family: the difference, our 95% interval
    of the test mean (t over seeds), and whether the paper's mean lies inside it."""
    header = ["model", "dataset", "seeds", "epochs", "ours (test)", f"ours, {LEVEL:.0%} interval",
              "paper", "ours − paper", "paper inside our interval"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        paper = paper_figure(r)
        if paper is None:
            continue
        mean, std = (100 * v for v in r.mean_std("test"))
        ci = r.interval("test").scaled(100)
        epochs = "/".join(str(n) for n in sorted({len(s["epochs"]) for s in r.seeds}))
        # one seed has no interval to compare with
        inside = "yes" if ci.contains(paper[0]) else "no" if ci.defined else "n/a"
        interval = f"[{ci.low:.2f}, {ci.high:.2f}]" if ci.defined else "n/a"
        name = family(r) if r.label == r.config["model"]["backbone"] else f"{family(r)} ({r.label})"
        lines.append("| " + " | ".join([
            name, r.dataset, str(len(r.seeds)), epochs,
            f"{mean:.2f} ± {std:.2f}", interval, f"{paper[0]:.2f} ± {paper[1]:.2f}",
            f"{mean - paper[0]:+.2f}", inside]) + " |")
    return "\n".join(lines) + "\n"


def best_per_backbone(results: list[ConfigResult]) -> dict[tuple[str, str], ConfigResult]:
    """Per (dataset, backbone) with at least two GMoE configurations to choose from, the one with
    the best mean validation metric: the paper's model selection."""
    candidates: dict[tuple[str, str], list[ConfigResult]] = {}
    for r in results:
        if r.is_gmoe:
            candidates.setdefault((r.dataset, r.config["model"]["backbone"]), []).append(r)
    return {key: (min if rs[0].metric in LOWER_IS_BETTER else max)(
                rs, key=lambda r: r.mean_std("valid")[0])
            for key, rs in candidates.items() if len(rs) > 1}


def selected_overrides(result: ConfigResult) -> str:
    """The command-line overrides that, after ``+experiment=paper_selected``, re-run ``result``."""
    moe = result.config["moe"]
    return (f"dataset={result.dataset} model={result.config['model']['backbone']} "
            f"moe.num_experts={moe['num_experts']} moe.num_hop2={moe['num_hop2']} "
            f"moe.top_k={moe['top_k']} moe.loss_weight={moe['loss_weight']}")


def selection(results: list[ConfigResult]) -> str:
    """The configurations chosen by ``best_per_backbone``, with the command that runs them with the
    paper's 10 seeds where they have fewer."""
    lines = []
    for (dataset, backbone), r in sorted(best_per_backbone(results).items()):
        valid = r.mean_std("valid")
        seeds = f"{len(r.seeds)} seed{'s' * (len(r.seeds) != 1)}"
        scale = 100 if r.metric == "rocauc" else 1
        lines.append(f"- {dataset} GMoE-{backbone.upper()}: {r.label} (validation "
                     f"{valid[0] * scale:.2f} ± {valid[1] * scale:.2f}, {seeds})")
        if len(r.seeds) < PAPER_SEEDS:
            lines[-1] += f"; to run it with the paper's {PAPER_SEEDS} seeds:"
            lines.append(f"  `gmoe-train +experiment=paper_selected {selected_overrides(r)}`")
        else:
            lines[-1] += f", already run with the paper's {PAPER_SEEDS} seeds"
    return "\n".join(lines) + "\n" if lines else ""
