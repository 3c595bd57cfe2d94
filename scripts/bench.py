"""Benchmark: training-step and inference speed of GCN/GIN and GMoE, hop-2 edges, data loading.

    python scripts/bench.py                      # CPU (or --device cuda), writes results/bench/
    python scripts/bench.py --quick              # a smaller grid, for a first look

Measures on real molecule batches (ogbg-molhiv from GMOE_DATA_MIRROR when given, else molecules
built here with rdkit), hidden 150 (plain backbones also at 300, the FLOP-matched partner of GMoE
at k=4), 5 layers, batch sizes 32 and 128:
- training step (forward, backward, Adam step) and inference (graphs/s): median of timed repeats
  after warm-up, over a fixed set of pre-collated batches; the share of the step spent in the
  optimizer; peak memory on CUDA;
- plain GCN/GIN, and GMoE with n ∈ {4, 8, 16, 32}, k ∈ {1, 2, 4}, m ∈ {0, n/2}, dispatch sparse
  (all experts of a layer as one grouped computation) and dense (the reference), at the first
  batch size; at the others (4× the work per step) the core comparisons only: plain, and n=8,
  m=4, k ∈ {1, 4} under both dispatches;
- the time to build hop-2 edges for the whole dataset, and the share of a training epoch spent
  waiting for data.
Ratios within one run are the figures that matter: absolute times vary on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.loader import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gmoe_bench.config import DatasetConfig, ModelConfig, MoEConfig  # noqa: E402
from gmoe_bench.data.hop2 import two_hop_edges  # noqa: E402
from gmoe_bench.data.ogb import MolDataset, load_dataset  # noqa: E402
from gmoe_bench.engine.loop import train_step  # noqa: E402
from gmoe_bench.engine.run import build_optimizer  # noqa: E402
from gmoe_bench.model import build_model  # noqa: E402
from gmoe_bench.records import code_commit, hardware  # noqa: E402

HIDDEN = 150
LAYERS = 5
TASK_TYPE = "binary classification"  # ogbg-molhiv's, and the built molecules' single label


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def built_molecules(folder: Path) -> MolDataset:
    """About 3,000 drug-like molecules from substituted scaffolds, when no mirror is given."""
    # rdkit only here: a GPU machine given the mirror runs the benchmarks without it.
    from gmoe_bench.data.from_smiles import write_ogb_folder

    scaffolds = ["c1ccccc1", "c1ccncc1", "C1CCNCC1", "c1ccc2ccccc2c1", "C1CCOC1", "c1cc[nH]c1"]
    groups = ["C", "CC", "O", "N", "C(=O)O", "Cl", "F", "C(F)(F)F", "OC", "C#N", "C(=O)N", "S"]
    smiles = [f"{a}C({g1})C{b}{g2}" for a in scaffolds for b in scaffolds for g1 in groups
              for g2 in groups][:3000]
    labels = np.array([[float(i % 7 == 0)] for i in range(len(smiles))])
    index = np.arange(len(smiles))
    write_ogb_folder(folder / "ogbg_molhiv", smiles, labels,
                     {"train": index[index % 10 >= 2], "valid": index[index % 10 == 0],
                      "test": index[index % 10 == 1]})
    return load_dataset(DatasetConfig("ogbg-molhiv", str(folder / "root"), str(folder), 0.0))


def molhiv_or_built(folder: Path) -> tuple[MolDataset, str]:
    """ogbg-molhiv from $GMOE_DATA_MIRROR, else the built molecules (in ``folder``); and its name."""
    mirror = os.environ.get("GMOE_DATA_MIRROR")
    if mirror:
        root = os.environ.get("GMOE_DATA_ROOT", "data")
        return (load_dataset(DatasetConfig("ogbg-molhiv", root, mirror, 0.0)),
                "ogbg-molhiv (mirror)")
    data = built_molecules(folder)
    return data, f"{len(data.graphs)} molecules built by the script"


def step_benchmark_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options every step benchmark takes: device, repeats, CPU threads, output folder."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")


def fixed_batches(args: argparse.Namespace) -> tuple[torch.device, list, str]:
    """The device, 4 pre-collated batches of 32 on it and the dataset's name, after setting the
    CPU threads (the arguments of :func:`step_benchmark_arguments`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data, dataset = molhiv_or_built(Path(tmp))
        return device, batches(data, 32, 4, device), dataset


def batches(data: MolDataset, batch_size: int, count: int, device: torch.device) -> list:
    loader = DataLoader(data.graphs[data.split["train"][: batch_size * count]],
                        batch_size=batch_size)
    return [b.to(device) for b in loader]


def time_model(model: torch.nn.Module, fixed: list, device: torch.device, warmup: int,
               repeats: int) -> dict[str, float]:
    """Median training-step time (ms), the optimizer's share of it, inference graphs/s and peak
    CUDA memory (MiB)."""
    optimizer = build_optimizer(model, 1e-3)
    optimizer_seconds: list[float] = []
    optimizer_started: list[float] = []

    def before_optimizer(*_: Any) -> None:
        sync(device)
        optimizer_started.append(time.perf_counter())

    def after_optimizer(*_: Any) -> None:
        sync(device)
        optimizer_seconds.append(time.perf_counter() - optimizer_started.pop())

    optimizer.register_step_pre_hook(before_optimizer)
    optimizer.register_step_post_hook(after_optimizer)

    def step(b: Any) -> None:
        train_step([model], [optimizer], [b], TASK_TYPE, drop_node_p=0.0, streams=None)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(fixed[i % len(fixed)])
    times = []
    optimizer_seconds.clear()
    for i in range(repeats):
        b = fixed[i % len(fixed)]
        sync(device)
        start = time.perf_counter()
        step(b)
        sync(device)
        times.append(time.perf_counter() - start)
    model.eval()
    graphs = 0
    with torch.no_grad():
        for b in fixed[:warmup]:
            model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        sync(device)
        start = time.perf_counter()
        for b in fixed:
            model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
            graphs += b.num_graphs
        sync(device)
        infer_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"step_ms": 1e3 * statistics.median(times),
            "optimizer_share": sum(optimizer_seconds) / sum(times),
            "infer_graphs_per_s": graphs / infer_seconds, "peak_mem_mib": peak}


def model_grid(experts: list[int], tops: list[int],
               splits: list[str]) -> list[tuple[str, int, MoEConfig | None]]:
    """(backbone, hidden size, GMoE settings or None for the plain backbone)."""
    grid: list[tuple[str, int, MoEConfig | None]] = []
    for backbone in ("gcn", "gin"):
        grid += [(backbone, HIDDEN, None), (backbone, 2 * HIDDEN, None)]
        for n in experts:
            for k in tops:
                for m in [0 if split == "hop1" else n // 2 for split in splits]:
                    for dispatch in ("sparse", "dense"):
                        grid.append((backbone, HIDDEN, MoEConfig(n, m, k, 1.0, True, "sum",
                                                                 dispatch, False, "top_k")))
    return grid


def hop2_seconds(data: MolDataset) -> float:
    """Build hop-2 edges for every graph of the dataset, in batches of 128 (data loading excluded)."""
    total = 0.0
    for b in DataLoader(data.graphs, batch_size=128):
        start = time.perf_counter()
        two_hop_edges(b.edge_index, b.edge_attr, b.num_nodes)
        total += time.perf_counter() - start
    return total


def data_wait_share(data: MolDataset, device: torch.device, max_batches: int) -> dict[str, float]:
    """One training pass of plain GCN (batch 32) with the real loader: time waiting for batches."""
    model = build_model(ModelConfig("gcn", LAYERS, HIDDEN, 0.5, False, "mean"),
                        MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", False, "top_k"), 1).to(device)
    optimizer = build_optimizer(model, 1e-3)
    loader = DataLoader(data.graphs[data.split["train"]], batch_size=32, shuffle=True)
    wait = 0.0
    start = time.perf_counter()
    fetched = time.perf_counter()
    for i, b in enumerate(loader):
        b = b.to(device)
        wait += time.perf_counter() - fetched
        train_step([model], [optimizer], [b], TASK_TYPE, drop_node_p=0.0, streams=None)
        sync(device)
        fetched = time.perf_counter()
        if i + 1 == max_batches:
            break
    total = time.perf_counter() - start
    return {"batches": i + 1, "epoch_part_s": total, "data_wait_s": wait, "data_share": wait / total}


def markdown(report: dict[str, Any]) -> str:
    rows = report["models"]
    lines = [f"# Benchmark: {report['device_name']}", "",
             f"- command: `{report['command']}`", f"- commit: {report['commit']}",
             f"- machine: {report['machine']}, torch {report['torch']}, {report['threads']} threads",
             f"- dataset: {report['dataset']}; hidden {HIDDEN} unless given, {LAYERS} layers; median of "
             f"{report['repeats']} steps after {report['warmup']} warm-up steps",
             f"- hop-2 edges for all {report['hop2']['graphs']} graphs: "
             f"{report['hop2']['seconds']:.2f} s",
             f"- data wait in a training pass (GCN, batch 32, {report['data']['batches']} "
             f"batches): {100 * report['data']['data_share']:.1f}% of "
             f"{report['data']['epoch_part_s']:.2f} s", "", "## Goals", ""]
    lines += [f"- {g['goal']}: **{g['value']:.2f}** ({'met' if g['met'] else 'missed'})"
              for g in report["goals"]]
    lines += ["", "## Step times", "",
              "| backbone | hidden | n | m | k | dispatch | batch | step ms | optimizer share | "
              "infer graphs/s | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['backbone']} | {r['hidden']} | {r['n']} | {r['m']} | {r['k']} | "
                     f"{r['dispatch']} | {r['batch_size']} | {r['step_ms']:.1f} | "
                     f"{100 * r['optimizer_share']:.0f}% | {r['infer_graphs_per_s']:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def step(backbone: str, n: int, k: int, m: int, dispatch: str, bs: int,
             hidden: int = HIDDEN) -> float | None:
        for r in rows:
            if (r["backbone"], r["hidden"], r["n"], r["k"], r["m"], r["dispatch"],
                    r["batch_size"]) == (backbone, hidden, n, k, m, dispatch, bs):
                return r["step_ms"]
        return None

    out = []
    for bs, backbone in [(bs, b) for bs in sorted({r["batch_size"] for r in rows})
                         for b in ("gcn", "gin")]:
        checks = [
            ("dispatch/dense, n=8 k=1", step(backbone, 8, 1, 4, "sparse", bs),
             step(backbone, 8, 1, 4, "dense", bs), 0.4),
            ("dispatch/dense, n=8 k=4", step(backbone, 8, 4, 4, "sparse", bs),
             step(backbone, 8, 4, 4, "dense", bs), 0.75),
            ("k=1: n=32 / n=4", step(backbone, 32, 1, 16, "sparse", bs),
             step(backbone, 4, 1, 2, "sparse", bs), 1.3),
            ("GMoE n=8 k=1 / plain", step(backbone, 8, 1, 4, "sparse", bs),
             step(backbone, 0, 0, 0, "-", bs), 2.5),
            (f"GMoE n=8 k=4 (hidden {HIDDEN}) / plain at hidden {2 * HIDDEN}",
             step(backbone, 8, 4, 4, "sparse", bs), step(backbone, 0, 0, 0, "-", bs, 2 * HIDDEN),
             1.5),
        ]
        for name, num, den, limit in checks:
            if num is not None and den is not None:
                out.append({"goal": f"{backbone} {name} ≤ {limit} (batch {bs}, m=n/2)",
                            "value": num / den, "met": num / den <= limit})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="n ∈ {4, 8}, k ∈ {1, 4} only")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data, dataset = molhiv_or_built(Path(tmp))
        print(f"{dataset} on {device}", flush=True)
        hop2 = {"graphs": len(data.graphs), "seconds": hop2_seconds(data)}
        print(f"hop-2 edges for {hop2['graphs']} graphs: {hop2['seconds']:.2f} s", flush=True)
        data_share = data_wait_share(data, device, max_batches=300)
        print(f"data wait: {100 * data_share['data_share']:.1f}% of a training pass", flush=True)

        rows = []
        full = (model_grid([4, 8], [1, 4], ["hop1", "half"]) if args.quick
                else model_grid([4, 8, 16, 32], [1, 2, 4], ["hop1", "half"]))
        core = model_grid([8], [1, 4], ["half"])
        for i, batch_size in enumerate(args.batch_sizes):
            fixed = batches(data, batch_size, args.batches, device)
            for backbone, hidden, moe in full if i == 0 else core:
                torch.manual_seed(0)
                moe_cfg = moe or MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", False, "top_k")
                model = build_model(ModelConfig(backbone, LAYERS, hidden, 0.5, False, "mean"),
                                    moe_cfg, 1).to(device)
                timing = time_model(model, fixed, device, args.warmup, args.repeats)
                row = {"backbone": backbone, "hidden": hidden, "n": moe_cfg.num_experts,
                       "m": moe_cfg.num_hop2,
                       "k": moe_cfg.top_k if moe else 0, "dispatch": moe_cfg.dispatch if moe else "-",
                       "batch_size": batch_size, **timing}
                rows.append(row)
                print(f"{backbone} h={hidden} n={row['n']} m={row['m']} k={row['k']} {row['dispatch']} "
                      f"bs={batch_size}: step {row['step_ms']:.1f} ms, "
                      f"{row['infer_graphs_per_s']:.0f} graphs/s", flush=True)

    report = {"device": str(device), "device_name": hardware(device), "dataset": dataset,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": code_commit(),
              "machine": platform.platform(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
              "hop2": hop2, "data": data_share, "models": rows, "goals": goals(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    for g in report["goals"]:
        print(f"{g['goal']}: {g['value']:.2f} ({'met' if g['met'] else 'missed'})")
    print(f"written to {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
