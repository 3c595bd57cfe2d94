"""gmoe-report: turn run and sweep folders into tables (Markdown, CSV, LaTeX) and plots."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch_geometric.loader import DataLoader

from gmoe_bench.config import validate
from gmoe_bench.data.ogb import MolDataset, load_dataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, checkpoint_directory
from gmoe_bench.errors import UserError, describe_error
from gmoe_bench.model import build_model
from gmoe_bench.reports.paper import (
    best_per_backbone,
    comparison_table,
    selected_overrides,
    selection,
)
from gmoe_bench.reports.plots import (
    entropy_curves,
    metric_per_config,
    routing_heatmaps,
    validation_curves,
)
from gmoe_bench.reports.routing import (
    RoutingAnalysis,
    markdown_report,
    plot_report,
    routing_counts,
)
from gmoe_bench.reports.table import (
    DIGEST_FILE,
    ConfigResult,
    collect,
    details_table,
    digest,
    gain_table,
    gains,
    latex_table,
    markdown_table,
    write_csv,
)


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
                    "routing entropy), paper.md (next to the paper's figures), digest.json (configs, "
                    "commands, per-seed figures and curves), metric.png, "
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
    routing_heatmaps(results, args.out / "routing.png")
    entropy_curves(results, args.out / "routing_entropy.png")
    print(table, end="")
    print(f"{len(results)} configurations, written to {args.out}")
    return 0


def analyse_routing(result: ConfigResult, data: MolDataset, split: str,
                    checkpoint_root: Path | None) -> RoutingAnalysis:
    """Load every seed's best-validation weights and tally its routing on ``split``."""
    cfg = validate(OmegaConf.create(result.config))
    config = result.config
    if checkpoint_root is not None:
        config = {**config, "trainer": {**config["trainer"], "checkpoint_dir": str(checkpoint_root)}}
    if result.fingerprint is not None and result.fingerprint != data.fingerprint:
        raise UserError(f"'{result.label}' was trained on other data than {data.folder} holds now "
                        f"(content hash {result.fingerprint}, now {data.fingerprint}); routing it on "
                        "this data would mislead. Restore the data it was trained on.")
    directory = checkpoint_directory(config, result.dataset, result.fingerprint)
    loader = DataLoader(data.graphs[data.split[split]], batch_size=cfg.trainer.eval_batch_size)
    counts = []
    for seed in sorted(s["seed"] for s in result.seeds):
        path = SeedCheckpoint(directory, seed).best_model_path
        if not path.is_file():
            raise UserError(f"{path} does not exist: the best-validation weights of seed {seed} of "
                            f"'{result.label}' are not there. They are kept by gmoe-train since "
                            "commit 94a5e0c: for a run made before, delete the seed's .json next to it "
                            "and re-run the same command; if the checkpoints were moved, pass "
                            "--checkpoint-dir.")
        model = build_model(cfg.model, cfg.moe, data.num_tasks)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu"))
        except Exception as err:  # truncated, foreign or of another architecture
            raise UserError(f"{path} cannot be loaded as the weights of seed {seed} of "
                            f"'{result.label}' ({describe_error(err)}). "
                            "Delete the seed's .json beside it and re-run the same command to "
                            "train it again.") from err
        counts.append(routing_counts(model, loader, torch.device("cpu")))
    return RoutingAnalysis(result.label, result.dataset, cfg.moe.num_hop2, cfg.moe.top_k,
                           sorted(s["seed"] for s in result.seeds), counts)


def routing_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-routing",
        description="Relate the routing of trained GMoE models to atom structure (element, degree, "
                    "ring membership): for every GMoE configuration under the given folders, load "
                    "each seed's best-validation weights (kept in trainer.checkpoint_dir), route "
                    "the chosen split without gate noise, and write routing_structure.md/.json, "
                    "routing_structure.png (Cramér's V per layer) and routing_classes.png.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep folders (searched recursively), or a digest.json of an "
                             "earlier report (rebuilds it without the run folders)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--split", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="checkpoint root, if not the runs' trainer.checkpoint_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not (dirs_exist("gmoe-routing", args.dirs) and out_is_folder("gmoe-routing", args.out)):
        return 2
    # k = n routes every node to every expert: there is no choice to relate to structure.
    results = [r for r in collect(args.dirs)
               if 0 < r.config["moe"]["top_k"] < r.config["moe"]["num_experts"]]
    if not results:
        print(f"gmoe-routing: error: no GMoE run with top_k < num_experts and a finished seed under "
              f"{', '.join(map(str, args.dirs))}.", file=sys.stderr)
        return 2
    datasets: dict[tuple[str, str], MolDataset] = {}  # by (name, root): copies may differ
    analyses = []
    try:
        for result in results:
            key = (result.dataset, result.config["dataset"]["root"])
            if key not in datasets:
                datasets[key] = load_dataset(validate(OmegaConf.create(result.config)).dataset)
            analyses.append(analyse_routing(result, datasets[key], args.split,
                                            args.checkpoint_dir))
    except UserError as err:
        print(f"gmoe-routing: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown_report(analyses, args.split)
    (args.out / "routing_structure.md").write_text(report)
    (args.out / "routing_structure.json").write_text(
        json.dumps([a.to_dict() for a in analyses], indent=1))
    plot_report(analyses, str(args.out / "routing_structure.png"),
                str(args.out / "routing_classes.png"))
    print(report, end="")
    print(f"{len(analyses)} configurations, written to {args.out}")
    return 0


def select_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-select",
        description="Print the overrides of the GMoE configuration with the best mean validation "
                    "metric among the runs under the given folders (the paper's model selection), "
                    "for one backbone, ready for `gmoe-train +experiment=paper_selected $(gmoe-select "
                    "...)`.")
    parser.add_argument("dirs", nargs="+", type=Path, help="search folders (searched recursively)")
    parser.add_argument("--backbone", required=True, help="gcn or gin")
    parser.add_argument("--dataset", default=None, help="needed when the runs span several datasets")
    args = parser.parse_args(argv)

    if not dirs_exist("gmoe-select", args.dirs, " Run the search first (make reproduce-molbbbp runs "
                      "it before selecting)."):
        return 2
    chosen = {key: r for key, r in best_per_backbone(collect(args.dirs)).items()
              if key[1] == args.backbone and args.dataset in (None, key[0])}
    if len(chosen) != 1:
        problem = ("several datasets; pass --dataset" if chosen else
                   "fewer than two GMoE configurations with a finished seed, so nothing to choose "
                   "from; finish the search (re-running its command resumes it)")
        print(f"gmoe-select: error: the runs under {', '.join(map(str, args.dirs))} hold, for "
              f"backbone '{args.backbone}', {problem}.", file=sys.stderr)
        return 2
    print(selected_overrides(next(iter(chosen.values()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
