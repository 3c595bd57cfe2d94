"""How collected results compare with the paper's figures, and the paper's model selection."""

from __future__ import annotations

import re
import shlex
from typing import Any

from hydra import compose, initialize_config_dir

from gmoe_bench import output_dirs
from gmoe_bench.config import CONFIG_DIR, as_dict, is_execution_key, validate
from gmoe_bench.records import display_scale, flatten, higher_is_better
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
        scale = display_scale(r.metric)  # the paper's figures are ROC-AUC × 100
        mean, std = (scale * v for v in r.mean_std("test"))
        ci = r.interval("test").scaled(scale)
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


def best_on_validation(results: list[ConfigResult]) -> ConfigResult:
    """The result with the best mean validation metric (the highest, or the lowest for errors such
    as RMSE): the paper's model selection."""
    pick = max if higher_is_better(results[0].metric) else min
    return pick(results, key=lambda r: r.mean_std("valid")[0])


def best_per_backbone(results: list[ConfigResult]) -> dict[tuple[str, str], ConfigResult]:
    """Per (dataset, backbone) with at least two GMoE configurations to choose from, the one with
    the best mean validation metric."""
    candidates: dict[tuple[str, str], list[ConfigResult]] = {}
    for r in results:
        if r.is_gmoe:
            candidates.setdefault((r.dataset, r.config["model"]["backbone"]), []).append(r)
    return {key: best_on_validation(rs) for key, rs in candidates.items() if len(rs) > 1}


# What the selected configuration is re-run with: the paper's 10 seeds (configs/experiment/).
SELECTED_EXPERIMENT = "+experiment=paper_selected"


def _override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (a string that would parse as another type is quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str) and (not re.fullmatch(r"[A-Za-z_][\w./:-]*", value)
                                   or value.lower() in ("true", "false", "null", "nan", "inf")):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def selected_overrides(result: ConfigResult) -> str:
    """The overrides that, after ``+experiment=paper_selected``, compose ``result``'s own config:
    every key whose value in the job differs from what that experiment composes to, so the command
    trains the same model (same config identity, so the search's finished seeds are reused), not a
    rebuilt approximation. Execution keys (seeds, device, data folders, W&B) are left to the user."""
    output_dirs.register()  # the resolvers the Hydra configs name
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = flatten(as_dict(validate(compose("train", overrides=[SELECTED_EXPERIMENT]))))
    own = flatten(as_dict(validate(result.config)))  # keys added since the run: their defaults
    changed = [f"{key}={_override_value(value)}" for key, value in own.items()
               if base[key] != value and not is_execution_key(key)]
    return " ".join(shlex.quote(override) for override in changed)


def selection(results: list[ConfigResult]) -> str:
    """The configurations chosen by ``best_per_backbone``, with the command that runs them with the
    paper's 10 seeds where they have fewer."""
    lines = []
    for (dataset, backbone), r in sorted(best_per_backbone(results).items()):
        valid = r.mean_std("valid")
        seeds = f"{len(r.seeds)} seed{'s' * (len(r.seeds) != 1)}"
        scale = display_scale(r.metric)
        lines.append(f"- {dataset} GMoE-{backbone.upper()}: {r.label} (validation "
                     f"{valid[0] * scale:.2f} ± {valid[1] * scale:.2f}, {seeds})")
        if len(r.seeds) < PAPER_SEEDS:
            lines[-1] += f"; to run it with the paper's {PAPER_SEEDS} seeds:"
            lines.append(f"  `gmoe-train {SELECTED_EXPERIMENT} {selected_overrides(r)}`")
        else:
            lines[-1] += f", already run with the paper's {PAPER_SEEDS} seeds"
    return "\n".join(lines) + "\n" if lines else ""
