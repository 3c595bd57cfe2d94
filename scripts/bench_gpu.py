"""GPU benchmark: ogbg-molhiv epochs of GCN and GMoE-GCN, their FLOPs and the share of the peak.

    make bench-gpu                                  # on a CUDA machine (make install TORCH_SPEC=...)
    python scripts/bench_gpu.py --device cpu --quick   # a smoke test of the script anywhere

For plain GCN (hidden 300) and GMoE-GCN (n=8, all hop-2, k=4, λ=1, hidden 150), OGB's protocol
(batch 32, Adam 1e-3, 5 layers), on ogbg-molhiv from GMOE_DATA_MIRROR (else molecules built here):
- every batch is collated once and kept on the device (no loader, no host-to-device copies);
- after warm-up steps, the time of whole training epochs and of one evaluation of the valid and test
  splits, with the device synchronised only around the timed regions;
- the matrix-product FLOPs of an epoch (torch's FlopCounterMode on a sample of steps, scaled to the
  epoch) and the share of the device's measured fp32 matrix-product peak that the epoch reaches;
- the projected wall time of the paper's row, 10 seeds × 100 epochs (train and evaluation), seeds
  one after another, and measured with the 10 seeds trained together (``trainer.seeds_per_group``:
  one epoch of all ten, each on its own batch order, and their evaluation).
Writes results/bench/gpu_<device>.{json,md}. By default 300 training batches per model are timed and
scaled to the epoch: about 3 minutes on an H200, estimated from the whole split (``--batches 0``), which
took 8 minutes there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.loader import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REPO, TASK_TYPE, molhiv_or_built, sync

from gmoe_bench.config import ModelConfig, MoEConfig
from gmoe_bench.data.ogb import MolDataset
from gmoe_bench.data.padding import pad_together
from gmoe_bench.engine.graphed import GraphedTrainStep
from gmoe_bench.engine.loop import graphed_step, join, train_step
from gmoe_bench.engine.run import build_optimizer
from gmoe_bench.model import build_model
from gmoe_bench.model.seed_group import group_forward
from gmoe_bench.records import code_commit, hardware

PLAIN = MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", True, "top_k")
MODELS: dict[str, tuple[ModelConfig, MoEConfig]] = {
    "GCN (hidden 300)": (ModelConfig("gcn", 5, 300, 0.5, False, "mean"), PLAIN),
    "GMoE-GCN n=8 all hop-2 k=4 (hidden 150)": (
        ModelConfig("gcn", 5, 300, 0.5, False, "mean"),
        MoEConfig(8, 8, 4, 1.0, True, "sum", "sparse", True, "top_k")),
}
SEEDS, EPOCHS = 10, 100  # the paper's row


def device_batches(data: MolDataset, split: str, batch_size: int, shuffle: bool,
                   device: torch.device, limit: int | None) -> list:
    """The split's batches, collated once and moved to the device."""
    loader = DataLoader(data.graphs[data.split[split]], batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(0))
    out = []
    for b in loader:
        out.append(b.to(device))
        if limit is not None and len(out) == limit:
            break
    return out


def matmul_peak(device: torch.device, size: int) -> float:
    """Measured fp32 FLOP/s of a large square matrix product on ``device``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def kernel_profile(step: Any, batches: list, device: torch.device) -> dict[str, Any]:
    """Per training step: wall ms, ms the GPU spends in kernels and the number of kernels launched.
    Kernel time far below wall time means the step is bound by launches and host work."""
    if device.type != "cuda":
        return {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for b in batches:
            step(b)
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda item: -item[1])[:6]
    return {"profiled_step_ms": 1e3 * wall / len(batches),
            "kernel_ms_per_step": busy_us / 1e3 / len(batches),
            "kernels_per_step": len(kernels) / len(batches),
            "top_kernels_ms_per_step": {name[:70]: us / 1e3 / len(batches) for name, us in top}}


def measure(name: str, model_cfg: ModelConfig, moe: MoEConfig, train: list, evaluation: list,
            device: torch.device, epochs: int, flop_sample: int, together: int,
            epoch_scale: float) -> dict[str, Any]:
    """One model's figures; ``epoch_scale`` (full epoch's batches / timed batches) scales the timed
    batches to a whole epoch."""
    torch.manual_seed(0)
    model = build_model(model_cfg, moe, 1).to(device)
    optimizer = build_optimizer(model, 1e-3)

    def step(b: Any) -> None:
        train_step([model], [optimizer], [b], TASK_TYPE, drop_node_p=0.0, streams=None)

    model.train()
    for b in train[:5]:
        step(b)
    counter = FlopCounterMode(display=False)
    with counter:
        for b in train[:flop_sample]:
            step(b)
    sample_graphs = sum(b.num_graphs for b in train[:flop_sample])
    epoch_graphs = sum(b.num_graphs for b in train) * epoch_scale
    epoch_flops = counter.get_total_flops() * epoch_graphs / sample_graphs

    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for b in train:
            step(b)
    sync(device)
    epoch_seconds = (time.perf_counter() - start) / epochs * epoch_scale

    profile = kernel_profile(step, train[:20], device)
    model.eval()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for b in evaluation:
            model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
    sync(device)
    eval_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    try:
        together_epoch, together_eval = measure_together(model_cfg, moe, train, evaluation,
                                                         device, together)
        together_epoch *= epoch_scale
        together_error = None
    except RuntimeError as error:  # out of memory included: keep the solo figures
        together_epoch = together_eval = math.nan
        together_error = f"{type(error).__name__}: {error}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model is timed on a clean cache
        print(f"{name}: {together} seeds together failed: {together_error}", flush=True)
    groups = math.ceil(SEEDS / together)
    row = {"model": name, "together_epoch_s": together_epoch, "together_eval_s": together_eval,
           "together_row_minutes": groups * EPOCHS * (together_epoch + together_eval) / 60,
           "together_error": together_error, "train_epoch_s": epoch_seconds, "eval_s": eval_seconds,
           "graphs_per_s": epoch_graphs / epoch_seconds, "epoch_matmul_flops": epoch_flops,
           "achieved_flop_per_s": epoch_flops / epoch_seconds,
           "row_minutes": SEEDS * EPOCHS * (epoch_seconds + eval_seconds) / 60,
           "peak_mem_mib": peak, **profile}
    print(f"{name}: train epoch {epoch_seconds:.2f} s, eval {eval_seconds:.2f} s, "
          f"{epoch_flops / 1e12:.2f} TFLOP per epoch, {SEEDS}×{EPOCHS} row ≈ "
          f"{row['row_minutes']:.1f} min one after another, "
          f"{row['together_row_minutes']:.1f} min together; profile {profile}", flush=True)
    return row


def measure_together(model_cfg: ModelConfig, moe: MoEConfig, train: list, evaluation: list,
                     device: torch.device, together: int) -> tuple[float, float]:
    """Seconds of one training epoch of ``together`` seeds trained together
    (``trainer.seeds_per_group``), each on its own batch order, and of their evaluation."""
    models, optimizers, streams = [], [], []
    for seed in range(together):
        torch.manual_seed(seed)
        models.append(build_model(model_cfg, moe, 1).to(device).train())
        optimizers.append(build_optimizer(models[-1], 1e-3))
        streams.append(torch.Generator(device).manual_seed(seed))
    offsets = [7 * seed for seed in range(together)]  # a different batch for each seed at each step

    def step(i: int) -> None:
        train_step(models, optimizers, [train[(i + o) % len(train)] for o in offsets], TASK_TYPE,
                   drop_node_p=0.0, streams=streams)

    for i in range(3):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(len(train)):
        step(i)
    sync(device)
    epoch_seconds = time.perf_counter() - start
    for model in models:
        model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for b in evaluation:
            graph = (b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
            group_forward(models, *join([graph] * together), None)
    sync(device)
    return epoch_seconds, time.perf_counter() - start


def graphed_check(model_cfg: ModelConfig, moe: MoEConfig, train: list, device: torch.device,
                  steps: int = 12) -> float:
    """Largest relative difference between the task losses of ``steps`` steps replayed from CUDA
    graphs and the same steps run eagerly (dropout and gate noise off, learning rate 0 so that
    the GPU's unordered atomic sums cannot grow through Adam into different weights): rounding
    level when each replay computes its own batch's step."""
    model_cfg = dataclasses.replace(model_cfg, dropout=0.0)
    moe = dataclasses.replace(moe, dispatch="dense", noisy_gating=False)
    losses = []
    for capture in (device.type == "cuda", False):  # on a CPU (smoke test) both eager
        torch.manual_seed(0)
        model = build_model(model_cfg, moe, 1).to(device).train()
        step = GraphedTrainStep([model], [build_optimizer(model, 0.0, capturable=capture)],
                                TASK_TYPE, capture=capture)
        losses.append(torch.stack([step(pad_together([b], model.needs_hop2, 32)).losses[0].clone()
                                   for b in train[:steps]]))
    return float(((losses[0] - losses[1]).abs() / losses[1].abs()).max())


def measure_graphed(model_cfg: ModelConfig, moe: MoEConfig, train: list, evaluation: list,
                    device: torch.device, seeds: int) -> dict[str, float]:
    """``seeds`` seeds trained together from CUDA graphs (``trainer.cuda_graphs``; GMoE with dense
    dispatch), each step as the trainer runs it (``graphed_step``: padding and 2-hop paths built
    at every step): seconds of a first pass over ``train`` (warm-up steps and one capture per
    padded shape included) and of a second one (replays only); the seconds of a pass over batches
    padded beforehand (the replays alone); the number of shapes, and the seconds of the seeds'
    evaluation (eager, batches of 4096 graphs)."""
    moe = dataclasses.replace(moe, dispatch="dense")
    models, optimizers = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(build_model(model_cfg, moe, 1).to(device).train())
        optimizers.append(build_optimizer(models[-1], 1e-3, capturable=device.type == "cuda"))
    step = GraphedTrainStep(models, optimizers, TASK_TYPE, capture=device.type == "cuda")
    offsets = [7 * seed for seed in range(seeds)]  # a different batch for each seed at each step
    raw = [[train[(i + o) % len(train)] for o in offsets] for i in range(len(train))]
    groups = [pad_together(batches, models[0].needs_hop2, 32) for batches in raw]
    passes = []
    for run, steps in (("trainer", raw), ("trainer", raw), ("padded", groups)):
        sync(device)
        start = time.perf_counter()
        for batches in steps:
            if run == "trainer":
                graphed_step(step, batches, 0.0, None)
            else:
                step(batches)
        sync(device)
        passes.append(time.perf_counter() - start)
    for model in models:
        model.eval()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for model in models:
            for b in evaluation:
                model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
    sync(device)
    figures: dict[str, Any] = {"first_pass_s": passes[0], "pass_s": passes[1],
                               "prepadded_pass_s": passes[2], "shapes": step.num_graphs,
                               "eval_s": time.perf_counter() - start}
    for model in models:
        model.train()
    return {**figures, **kernel_profile(step, groups[:20], device)}


def graphed_row(name: str, model_cfg: ModelConfig, moe: MoEConfig, train: list,
                evaluation: list, device: torch.device, together: int,
                epoch_scale: float) -> dict[str, Any]:
    """CUDA-graph figures of one model, alone and ``together`` seeds at a time, with the paper's
    row projected from them (captures paid once, replays every epoch)."""
    row: dict[str, Any] = {"model": name, "check_max_loss_diff": math.nan}
    try:
        row["check_max_loss_diff"] = graphed_check(model_cfg, moe, train, device)
    except RuntimeError as error:
        traceback.print_exc()
        row["check_error"] = f"{type(error).__name__}: {error}"[:300]
    for label, seeds in (("solo", 1), ("together", together)):
        try:
            figures = measure_graphed(model_cfg, moe, train, evaluation, device, seeds)
        except RuntimeError as error:
            traceback.print_exc()
            row[f"{label}_error"] = f"{type(error).__name__}: {error}"[:300]
            print(f"{name}: CUDA graphs, {seeds} seed(s) failed: {row[f'{label}_error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        epoch = figures["pass_s"] * epoch_scale
        captures = figures["first_pass_s"] - figures["pass_s"]
        groups = math.ceil(SEEDS / seeds)
        row[label] = {**figures, "epoch_s": epoch, "seeds": seeds,
                      "prepadded_epoch_s": figures["prepadded_pass_s"] * epoch_scale,
                      "row_minutes": (groups * (EPOCHS * (epoch + figures["eval_s"]) + captures)
                                      / 60)}
        print(f"{name}: CUDA graphs, {seeds} seed(s): epoch {epoch:.2f} s (batches padded "
              f"beforehand: {row[label]['prepadded_epoch_s']:.2f} s), eval "
              f"{figures['eval_s']:.2f} s, {figures['shapes']} shapes captured in a first pass of "
              f"{figures['first_pass_s']:.1f} s; {SEEDS}×{EPOCHS} row ≈ {row[label]['row_minutes']:.1f} "
              f"min", flush=True)
    print(f"{name}: graphed against eager losses, largest difference over 12 steps "
          f"{row['check_max_loss_diff']:.2e} (relative, lr 0)", flush=True)
    return row


def _finite(value: Any) -> Any:
    """``value`` with NaN as None: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark: {report['device_name']}", "",
             f"- command: `{report['command']}`", f"- commit: {report['commit']}",
             f"- machine: {report['machine']}, torch {report['torch']}",
             f"- dataset: {report['dataset']}, {report['train_batches']} training batches of 32, "
             f"kept on the device; {report['epochs']} timed pass(es) over them after 5 warm-up "
             f"steps; epoch figures scaled by {report.get('epoch_scale', 1.0):.2f} to a whole epoch",
             f"- measured fp32 matrix-product peak: {report['peak_flop_per_s'] / 1e12:.1f} TFLOP/s",
             f"- wall time of the script: {report['wall_seconds']:.0f} s", ""]
    if report["models"]:  # none with --no-eager
        lines += ["| model | train epoch s | eval s | graphs/s | matmul TFLOP per epoch "
                  f"| share of peak | {SEEDS} seeds × {EPOCHS} epochs, one after another | peak MiB "
                  f"| {report['together']} seeds together: train epoch s | eval s "
                  f"| {SEEDS} × {EPOCHS}, {report['together']} at a time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        peak = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['train_epoch_s']:.2f} | {r['eval_s']:.2f} | "
                     f"{r['graphs_per_s']:.0f} | {r['epoch_matmul_flops'] / 1e12:.3f} | "
                     f"{100 * r['share_of_peak']:.2f}% | {r['row_minutes']:.1f} min | {peak} | "
                     f"{r['together_epoch_s']:.2f} | {r['together_eval_s']:.2f} | "
                     f"{r['together_row_minutes']:.1f} min |")
    lines.append("")
    for r in report["models"]:
        if "kernels_per_step" in r:
            lines.append(f"- {r['model']}, profile of 20 training steps: {r['profiled_step_ms']:.1f} ms "
                         f"per step, of which the GPU is in kernels {r['kernel_ms_per_step']:.1f} ms; "
                         f"{r['kernels_per_step']:.0f} kernels per step")
        if r["together_error"]:
            lines.append(f"- {r['model']}, seeds together failed: {r['together_error']}")
    if report.get("graphed"):
        lines += ["", "## CUDA graphs (trainer.cuda_graphs; GMoE with moe.dispatch=dense)", "",
                  "Padded batches, one graph captured per shape, seeds of a group on parallel "
                  "streams in one graph; evaluation eager on batches of 4096 graphs. Row: "
                  f"{SEEDS} seeds × {EPOCHS} epochs with the captures paid once per group.", "",
                  "Train epoch: each step as the trainer runs it (padding and 2-hop paths built at "
                  "every step); in brackets, over batches padded beforehand (the replays alone).",
                  "",
                  "| model | seeds at a time | train epoch s | eval s (all seeds) | shapes | first pass s "
                  f"| {SEEDS} × {EPOCHS} row "
                  "| graphed against eager loss, 12 steps at lr 0: largest relative difference |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["graphed"]:
            for label in ("solo", "together"):
                if label not in r:
                    lines.append(f"| {r['model']} | {label} | failed: {r.get(label + '_error')} "
                                 "| | | | | |")
                    continue
                g = r[label]
                lines.append(f"| {r['model']} | {g['seeds']} | {g['epoch_s']:.2f} "
                             f"({g['prepadded_epoch_s']:.2f}) | "
                             f"{g['eval_s']:.2f} | {g['shapes']} | {g['first_pass_s']:.1f} | "
                             f"{g['row_minutes']:.1f} min | {r['check_max_loss_diff']:.1e} |")
        lines.append("")  # the notes after the table, not inside it
        for r in report["graphed"]:
            for label in ("solo", "together"):
                g = r.get(label, {})
                if "kernels_per_step" in g:
                    top = ", ".join(f"{name} {ms:.2f}" for name, ms
                                    in g["top_kernels_ms_per_step"].items())
                    lines.append(f"- {r['model']}, {g['seeds']} seed(s), profile of 20 replayed "
                                 f"steps: {g['profiled_step_ms']:.1f} ms per step, kernels "
                                 f"{g['kernel_ms_per_step']:.1f} ms ({g['kernels_per_step']:.0f} "
                                 f"kernels); largest, ms per step: {top}")
            if "check_error" in r:
                lines.append(f"- {r['model']}: the graphed-against-eager check failed: "
                             f"{r['check_error']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=1, help="timed passes over the batches")
    parser.add_argument("--flop-sample", type=int, default=20, help="steps counted for FLOPs")
    parser.add_argument("--quick", action="store_true", help="20 batches per split (smoke test)")
    parser.add_argument("--batches", type=int, default=300,
                        help="time this many training batches, scaled to a whole epoch (0: all)")
    parser.add_argument("--together", type=int, default=SEEDS, help="seeds trained together")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="time the eager step (the default training path)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also train from CUDA graphs (trainer.cuda_graphs), after the eager rows")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device is visible; install a CUDA build of torch "
                 "(make install TORCH_SPEC=...) or pass --device cpu --quick for a smoke test.")
    started = time.perf_counter()
    limit = 20 if args.quick else (args.batches or None)
    with tempfile.TemporaryDirectory() as tmp:
        data, dataset = molhiv_or_built(Path(tmp))
        train = device_batches(data, "train", 32, True, device, limit)
        epoch_scale = 1.0 if args.quick else math.ceil(len(data.split["train"]) / 32) / len(train)
        eval_limit = 20 if args.quick else None  # --batches cuts training only: eval is unscaled
        evaluation = (device_batches(data, "valid", 256, False, device, eval_limit)
                      + device_batches(data, "test", 256, False, device, eval_limit))
        big_evaluation = (device_batches(data, "valid", 4096, False, device, eval_limit)
                          + device_batches(data, "test", 4096, False, device, eval_limit))
    peak = matmul_peak(device, 1024 if args.quick else 8192)
    print(f"{dataset} on {device}: {len(train)} training batches; fp32 matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s", flush=True)
    device_name = hardware(device)
    report = {"device": str(device), "device_name": device_name, "dataset": dataset,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": code_commit(),
              "machine": platform.platform(), "torch": torch.__version__, "epochs": args.epochs,
              "train_batches": len(train), "epoch_scale": epoch_scale, "together": args.together,
              "peak_flop_per_s": peak,
              "models": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    report["graphed"] = []

    def write() -> None:  # after each row: a lease that ends mid-script keeps the finished rows
        report["wall_seconds"] = time.perf_counter() - started
        (args.out / f"{stem}.json").write_text(json.dumps(_finite(report), indent=1))
        (args.out / f"{stem}.md").write_text(markdown(report))

    for name, (model_cfg, moe) in MODELS.items() if args.eager else ():
        row = measure(name, model_cfg, moe, train, evaluation, device, args.epochs,
                      min(args.flop_sample, len(train)), args.together, epoch_scale)
        row["share_of_peak"] = row["achieved_flop_per_s"] / peak
        report["models"].append(row)
        write()
    if args.graphs:  # after the eager rows: a failed capture can leave the device unusable
        for name, (model_cfg, moe) in MODELS.items():
            report["graphed"].append(graphed_row(name, model_cfg, moe, train, big_evaluation,
                                                 device, args.together, epoch_scale))
            write()
    print(f"written to {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
