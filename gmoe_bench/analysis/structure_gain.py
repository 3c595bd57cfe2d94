r"""Does GMoE gain more, and route more by structure, on structurally diverse datasets?

The paper's second open question, across datasets. For every dataset this joins three things:

- its heterogeneity, the mean entropy of molecule size, rings and atom degree
  (``gmoe-heterogeneity``'s ``table.csv``);
- GMoE's gain over its backbone. Per backbone, the gain comes from the GMoE row with the best
  validation score among those that have a plain row under the same semantics (the paper's model
  selection), taken from run or report folders. To compare ROC-AUC with RMSE the gain is made
  relative,

  .. math::
      g = 100 \cdot s \cdot \frac{\bar y_\mathrm{GMoE} - \bar y_\mathrm{backbone}}
      {|\bar y_\mathrm{backbone}|},

  with :math:`s = +1` where higher is better and :math:`-1` where lower is (RMSE), so :math:`g > 0`
  always means that GMoE is better;
- optionally, how strongly routing follows atom structure: the mean Cramér's V of expert choice
  against element, degree and ring membership over layers, seeds and the configurations of that
  backbone analysed (``gmoe-routing``'s ``routing_structure.json``).

Spearman's rank correlation of heterogeneity with the gain (and with V) is given per backbone once
at least :data:`MIN_DATASETS` datasets have one from a finished GMoE row (a row with fewer seeds
than its backbone, one still training, is shown but left out of the correlation and named), with
its exact permutation p-value (over all orderings: the asymptotic one is wrong for a handful of
datasets; above 9 datasets over 99,999 seeded random orderings). Below that a correlation says
nothing, and the report says so instead.

    gmoe-structure-gain results/analysis_heterogeneity/table.csv \
        --runs results/paper_molbbbp/digest.json multirun/suite \
        [--routing results/analysis_molbbbp/routing/routing_structure.json] --out results/structure_gain
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import permutation_test, rankdata

from gmoe_bench.errors import UserError
from gmoe_bench.records import display_scale, higher_is_better, write_atomic
from gmoe_bench.reports.cli import dirs_exist, out_is_folder
from gmoe_bench.reports.paper import best_on_validation
from gmoe_bench.reports.table import Gain, collect, gains

MIN_DATASETS = 3  # fewer points than this make no rank correlation worth stating
EXACT_UP_TO = 9  # datasets whose every ordering the p-value enumerates (9! = 362,880); above: sampled
RESAMPLES = 99_999
PROPERTIES = ("element", "degree", "ring")


def chosen_gains(gain_list: list[Gain]) -> dict[tuple[str, str], Gain]:
    """Per (dataset, backbone): the gain of the GMoE row with the best mean validation score."""
    candidates: dict[tuple[str, str], list[Gain]] = {}
    for gain in gain_list:
        key = (gain.gmoe.dataset, gain.gmoe.config["model"]["backbone"])
        candidates.setdefault(key, []).append(gain)
    chosen = {}
    for key, gs in candidates.items():
        best = best_on_validation([g.gmoe for g in gs])
        chosen[key] = next(g for g in gs if g.gmoe is best)
    return chosen


def relative_gain(gain: Gain) -> float:
    """GMoE's improvement over its backbone, % of the backbone's test mean (> 0: GMoE better;
    NaN when the backbone's mean is 0)."""
    gmoe, backbone = gain.gmoe.mean_std("test")[0], gain.backbone.mean_std("test")[0]
    if backbone == 0:
        return math.nan
    sign = 1.0 if higher_is_better(gain.gmoe.metric) else -1.0
    return 100.0 * sign * (gmoe - backbone) / abs(backbone)


def routing_strength(paths: list[Path], default_backbone: str | None = None
                     ) -> dict[tuple[str, str], float]:
    """Per (dataset, backbone): Cramér's V of routing against atom structure, the mean over
    properties, layers, seeds and that backbone's configurations analysed. Files written before
    gmoe-routing recorded the backbone take ``default_backbone``."""
    per_key: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        try:
            for analysis in json.loads(path.read_text()):
                values = [np.mean(seed["statistics"][prop]["cramers_v"])
                          for seed in analysis["per_seed"] for prop in PROPERTIES
                          if prop in seed["statistics"]]
                backbone = analysis.get("backbone", default_backbone)
                if backbone is None:
                    raise UserError(f"{path} does not record its models' backbone (written before "
                                    "gmoe-routing did); re-run gmoe-routing on its runs, or name "
                                    "it with --routing-backbone gcn|gin.")
                if values:
                    per_key.setdefault((analysis["dataset"], backbone), []).append(
                        float(np.mean(values)))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise UserError(f"{path} is not a routing_structure.json of gmoe-routing "
                            f"({type(err).__name__}: {err}); give the file gmoe-routing "
                            "writes.") from err
    return {key: float(np.mean(v)) for key, v in per_key.items()}


@dataclass
class Correlation:
    """Spearman's ρ across datasets with its permutation p-value, or why there is none."""

    rho: float | None
    p_value: float | None
    datasets: int
    reason: str = ""
    left_out: str = ""  # the rows still training, for the report

    def text(self) -> str:
        """One clause for the report."""
        tail = f"; {self.left_out} left out, GMoE seeds still missing" if self.left_out else ""
        if self.rho is None:
            return f"no correlation stated: {self.reason}{tail}"
        kind = "exact" if self.datasets <= EXACT_UP_TO else f"{RESAMPLES:,} permutations"
        return (f"Spearman ρ = {self.rho:+.2f} ({kind} p = {self.p_value:.2f}, "
                f"{self.datasets} datasets{tail})")


def correlation(x: list[float], y: list[float]) -> Correlation:
    """Spearman's ρ of the pairs with both values, with the p-value of a permutation test over
    every ordering of ``y`` (two-sided; above :data:`EXACT_UP_TO` datasets over
    :data:`RESAMPLES` random orderings, seeded); None below :data:`MIN_DATASETS` or for constant
    values."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < MIN_DATASETS:
        return Correlation(None, None, len(pairs),
                           f"{len(pairs)} dataset(s), at least {MIN_DATASETS} needed")
    xs, ys = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return Correlation(None, None, len(pairs), "the values are all equal")

    # Spearman's ρ is Pearson's r of the ranks: rank once, then one vectorised r per ordering
    x_ranks = rankdata(xs)
    x_centred = x_ranks - x_ranks.mean()

    def rho(y_ranks: np.ndarray, axis: int = -1) -> np.ndarray:
        y_centred = y_ranks - y_ranks.mean(axis=axis, keepdims=True)
        return (x_centred * y_centred).sum(axis) / np.sqrt(
            (x_centred**2).sum() * (y_centred**2).sum(axis))

    y_ranks = rankdata(ys)
    exact = len(pairs) <= EXACT_UP_TO
    test = permutation_test((y_ranks,), rho, permutation_type="pairings", vectorized=True,
                            n_resamples=np.inf if exact else RESAMPLES, batch=100_000,
                            rng=np.random.default_rng(0))
    return Correlation(float(rho(y_ranks)), float(test.pvalue), len(pairs))


def structure_gain_table(heterogeneity: pd.DataFrame, chosen: dict[tuple[str, str], Gain],
                         routing: dict[tuple[str, str], float]) -> pd.DataFrame:
    """One row per (dataset, backbone) with a gain and a heterogeneity, datasets by decreasing
    heterogeneity."""
    level = heterogeneity.set_index("dataset")["heterogeneity"]
    rows = []
    for (dataset, backbone), gain in chosen.items():
        if dataset not in level.index:
            continue
        d = gain.difference.scaled(display_scale(gain.gmoe.metric))
        rows.append({
            "dataset": dataset, "heterogeneity": float(level[dataset]), "backbone": backbone,
            "gmoe_row": gain.gmoe.label, "metric": gain.gmoe.metric,
            "seeds": f"{len(gain.gmoe.seeds)} / {len(gain.backbone.seeds)}",
            "finished": len(gain.gmoe.seeds) >= len(gain.backbone.seeds),
            "difference": d.estimate,
            "interval_low": d.low if d.defined else math.nan,
            "interval_high": d.high if d.defined else math.nan,
            "verdict": gain.verdict, "relative_gain_pct": relative_gain(gain),
            "cramers_v": routing.get((dataset, backbone), math.nan)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["heterogeneity", "backbone"], ascending=[False, True],
                             ignore_index=True)


def correlations(table: pd.DataFrame) -> dict[str, dict[str, Correlation]]:
    """Per backbone: heterogeneity against the relative gain and against Cramér's V, over the
    datasets whose GMoE row has all its backbone's seeds (a partial mean would rank as if final)."""
    out = {}
    for backbone, rows in table.groupby("backbone"):
        training = rows[~rows["finished"]]
        left_out = ", ".join(f"{r.dataset} ({r.seeds} seeds)"
                             for r in training.itertuples(index=False))
        rows = rows[rows["finished"]]
        out[str(backbone)] = {
            key: replace(correlation(rows["heterogeneity"].tolist(), rows[column].tolist()),
                         left_out=left_out)
            for key, column in (("gain", "relative_gain_pct"), ("cramers_v", "cramers_v"))}
    return out


def markdown(table: pd.DataFrame, found: dict[str, dict[str, Correlation]]) -> str:
    """The table and one line of correlations per backbone."""
    header = ["dataset", "heterogeneity (bits)", "backbone", "GMoE row (validation's choice)",
              "seeds", "GMoE − backbone (test)", "95% interval (Welch)", "verdict",
              "relative gain", "Cramér's V"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples(index=False):
        interval = ("n/a" if math.isnan(r.interval_low)
                    else f"[{r.interval_low:+.2f}, {r.interval_high:+.2f}]")
        v = "–" if math.isnan(r.cramers_v) else f"{r.cramers_v:.3f}"
        lines.append("| " + " | ".join([
            r.dataset, f"{r.heterogeneity:.3f}", r.backbone, r.gmoe_row, r.seeds,
            f"{r.difference:+.2f} ({r.metric})", interval, r.verdict,
            "n/a" if math.isnan(r.relative_gain_pct) else f"{r.relative_gain_pct:+.2f} %",
            v]) + " |")
    lines.append("")
    for backbone, found_b in found.items():
        lines.append(f"- {backbone.upper()}: heterogeneity against GMoE's relative gain: "
                     f"{found_b['gain'].text()}; against Cramér's V: {found_b['cramers_v'].text()}.")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Heterogeneity against the relative gain, and against Cramér's V where measured; rows still
    training are hollow and name their seeds."""
    has_v = table["cramers_v"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_v else 1, figsize=(10 if has_v else 5.5, 4), squeeze=False)
    for backbone, rows in table.groupby("backbone"):
        for ax, column in zip(axes[0], ("relative_gain_pct", "cramers_v"), strict=False):
            done = ax.scatter(rows["heterogeneity"][rows["finished"]],
                              rows[column][rows["finished"]], label=str(backbone).upper())
            ax.scatter(rows["heterogeneity"][~rows["finished"]], rows[column][~rows["finished"]],
                       facecolors="none", edgecolors=done.get_facecolor())
            for r in rows.itertuples(index=False):
                name = r.dataset.removeprefix("ogbg-mol")
                ax.annotate(name if r.finished else f"{name} ({r.seeds} seeds)",
                            (r.heterogeneity, getattr(r, column)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    axes[0][0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0][0].set_ylabel("GMoE − backbone, % of the backbone (> 0: better)")
    if has_v:
        axes[0][1].set_ylabel("Cramér's V of routing against atom structure")
    for ax in axes[0]:
        ax.set_xlabel("heterogeneity (mean entropy, bits)")
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def read_heterogeneity(path: Path) -> pd.DataFrame:
    """gmoe-heterogeneity's table.csv: one row per dataset, with its heterogeneity."""
    hint = "give the table.csv that gmoe-heterogeneity writes."
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise UserError(f"{path} cannot be read as a table ({type(err).__name__}); {hint}") from err
    if not {"dataset", "heterogeneity"} <= set(table.columns):
        raise UserError(f"{path} has no dataset and heterogeneity columns; {hint}")
    repeated = sorted(set(table["dataset"][table["dataset"].duplicated()]))
    if repeated:
        raise UserError(f"{path} lists {', '.join(repeated)} more than once; {hint}")
    return table


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``gmoe-structure-gain``): table.md, table.csv and structure_gain.png."""
    parser = argparse.ArgumentParser(prog="gmoe-structure-gain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("heterogeneity", type=Path, help="gmoe-heterogeneity's table.csv")
    parser.add_argument("--runs", nargs="+", type=Path, required=True,
                        help="run or sweep folders, or report digest.json files, with GMoE and "
                             "backbone rows")
    parser.add_argument("--routing", nargs="*", type=Path, default=[],
                        help="gmoe-routing's routing_structure.json files")
    parser.add_argument("--routing-backbone", choices=("gcn", "gin"), default=None,
                        help="the backbone of routing files that do not record it (older ones)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    args = parser.parse_args(argv)
    prog = "gmoe-structure-gain"
    if not (dirs_exist(prog, [args.heterogeneity, *args.runs, *args.routing])
            and out_is_folder(prog, args.out)):
        return 2
    try:
        heterogeneity = read_heterogeneity(args.heterogeneity)
        routing = routing_strength(args.routing, args.routing_backbone)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    chosen = chosen_gains(gains(collect(args.runs)))
    table = structure_gain_table(heterogeneity, chosen, routing)
    missing = sorted({d for d, _ in chosen} - set(heterogeneity["dataset"]))
    if missing:
        print(f"{prog}: warning: {', '.join(missing)} left out: not in {args.heterogeneity} "
              "(add them with gmoe-heterogeneity).", file=sys.stderr)
    unmatched = sorted({d for d, _ in routing} - {d for d, _ in chosen})
    if unmatched:
        print(f"{prog}: warning: the routing of {', '.join(unmatched)} is left out: no GMoE row "
              "there has a backbone row in --runs.", file=sys.stderr)
    if table.empty:
        print(f"{prog}: error: no GMoE row with a backbone row under the same semantics on a "
              "dataset of the heterogeneity table; give the folders of both rows.", file=sys.stderr)
        return 2
    found = correlations(table)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(table, found)
    write_atomic(args.out / "table.md", lambda f: f.write(text.encode()))
    write_atomic(args.out / "table.csv", lambda f: f.write(table.to_csv(index=False).encode()))
    plot(table, args.out / "structure_gain.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
