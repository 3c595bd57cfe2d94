"""gmoe-report and gmoe-select: run and sweep folders (their summary.json) into tables and plots,
and the configuration the paper's model selection picks.

JSON in, text and images out: nothing here imports torch or the training code (tested), so reports
run anywhere. gmoe-routing, which loads trained weights, is gmoe_bench.analysis.routing."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gmoe_bench.records import display_scale, mean_std_text
from gmoe_bench.reports.paper import (
    candidates_per_backbone,
    comparison_table,
    lead_over_runner_up,
    seed_count,
    selected_overrides,
    selection,
    shortened_search,
    unequal_seeds,
)
from gmoe_bench.reports.plots import (
    entropy_curves,
    metric_per_config,
    routing_heatmaps,
    validation_curves,
)
from gmoe_bench.reports.table import (
    DIGEST_FILE,
    collect,
    details_table,
    digest,
    gain_table,
    gains,
    latex_table,
    markdown_table,
    write_csv,
)

log = logging.getLogger(__name__)


def dirs_exist(prog: str, dirs: list[Path], hint: str = "") -> bool:
    """False, after saying which, when one of the folders given on the command line is missing."""
    missing = [d for d in dirs if not d.exists()]
    if missing:
        print(f"{prog}: error: {', '.join(map(str, missing))} does not exist.{hint}", file=sys.stderr)
    return not missing


def out_is_folder(prog: str, out: Path) -> bool:
    """False, after saying so, when ``--out`` names something that is not a folder."""
    if out.exists() and not out.is_dir():
        print(f"{prog}: error: --out {out} is a file; give a folder (new or existing) for the "
              "report.", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-report",
        description="Collect the summary.json files under the given folders (runs or sweeps; seeds "
                    "of one configuration spread over several jobs are merged) and write table.md, "
                    "table.csv, table.tex, details.md (validation, best epoch, parameters, "
                    "routing entropy, load CV²), paper.md (next to the paper's figures), digest.json "
                    "(configs, commands, per-seed figures and curves), metric.png, "
                    "valid_curves.png, routing.png and routing_entropy.png.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep folders (searched recursively), or a digest.json of an "
                             "earlier report (rebuilds it without the run folders)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table and plots")
    parser.add_argument("--title", default=None, help="heading of table.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not (dirs_exist("gmoe-report", args.dirs) and out_is_folder("gmoe-report", args.out)):
        return 2
    results = collect(args.dirs)
    if not results:
        print(f"gmoe-report: error: no summary.json with a finished seed under "
              f"{', '.join(map(str, args.dirs))}.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    if gains(results):
        table += ("\nGMoE against the plain backbone under the same semantics (same node dropping, "
                  "depth, optimiser and epochs), test metric, Welch's interval over seeds:\n\n"
                  + gain_table(results))
    title = f"# {args.title}\n\n" if args.title else ""
    (args.out / "table.md").write_text(title + table)
    (args.out / "table.tex").write_text(latex_table(results))
    (args.out / "details.md").write_text(title + details_table(results))
    selected = selection(results)
    (args.out / "paper.md").write_text(
        title + comparison_table(results)
        + (f"\nSelected on validation:\n\n{selected}" if selected
           else ""))
    (args.out / DIGEST_FILE).write_text(json.dumps(digest(results), indent=1))
    write_csv(results, args.out / "table.csv")
    metric_per_config(results, args.out / "metric.png")
    validation_curves(results, args.out / "valid_curves.png")
    for plot, path in ((routing_heatmaps, args.out / "routing.png"),
                       (entropy_curves, args.out / "routing_entropy.png")):
        if not plot(results, path) and path.is_file():
            # an earlier report's plot would sit beside this report's tables as if it were theirs
            path.unlink()
            log.info("Removed %s of an earlier report: these runs have no routing to plot.", path)
    print(table, end="")
    print(f"{len(results)} configurations, written to {args.out}")
    return 0


def select_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-select",
        description="Print the overrides of the GMoE configuration with the best mean validation "
                    "metric among the runs under the given folders (the paper's model selection), "
                    "for one backbone, ready for `gmoe-train +experiment=paper_selected $(gmoe-select "
                    "...)`.")
    parser.add_argument("dirs", nargs="+", type=Path, help="search folders (searched recursively)")
    parser.add_argument("--backbone", required=True, choices=("gcn", "gin"))
    parser.add_argument("--dataset", default=None, help="needed when the runs span several datasets")
    args = parser.parse_args(argv)

    if not dirs_exist("gmoe-select", args.dirs, " Run the search first (make reproduce-molbbbp runs "
                      "it before selecting)."):
        return 2
    chosen = {key: ranked for key, ranked in candidates_per_backbone(collect(args.dirs)).items()
              if key[1] == args.backbone and args.dataset in (None, key[0])}
    if len(chosen) != 1:
        problem = ("several datasets; pass --dataset" if chosen else
                   "fewer than two GMoE configurations with a finished seed, so nothing to choose "
                   "from; finish the search (re-running its command resumes it)")
        print(f"gmoe-select: error: the runs under {', '.join(map(str, args.dirs))} hold, for "
              f"backbone '{args.backbone}', {problem}.", file=sys.stderr)
        return 2
    (dataset, _), ranked = next(iter(chosen.items()))
    print(selected_overrides(ranked[0]))
    # why, on stderr: stdout stays the overrides alone, for $(gmoe-select ...)
    scale, metric = display_scale(ranked[0].metric), ranked[0].metric
    print(f"gmoe-select: {dataset} GMoE-{args.backbone.upper()}, mean validation {metric}"
          f"{' × 100' if scale != 1 else ''} ± std over seeds, the chosen first:", file=sys.stderr)
    for r in ranked:
        mean, std = (v * scale for v in r.mean_std("valid"))
        print(f"  {mean_std_text(mean, std, len(r.seeds))}  {seed_count(r)}  {r.label}",
              file=sys.stderr)
    print(f"gmoe-select: {lead_over_runner_up(ranked)}.", file=sys.stderr)
    if warning := unequal_seeds(ranked):
        print(f"gmoe-select: warning: {warning}.", file=sys.stderr)
    if note := shortened_search(ranked[0]):
        print(f"gmoe-select: note: {note}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
