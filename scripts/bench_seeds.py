"""Benchmark: seeds trained together (``trainer.seeds_per_group``) against the same seeds one after
another and as parallel processes, side by side in one run.

    python scripts/bench_seeds.py                 # writes results/bench/seeds_<device>.md
    python scripts/bench_seeds.py --seeds 4 --batches 20   # a first look

One ogbg-molbbbp training epoch (GMOE_DATA_MIRROR; else built molecules) through the engine's own
``train_epoch``, for plain GCN (hidden 300) and GMoE-GCN (n=8, 4 hop-2 experts, k=4, hidden
300/√4 = 150: the FLOP-matched pair), batch 32, dropout 0.5, each seed with its own data order:
- one after another: each seed alone (``seeds_per_group=1``), all threads;
- together: all seeds as one group, all threads;
- parallel processes: one process per core, each with one thread and its share of the seeds
  one after another (what ``hydra/launcher=parallel`` does with one seed per job).
Wall seconds of the whole epoch of all seeds; throughput ratios within the run are what matter.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch_geometric.loader import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LAYERS, REPO, built_molecules

from gmoe_bench.config import DatasetConfig, ModelConfig, MoEConfig
from gmoe_bench.data.ogb import MolDataset, load_dataset
from gmoe_bench.engine.loop import train_epoch
from gmoe_bench.engine.run import build_optimizer, seed_everything, seed_stream
from gmoe_bench.model import build_model
from gmoe_bench.records import code_commit, hardware

MODELS = {
    "GCN (hidden 300)": MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", True, "top_k"),
    "GMoE-GCN n=8 hop2=4 k=4 (hidden 150)": MoEConfig(8, 4, 4, 1.0, True, "sum", "sparse", True,
                                                      "top_k"),
}


def molbbbp_or_built(folder: Path) -> tuple[MolDataset, str]:
    mirror = os.environ.get("GMOE_DATA_MIRROR")
    if mirror and (Path(mirror) / "ogbg_molbbbp").is_dir():
        config = DatasetConfig(name="ogbg-molbbbp", root=str(folder), mirror=mirror, drop_node_p=0.0)
        return load_dataset(config), "ogbg-molbbbp"
    return built_molecules(folder), "built molecules (no GMOE_DATA_MIRROR)"


def epoch_seconds(data: MolDataset, moe: MoEConfig, seeds: list[int], together: bool,
                  max_batches: int) -> float:
    """Wall seconds of one training epoch (the first ``max_batches`` batches) of ``seeds``."""
    device = torch.device("cpu")
    graphs = data.graphs[data.split["train"]][: max_batches * 32 if max_batches else None]
    runs = []
    for seed in seeds:
        seed_everything(seed)
        model = build_model(ModelConfig("gcn", LAYERS, 300, 0.5, False, "mean"), moe, 1)
        stream = seed_stream(device) if together else None
        loader = DataLoader(graphs, batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        runs.append((model, build_optimizer(model, 1e-3), loader, stream))
    start = time.perf_counter()
    if together:
        train_epoch([r[0] for r in runs], [r[2] for r in runs], [r[1] for r in runs], device,
                    data.task_type, 0.0, False, [r[3] for r in runs])
    else:
        for model, optimizer, loader, _ in runs:
            train_epoch([model], [loader], [optimizer], device, data.task_type, 0.0, False, None)
    return time.perf_counter() - start


def _worker(folder: str, name: str, seeds: list[int], max_batches: int, ready: Any,
            go: Any) -> None:
    torch.set_num_threads(1)
    data, _ = molbbbp_or_built(Path(folder))
    ready.put(True)
    go.wait()  # every process loaded its data: the timed part starts together
    epoch_seconds(data, MODELS[name], seeds, together=False, max_batches=max_batches)


def parallel_seconds(folder: Path, name: str, seeds: list[int], processes: int,
                     max_batches: int) -> float:
    """Wall seconds from the moment every process is ready until the last one finishes."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Queue(), context.Event()
    shares = [share for share in (seeds[i::processes] for i in range(processes)) if share]
    workers = [context.Process(target=_worker, args=(str(folder), name, share, max_batches, ready,
                                                     go)) for share in shares]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get()
    start = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=0,
                        help="train on the first N batches only (0: the whole epoch)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the single-process rows (0: every core)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    lines = ["| model | one after another (s) | together (s) | parallel processes (s) | "
             "together × faster than one after another | than parallel |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        data, dataset = molbbbp_or_built(Path(tmp))
        for name, moe in MODELS.items():
            solo = epoch_seconds(data, moe, seeds, together=False, max_batches=args.batches)
            together = epoch_seconds(data, moe, seeds, together=True, max_batches=args.batches)
            parallel = parallel_seconds(Path(tmp), name, seeds, cores, args.batches)
            lines.append(f"| {name} | {solo:.1f} | {together:.1f} | {parallel:.1f} | "
                         f"{solo / together:.2f} | {parallel / together:.2f} |")
            print(lines[-1], flush=True)
    epoch = f"the first {args.batches} batches of" if args.batches else "one"
    text = "\n".join([
        f"# Seeds together vs one after another vs parallel processes ({dataset})", "",
        f"{len(seeds)} seeds, {epoch} training epoch each, batch 32, 5 layers, dropout 0.5. "
        f"Single-process rows use {torch.get_num_threads()} torch threads; parallel processes: "
        f"{cores}, one thread each.", "",
        f"Command: `python scripts/bench_seeds.py {' '.join(sys.argv[1:])}`  ",
        f"Commit: {code_commit()}  ", f"Hardware: {hardware(torch.device('cpu'))}  ",
        f"Wall time of the benchmark: {time.perf_counter() - started:.0f} s", "", *lines, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
