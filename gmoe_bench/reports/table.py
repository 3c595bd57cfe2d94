"""Collect summary.json files into per-configuration results and paper-style tables."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from gmoe_bench.config import (
    EXECUTION_KEYS,
    Gate,
    TrainConfig,
    as_dict,
    computing_execution_keys,
    config_identity,
    network_width,
    validate,
)
from gmoe_bench.errors import ConfigError
from gmoe_bench.records import (
    SUMMARY_FILE,
    display_scale,
    flatten,
    higher_is_better,
    mean_std_text,
    seed_record_problem,
)
from gmoe_bench.reports.paper_figures import paper_figure
from gmoe_bench.reports.stats import LEVEL, Interval, difference_interval, mean_interval

log = logging.getLogger(__name__)

# How config keys are written in row names; keys not listed appear in full.
SHORT_NAMES = {"model.backbone": "", "moe.num_experts": "n", "moe.num_hop2": "hop2", "moe.top_k": "k",
               "moe.loss_weight": "λ", "moe.dispatch": "dispatch", "moe.combine": "combine",
               "width": "width", "dataset.drop_node_p": "drop", "moe.gate": "gate"}
# Keys that never name a row: execution details, and the dataset (it is the column).
IGNORED_PREFIXES = (*EXECUTION_KEYS, "dataset.name")
# What a GMoE row may differ in from its backbone's row and still be compared with it: everything
# else (node dropping, epochs, learning rate, depth, ...) is the semantics both must share.
GMOE_ONLY_PREFIXES = ("moe.", "model.hidden_dim")


DIGEST_FILE = "digest.json"
# What collect() reads from a summary.json.
SUMMARY_KEYS = ("dataset", "model", "metric", "config", "provenance", "seeds")
# OGB's graph property metrics (ogb.graphproppred.Evaluator).
METRICS = frozenset({"rocauc", "ap", "rmse", "mae", "acc", "F1"})


@dataclass
class ConfigResult:
    """Every finished seed of one configuration on one dataset, merged over jobs."""

    dataset: str
    model: str
    metric: str
    config: dict[str, Any]
    seeds: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    # the jobs the seeds come from: summary path, provenance (command, commit, hardware), wall time
    jobs: list[dict[str, Any]] = field(default_factory=list)
    # content hash of the data the seeds were trained on; None for runs from before it was recorded
    fingerprint: str | None = None

    @property
    def key(self) -> str:  # the config without dataset, seeds and execution details
        return config_identity(self.typed, also_ignore=("dataset.name",))

    @cached_property
    def typed(self) -> TrainConfig:
        """The stored config through the schema: keys added since the run take their defaults."""
        return validate(self.config)

    @cached_property
    def flat(self) -> dict[str, Any]:
        """:attr:`typed` as dotted keys."""
        return flatten(as_dict(self.typed))

    def values(self, split: str) -> np.ndarray:
        return np.array([s[split] for s in self.seeds], dtype=float)

    def mean_std(self, split: str) -> tuple[float, float]:
        values = self.values(split)
        return float(values.mean()), float(values.std())

    def interval(self, split: str) -> Interval:
        """Mean over seeds with its 95% t interval."""
        return mean_interval(self.values(split))

    @property
    def is_gmoe(self) -> bool:
        return self.typed.moe.enabled

    @property
    def shares_fixed(self) -> bool:
        """Whether the gate fixes each expert's share of the (node, expert) pairs by construction,
        so routing shares, their entropy and load CV² say nothing: the dense gate sends every node
        to every expert, expert choice fills every expert to its capacity, top-k with k = n picks
        all."""
        moe = self.typed.moe
        return moe.gate in (Gate.dense, Gate.expert_choice) or moe.top_k >= moe.num_experts


def _check_entry(summary: dict[str, Any]) -> None:
    """A ValueError naming what makes a summary (or a digest's configuration) unreportable."""
    if not isinstance(summary["config"], dict) or not isinstance(summary["seeds"], list):
        raise ValueError("its config or seeds are not those of gmoe-train")
    if summary["metric"] not in METRICS:
        raise ValueError(f"its metric {summary['metric']!r} is not one of OGB's "
                         f"({', '.join(sorted(METRICS))})")
    for seed in summary["seeds"]:
        if problem := seed_record_problem(seed):
            raise ValueError(f"a seed's result is unusable: {problem}")


def read_summary(path: Path) -> dict[str, Any] | None:
    """The content of a gmoe-train summary.json, or None, with a warning naming the file, when it
    is not one (truncated, foreign): one such file never stops a report."""
    try:
        summary = json.loads(path.read_text())
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        _check_entry(summary)
    except (OSError, ValueError, TypeError) as err:
        log.warning("Skipping %s: not a readable gmoe-train summary.json (%s: %s).", path,
                    type(err).__name__, err)
        return None
    return summary


def read_digest(path: Path) -> list[dict[str, Any]]:
    """The configurations of a committed ``digest.json`` in summary form, each seed's epochs
    rebuilt from its curves (routing shares only at the best epoch, routing entropy at every
    epoch where the digest keeps it); ``[]``, with a warning naming the file, when it is not a
    gmoe-report digest."""

    def epochs(seed: dict[str, Any]) -> list[dict[str, Any]]:
        rebuilt = [{"epoch": i, "valid": valid, "test": test,
                    "routing": seed["routing_at_best"] if i == seed["best_epoch"] else []}
                   for i, (valid, test) in enumerate(
                       zip(seed["valid_curve"], seed["test_curve"], strict=True), 1)]
        for epoch, entropy in zip(rebuilt, seed.get("routing_entropy_curve") or [], strict=False):
            epoch["routing_entropy"] = entropy
        return rebuilt

    try:
        entries = json.loads(path.read_text())
        summaries = [{
            "dataset": e["dataset"], "model": e["model"], "metric": e["metric"],
            "config": e["config"], "data": {"fingerprint": e.get("fingerprint")}, "jobs": e["jobs"],
            "seeds": [{**{k: v for k, v in s.items() if not k.endswith(("_curve", "_at_best"))},
                       "epochs": epochs(s)} for s in e["seeds"]],
        } for e in entries]
        for summary in summaries:
            _check_entry(summary)
    except (OSError, ValueError, TypeError, KeyError) as err:
        log.warning("Skipping %s: not a readable gmoe-report digest.json (%s: %s).", path,
                    type(err).__name__, err)
        return []
    return summaries


def collect(dirs: list[Path]) -> list[ConfigResult]:
    """All summary.json files under ``dirs`` (and any ``digest.json`` named on its own, so that a
    committed report can be rebuilt without its run folders), grouped by (dataset, configuration,
    data content). A seed both in a run folder and in a digest is taken from the run folder, whose
    record is whole (every epoch's routing)."""
    paths = sorted({p for d in dirs for p in ([d] if d.is_file() else d.rglob(SUMMARY_FILE))})
    entries = [(path, summary) for path in paths for summary in _read(path)]
    groups: dict[tuple[str, str, str | None], ConfigResult] = {}
    first_entry: dict[tuple[str, str, str | None], int] = {}
    # run folders merge before digests (their seeds win); rows keep the order of the paths
    for i in sorted(range(len(entries)), key=lambda i: entries[i][0].name == DIGEST_FILE):
        path, summary = entries[i]
        try:
            key = _merge(groups, summary, path)
        except ConfigError as err:  # another version's schema: one file never stops a report
            log.warning("Skipping %s: its config is not one this gmoe-bench reads (%s).",
                        path, err)
            continue
        first_entry[key] = min(first_entry.get(key, i), i)
    results = [groups[k] for k in sorted(groups, key=first_entry.__getitem__) if groups[k].seeds]
    _name_rows(results)
    return results


def _read(path: Path) -> list[dict[str, Any]]:
    """The summaries in one summary.json or digest.json, each with its jobs."""
    if path.name == DIGEST_FILE:
        return read_digest(path)
    summary = read_summary(path)
    return [] if summary is None else [{
        **summary, "jobs": [{"summary": str(path), "provenance": summary["provenance"],
                             "seeds": [s["seed"] for s in summary["seeds"]],
                             "wall_seconds": summary.get("wall_seconds")}]}]


def _merge(groups: dict[tuple[str, str, str | None], ConfigResult], summary: dict[str, Any],
           path: Path) -> tuple[str, str, str | None]:
    """Add the jobs and seeds of one summary to its configuration's group, and return the group's
    key; a seed already there is kept and the new copy ignored, with a warning."""
    result = ConfigResult(summary["dataset"], summary["model"], summary["metric"],
                          summary["config"], fingerprint=summary.get("data", {}).get("fingerprint"))
    key = (result.dataset, result.key, result.fingerprint)
    group = groups.setdefault(key, result)
    known = {s["seed"] for s in group.seeds}
    new = []
    for seed in summary["seeds"]:
        if seed["seed"] not in known:
            new.append(seed)
            continue
        first = next(j["summary"] for j in group.jobs if seed["seed"] in j["seeds"])
        log.warning("seed %d of %s appears twice; keeping the one in %s, ignoring %s",
                    seed["seed"], group.model, first, path)
    if new:  # a job none of whose seeds is kept (a digest beside its own run folders) is not listed
        group.jobs.extend(summary["jobs"])
        group.seeds.extend(new)
    return key


def _naming_keys(result: ConfigResult) -> dict[str, Any]:
    """The config keys that may name a row: all but the dataset and the execution keys that do not
    change what the config computes."""
    computing = computing_execution_keys(result.typed)
    return {k: v for k, v in result.flat.items()
            if k in computing or not k.startswith(IGNORED_PREFIXES)}


def _label_values(result: ConfigResult) -> dict[str, Any]:
    """:func:`_naming_keys`, with the hidden size as the network's actual width
    (``hidden_dim/√k`` for GMoE with ``scale_hidden``) in place of the two keys that set it."""
    flat = _naming_keys(result)
    hidden, scale = flat.pop("model.hidden_dim"), flat.pop("moe.scale_hidden")
    flat["width"] = network_width(hidden, flat["moe.num_experts"], flat["moe.top_k"], scale)
    return flat


def _differing_keys(values: list[dict[str, Any]]) -> list[str]:
    """The keys (sorted) whose values differ among the dicts that have them: a key only some rows
    are named by (expert choice's evaluation batch) differs among those."""
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({json.dumps(v[k]) for v in values if k in v}) > 1]


def _name_rows(results: list[ConfigResult]) -> None:
    """Name each configuration by the config values that differ between configurations."""
    flat = [_label_values(r) for r in results]
    differing = _differing_keys(flat)
    # MoE keys mean nothing for the plain backbone (n=0): leave them out of its name.
    for result, values in zip(results, flat, strict=True):
        plain = values["moe.num_experts"] == 0
        parts = []
        for key in differing:
            if key not in values or (plain and key.startswith("moe.")):
                continue
            short = SHORT_NAMES.get(key, key)
            value = values[key]
            parts.append(f"{value}" if short == "" else f"{short}={value:g}" if
                         isinstance(value, float) else f"{short}={value}")
        result.label = " ".join(parts) or result.model
    # Configs that build the same network with other keys (hidden 300 scaled by 1/√4 and hidden
    # 150 unscaled): named by the raw keys that differ among them.
    for group in _same_label(results):
        raw = [_naming_keys(r) for r in group]
        keys = _differing_keys(raw)
        for r, values in zip(group, raw, strict=True):
            r.label += "".join(f" {k}={values[k]}" for k in keys if k in values)
    # The same config trained on different data (another copy, edited labels) is another row.
    for group in _same_label(results):
        for r in group:
            r.label += f" data={r.fingerprint[:8] if r.fingerprint else 'unrecorded'}"
    # Configurations differ in a naming key or their data, so this cannot happen; a table that
    # silently kept one of two cells would be worse than stopping.
    if clash := _same_label(results):
        raise RuntimeError(f"gmoe-report could not tell configurations apart: {clash[0][0].label} "
                           f"({', '.join(r.key for r in clash[0])}); please report this.")


def _same_label(results: list[ConfigResult]) -> list[list[ConfigResult]]:
    """The groups of two or more results that share a (label, dataset) cell."""
    cells: dict[tuple[str, str], list[ConfigResult]] = {}
    for r in results:
        cells.setdefault((r.label, r.dataset), []).append(r)
    return [group for group in cells.values() if len(group) > 1]


@dataclass
class Gain:
    """A GMoE row against the plain row of its backbone under the same semantics."""

    gmoe: ConfigResult
    backbone: ConfigResult

    @property
    def difference(self) -> Interval:  # GMoE − backbone, test metric, Welch's 95% interval
        return difference_interval(self.gmoe.values("test"), self.backbone.values("test"))

    @property
    def verdict(self) -> str:
        """'better' or 'worse' when the interval excludes zero, else 'within noise'."""
        d = self.difference
        if not d.excludes_zero:
            return "within noise" if d.defined else "n/a"
        better = (d.estimate > 0) == higher_is_better(self.gmoe.metric)
        return "better" if better else "worse"


def _semantics(result: ConfigResult) -> str:
    return json.dumps({k: v for k, v in sorted(result.flat.items())
                       if not k.startswith((*IGNORED_PREFIXES, *GMOE_ONLY_PREFIXES))})


def gains(results: list[ConfigResult]) -> list[Gain]:
    """Every (GMoE row, backbone row) pair on one dataset whose configs differ only in the MoE keys
    and the hidden size (same backbone, node dropping, depth, optimiser, epochs) and whose seeds
    trained on the same data (equal fingerprints; an unrecorded one, from older runs, matches)."""
    plain = [r for r in results if not r.is_gmoe]
    return [Gain(g, b) for g in results if g.is_gmoe for b in plain
            if b.dataset == g.dataset and _semantics(b) == _semantics(g)
            and (b.fingerprint == g.fingerprint or None in (b.fingerprint, g.fingerprint))]


def _interval_text(interval: Interval, scale: float) -> str:
    i = interval.scaled(scale)
    return f"[{i.low:+.2f}, {i.high:+.2f}]" if i.defined else "n/a"


def gain_table(results: list[ConfigResult]) -> str:
    """Markdown: per GMoE row, its difference from its backbone with the 95% interval (Welch)."""
    header = ["model", "backbone row", "dataset", "seeds", "GMoE − backbone (test)",
              f"{LEVEL:.0%} interval (Welch)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for gain in gains(results):
        scale, d = display_scale(gain.gmoe.metric), gain.difference
        lines.append("| " + " | ".join([
            gain.gmoe.label, gain.backbone.label, gain.gmoe.dataset,
            f"{len(gain.gmoe.seeds)} / {len(gain.backbone.seeds)}", f"{d.estimate * scale:+.2f}",
            _interval_text(d, scale), gain.verdict]) + " |")
    return "\n".join(lines) + "\n"


def table_rows(results: list[ConfigResult]) -> tuple[list[str], list[str], dict]:
    """Row labels (first-seen order), dataset columns, and cell values (mean, std, seeds)."""
    labels = list(dict.fromkeys(r.label for r in results))
    datasets = sorted({r.dataset for r in results})
    cells = {(r.label, r.dataset): r for r in results}
    return labels, datasets, cells


def _best_per_column(labels: list[str], datasets: list[str], cells: dict) -> set[tuple[str, str]]:
    best = set()
    for dataset in datasets:
        present = [(cells[(lab, dataset)].mean_std("test")[0], lab) for lab in labels
                   if (lab, dataset) in cells]
        if present:
            metric = cells[(present[0][1], dataset)].metric
            chosen = max(present) if higher_is_better(metric) else min(present)
            best.add((chosen[1], dataset))
    return best


def _formatted_rows(results: list[ConfigResult], plus_minus: str, bold: Callable[[str], str],
                    missing: str) -> tuple[list[str], list[tuple[str, list[str], set[int]]]]:
    """Datasets, and per configuration its label, test cells (× 100 for ROC-AUC) and seed counts."""
    labels, datasets, cells = table_rows(results)
    best = _best_per_column(labels, datasets, cells)
    rows = []
    for label in labels:
        row, seed_counts = [], set()
        for dataset in datasets:
            result = cells.get((label, dataset))
            if result is None:
                row.append(missing)
                continue
            scale = display_scale(result.metric)
            mean, std = result.mean_std("test")
            cell = mean_std_text(mean * scale, std * scale, len(result.seeds), plus_minus=plus_minus)
            row.append(bold(cell) if (label, dataset) in best else cell)
            seed_counts.add(len(result.seeds))
        rows.append((label, row, seed_counts))
    return datasets, rows


def markdown_table(results: list[ConfigResult]) -> str:
    """Test metric (ROC-AUC × 100) mean ± std over seeds, best per column in bold."""
    datasets, rows = _formatted_rows(results, "±", lambda c: f"**{c}**", "–")
    metric = {r.dataset: r.metric for r in results}
    header = ["model", *[f"{d} (test {metric[d]}"
                         f"{' × 100' if display_scale(metric[d]) == 100 else ''})" for d in datasets],
              "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells, seed_counts in rows:
        seeds = "/".join(str(c) for c in sorted(seed_counts))
        lines.append("| " + " | ".join([label, *cells, seeds]) + " |")
    return "\n".join(lines) + "\n"


def latex_table(results: list[ConfigResult]) -> str:
    datasets, rows = _formatted_rows(results, r"$\pm$", lambda c: rf"\textbf{{{c}}}", "--")
    lines = [r"\begin{tabular}{l" + "c" * len(datasets) + "}", r"\toprule",
             " & ".join(["Model", *datasets]) + r" \\", r"\midrule"]
    for label, cells, _ in rows:
        name = label.replace("λ", r"$\lambda$").replace("_", r"\_")
        lines.append(" & ".join([name, *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    pairs = gains(results)
    if pairs:
        lines += ["", r"\begin{tabular}{llcc}", r"\toprule",
                  rf"Model & Backbone & $\Delta$ (test) & {LEVEL:.0%} CI (Welch) \\".replace("%", r"\%"),
                  r"\midrule"]
        for gain in pairs:
            scale, d = display_scale(gain.gmoe.metric), gain.difference
            names = [x.label.replace("λ", r"$\lambda$").replace("_", r"\_")
                     for x in (gain.gmoe, gain.backbone)]
            lines.append(" & ".join([*names, f"{d.estimate * scale:+.2f}", _interval_text(d, scale)])
                         + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(results: list[ConfigResult], path: Path) -> None:
    """One line per (configuration, dataset), in the metric's own units (ROC-AUC not × 100): the
    95% interval of the test mean, the paper's figure and whether it lies inside that interval,
    and for GMoE the difference from its backbone row with Welch's 95% interval."""
    gain_of: dict[int, Gain] = {}
    for gain in gains(results):  # a GMoE row with several matching backbone rows: the first
        gain_of.setdefault(id(gain.gmoe), gain)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "dataset", "metric", "seeds", "valid_mean", "valid_std",
                         "test_mean", "test_std", "test_ci_low", "test_ci_high", "paper_mean",
                         "paper_inside_ci", "backbone", "gain", "gain_ci_low", "gain_ci_high",
                         "gain_excludes_zero", "seed_list"])
        for r in results:
            valid, test, ci = r.mean_std("valid"), r.mean_std("test"), r.interval("test")
            paper = paper_figure(r)
            gain = gain_of.get(id(r))
            d = gain.difference if gain else None
            writer.writerow([
                r.label, r.dataset, r.metric, len(r.seeds), f"{valid[0]:.6f}", f"{valid[1]:.6f}",
                f"{test[0]:.6f}", f"{test[1]:.6f}", _number(ci.low), _number(ci.high),
                "" if paper is None else f"{paper[0] / 100:.4f}",
                "" if paper is None or not ci.defined else ci.contains(paper[0] / 100),
                gain.backbone.label if gain else "", _number(d.estimate if d else None),
                _number(d.low if d else None), _number(d.high if d else None),
                d.excludes_zero if d and d.defined else "",
                " ".join(str(s["seed"]) for s in r.seeds)])


def _number(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.6f}"


def routing_entropy(shares: list[list[float]]) -> float:
    r"""Entropy of expert usage :math:`-\sum_e p_e \log p_e / \log n`, mean over layers.

    ``shares`` [L][n] are the routing shares of one epoch. 1 when every expert gets the same share;
    :math:`\log k / \log n` when the gate has collapsed onto k experts (each node picks k distinct
    experts, so k experts is as narrow as routing gets).
    """
    p = np.asarray(shares, dtype=float)  # [L, n]
    if p.shape[1] < 2:
        return 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return float((-terms.sum(1) / np.log(p.shape[1])).mean())


def entropy_curve(seed: dict[str, Any]) -> list[float] | None:
    """The routing entropy of every epoch of one seed's record (a run's, or a digest's, which
    keeps the curve, not the shares), or None where an epoch has no routing (plain backbones,
    digests written before they kept the curve)."""
    epochs = seed["epochs"]
    if all("routing_entropy" in e for e in epochs):
        return [e["routing_entropy"] for e in epochs]
    if all(e["routing"] for e in epochs):
        return [routing_entropy(e["routing"]) for e in epochs]
    return None


def load_cv_squared(shares: list[list[float]]) -> float:
    r"""CV² of expert load, :math:`\mathrm{Var}(p) / \mathrm{mean}(p)^2` over the experts (unbiased
    variance, as the load-balance loss), mean over layers.

    ``shares`` [L][n] are one epoch's routing shares, so this is the epoch's imbalance, which is
    smaller than the per-batch CV² the loss penalises. 0 when every expert gets the same share;
    :math:`(n / k - 1)\, n / (n - 1)` when the gate has collapsed onto k experts.
    """
    p = np.asarray(shares, dtype=float)  # [L, n]
    if p.shape[1] < 2:
        return 0.0
    return float((p.var(1, ddof=1) / p.mean(1) ** 2).mean())


def hop2_share(shares: list[list[float]], num_hop2: int) -> float:
    """Share of (node, expert) assignments that went to the last ``num_hop2`` experts, mean over
    layers."""
    p = np.asarray(shares, dtype=float)
    return float(p[:, p.shape[1] - num_hop2:].sum(1).mean()) if num_hop2 else 0.0


def details_table(results: list[ConfigResult]) -> str:
    """One row per (configuration, dataset): validation and test metric, best epoch, parameters,
    and for GMoE the routing entropy, load CV² and hop-2 share at each seed's best epoch (mean
    over seeds; "fixed by the gate" where the gate sets the shares, :attr:`ConfigResult.shares_fixed`)."""
    header = ["model", "dataset", "seeds", "epochs", "valid", "test", "best epoch (min–max)",
              "parameters", "routing entropy", "load CV²", "hop-2 share"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        scale = display_scale(r.metric)
        valid, test = r.mean_std("valid"), r.mean_std("test")
        best = [s["best_epoch"] for s in r.seeds]
        at_best = [s["epochs"][s["best_epoch"] - 1]["routing"] for s in r.seeds]
        entropy = imbalance = share = "–"
        if at_best[0] and r.shares_fixed:
            entropy = imbalance = share = "fixed by the gate"
        elif at_best[0]:
            num_hop2 = r.config["moe"]["num_hop2"]
            entropy = f"{np.mean([routing_entropy(x) for x in at_best]):.3f}"
            imbalance = f"{np.mean([load_cv_squared(x) for x in at_best]):.4f}"
            share = f"{np.mean([hop2_share(x, num_hop2) for x in at_best]):.3f}"
        epochs = "/".join(str(n) for n in sorted({len(s["epochs"]) for s in r.seeds}))
        params = "/".join(f"{n:,}" for n in sorted({s["num_parameters"] for s in r.seeds}))
        lines.append("| " + " | ".join([
            r.label, r.dataset, str(len(r.seeds)), epochs,
            mean_std_text(valid[0] * scale, valid[1] * scale, len(r.seeds)),
            mean_std_text(test[0] * scale, test[1] * scale, len(r.seeds)),
            f"{np.mean(best):.1f} ({min(best)}–{max(best)})", params, entropy, imbalance,
            share]) + " |")
    return "\n".join(lines) + "\n"


def digest(results: list[ConfigResult]) -> list[dict[str, Any]]:
    """What results/ keeps of the runs: per configuration its config and jobs, per seed the
    figures, the validation/test curves (4 decimals), the routing at the best epoch and, for
    GMoE, the routing entropy of every epoch (enough to redraw every plot)."""
    out = []
    for r in results:
        seeds = []
        for s in sorted(r.seeds, key=lambda s: s["seed"]):
            seeds.append({
                **{k: s.get(k) for k in ("seed", "best_epoch", "valid", "test", "wall_seconds",
                                          "num_parameters", "commit")},
                "valid_curve": [round(e["valid"], 4) for e in s["epochs"]],
                "test_curve": [round(e["test"], 4) for e in s["epochs"]],
                "routing_at_best": s["epochs"][s["best_epoch"] - 1]["routing"]})
            if r.is_gmoe and (entropy := entropy_curve(s)) is not None:
                seeds[-1]["routing_entropy_curve"] = [round(h, 4) for h in entropy]
        out.append({"label": r.label, "dataset": r.dataset, "model": r.model, "metric": r.metric,
                    "config": r.config, "fingerprint": r.fingerprint, "jobs": r.jobs,
                    "seeds": seeds})
    return out
