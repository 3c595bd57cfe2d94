"""gmoe-report: turn run and sweep folders into tables (Markdown, CSV, LaTeX) and plots."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gmoe_bench.reports.plots import metric_per_config, routing_heatmaps, validation_curves
from gmoe_bench.reports.table import collect, latex_table, markdown_table, write_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-report",
        description="Collect the summary.json files under the given folders (runs or sweeps; seeds "
                    "of one configuration spread over several jobs are merged) and write table.md, "
                    "table.csv, table.tex, metric.png, valid_curves.png and routing.png.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table and plots")
    parser.add_argument("--title", default=None, help="heading of table.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"gmoe-report: error: {', '.join(map(str, missing))} does not exist.", file=sys.stderr)
        return 2
    results = collect(args.dirs)
    if not results:
        print(f"gmoe-report: error: no summary.json with a finished seed under "
              f"{', '.join(map(str, args.dirs))}.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    title = f"# {args.title}\n\n" if args.title else ""
    (args.out / "table.md").write_text(title + table)
    (args.out / "table.tex").write_text(latex_table(results))
    write_csv(results, args.out / "table.csv")
    metric_per_config(results, args.out / "metric.png")
    validation_curves(results, args.out / "valid_curves.png")
    routing_heatmaps(results, args.out / "routing.png")
    print(table, end="")
    print(f"{len(results)} configurations, written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
