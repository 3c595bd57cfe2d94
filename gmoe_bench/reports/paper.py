"""How collected results compare with the paper's figures, and the paper's model selection."""

from __future__ import annotations

import re
import shlex
from typing import Any

from hydra import compose, initialize_config_dir

from gmoe_bench import output_dirs
from gmoe_bench.config import (
    CONFIG_DIR,
    as_dict,
    computing_execution_keys,
    is_execution_key,
    validate,
)
from gmoe_bench.records import display_scale, flatten, higher_is_better, mean_std_text
from gmoe_bench.reports.paper_figures import PAPER_EPOCHS, PAPER_SEEDS, family, paper_figure
from gmoe_bench.reports.stats import LEVEL, difference_interval
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
            mean_std_text(mean, std, len(r.seeds)), interval, f"{paper[0]:.2f} ± {paper[1]:.2f}",
            f"{mean - paper[0]:+.2f}", inside]) + " |")
    return "\n".join(lines) + "\n"


def candidates_per_backbone(results: list[ConfigResult]) -> dict[tuple[str, str], list[ConfigResult]]:
    """Per (dataset, backbone) with at least two GMoE configurations to choose from, those
    configurations, the best on validation first."""
    candidates: dict[tuple[str, str], list[ConfigResult]] = {}
    for r in results:
        if r.is_gmoe:
            candidates.setdefault((r.dataset, r.config["model"]["backbone"]), []).append(r)
    return {key: ranked_on_validation(rs) for key, rs in candidates.items() if len(rs) > 1}


def ranked_on_validation(results: list[ConfigResult]) -> list[ConfigResult]:
    """Best mean validation metric first (the highest, or the lowest for errors such as RMSE)."""
    return sorted(results, key=lambda r: r.mean_std("valid")[0],
                  reverse=higher_is_better(results[0].metric))


def best_on_validation(results: list[ConfigResult]) -> ConfigResult:
    """The result with the best mean validation metric: the paper's model selection."""
    return ranked_on_validation(results)[0]


def lead_over_runner_up(ranked: list[ConfigResult]) -> str:
    """How far the chosen configuration (``ranked[0]``) leads the next on validation, in the
    metric's display units (> 0: better), with Welch's interval over seeds and what it says."""
    chosen, runner_up = ranked[0], ranked[1]
    sign = 1.0 if higher_is_better(chosen.metric) else -1.0
    lead = difference_interval(sign * chosen.values("valid"),
                               sign * runner_up.values("valid")).scaled(display_scale(chosen.metric))
    if not lead.defined:
        verdict = "no interval (a single seed, or no spread)"
    elif lead.excludes_zero:
        verdict = f"[{lead.low:+.2f}, {lead.high:+.2f}], beyond noise"
    else:
        verdict = (f"[{lead.low:+.2f}, {lead.high:+.2f}], within noise: the search does not "
                   "separate them")
    return f"lead over {runner_up.label} {lead.estimate:+.2f} on validation, {verdict}"


def seed_count(result: ConfigResult) -> str:
    """'1 seed', '3 seeds'."""
    return f"{len(result.seeds)} seed{'s' * (len(result.seeds) != 1)}"


def shortened_search(chosen: ConfigResult) -> str | None:
    """A note when the chosen configuration ran fewer epochs than the paper's protocol (a shortened
    search), whose overrides therefore carry that number, else None."""
    epochs = chosen.config["trainer"]["epochs"]
    if epochs >= PAPER_EPOCHS:
        return None
    return (f"the search ran {epochs} epochs and these overrides keep them; add "
            f"trainer.epochs={PAPER_EPOCHS} after them for the paper's protocol (make "
            "reproduce-suite does)")


def unequal_seeds(ranked: list[ConfigResult]) -> str | None:
    """A warning when the candidates have different numbers of finished seeds (an unfinished
    search compares means over different seeds), else None."""
    counts = sorted({len(r.seeds) for r in ranked})
    if len(counts) == 1:
        return None
    return (f"the candidates have {counts[0]} to {counts[-1]} finished seeds: the search is "
            "unfinished (re-running its command resumes it), so the choice may change")


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


def selected_overrides(result: ConfigResult, epochs: int | None = None) -> str:
    """The overrides that, after ``+experiment=paper_selected``, compose ``result``'s own config:
    every key whose value in the job differs from what that experiment composes to, so the command
    trains the same model (same config identity, so the search's finished seeds are reused), not a
    rebuilt approximation. Execution keys (seeds, device, data folders, W&B) are left to the user,
    except those that change what the config computes (expert choice's evaluation batch).
    ``epochs``, when given, replaces the job's own (a shortened search re-run at the protocol)."""
    output_dirs.register()  # the resolvers the Hydra configs name
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = flatten(as_dict(validate(compose("train", overrides=[SELECTED_EXPERIMENT]))))
    own = dict(result.flat)  # keys added since the run: their defaults
    if epochs is not None:  # the same model trained for another number of epochs
        own["trainer.epochs"] = epochs
    computing = computing_execution_keys(result.typed)  # expert choice's evaluation batch
    changed = [f"{key}={_override_value(value)}" for key, value in own.items()
               if base[key] != value and (key in computing or not is_execution_key(key))]
    return " ".join(shlex.quote(override) for override in changed)


def selection(results: list[ConfigResult]) -> str:
    """The configurations chosen on validation (per dataset and backbone, the first of
    :func:`candidates_per_backbone`), with the command that runs them with the
    paper's 10 seeds where they have fewer."""
    lines = []
    for (dataset, backbone), ranked in sorted(candidates_per_backbone(results).items()):
        r = ranked[0]
        valid = r.mean_std("valid")
        scale = display_scale(r.metric)
        lines.append(f"- {dataset} GMoE-{backbone.upper()}: {r.label} (validation "
                     f"{mean_std_text(valid[0] * scale, valid[1] * scale, len(r.seeds))}, "
                     f"{seed_count(r)}; "
                     f"{lead_over_runner_up(ranked)})")
        if warning := unequal_seeds(ranked):
            lines[-1] += f"; {warning}"
        if shortened_search(r):  # suite_search's 30 epochs: re-run at the protocol
            lines[-1] += (f"; the search ran {r.config['trainer']['epochs']} epochs, so to run it "
                          f"at the paper's protocol ({PAPER_SEEDS} seeds × {PAPER_EPOCHS} epochs):")
            lines.append(f"  `gmoe-train {SELECTED_EXPERIMENT} "
                         f"{selected_overrides(r, epochs=PAPER_EPOCHS)}`")
        elif len(r.seeds) < PAPER_SEEDS:
            lines[-1] += f"; to run it with the paper's {PAPER_SEEDS} seeds:"
            lines.append(f"  `gmoe-train {SELECTED_EXPERIMENT} {selected_overrides(r)}`")
        else:
            lines[-1] += f", already run with the paper's {PAPER_SEEDS} seeds"
    return "\n".join(lines) + "\n" if lines else ""
