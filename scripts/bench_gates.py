"""Benchmark: training-step time of each gate (``moe.gate``) side by side, in one run.

    python scripts/bench_gates.py --threads 1     # writes results/bench/gates_<device>.md

GMoE-GCN and GMoE-GIN with n=8 (4 hop-2), k=2, hidden 150, 5 layers, sparse dispatch, on 4 fixed
batches of 32 graphs (ogbg-molhiv from GMOE_DATA_MIRROR when given, else built molecules), the
plain backbones at hidden 150 beside them; median training step (forward, backward, Adam) after
warm-up. Also the (node, expert) pairs per node and the CV² of the expert load of one forward pass
at initialisation (routing after training is in the runs' summaries, not here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import HIDDEN, LAYERS, fixed_batches, step_benchmark_arguments, time_model

from gmoe_bench.config import Gate, ModelConfig, MoEConfig
from gmoe_bench.model import build_model
from gmoe_bench.model.gate import cv_squared
from gmoe_bench.records import code_commit, hardware

NUM_EXPERTS, NUM_HOP2, TOP_K = 8, 4, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_benchmark_arguments(parser, repeats=7)
    args = parser.parse_args()
    started = time.perf_counter()
    device, fixed, dataset = fixed_batches(args)
    lines = ["| backbone | gate | step (ms) | × plain | pairs per node | CV² of load at init |",
             "|---|---|---|---|---|---|"]
    for backbone in ("gcn", "gin"):
        config = ModelConfig(backbone, LAYERS, HIDDEN, 0.5, False, "mean")
        torch.manual_seed(0)
        plain = build_model(config, MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", False,
                                              "top_k"), 1).to(device)
        plain_ms = time_model(plain, fixed, device, 2, args.repeats)["step_ms"]
        lines.append(f"| {backbone} | plain | {plain_ms:.1f} | 1.00 | – | – |")
        for gate in Gate:
            torch.manual_seed(0)
            moe = MoEConfig(NUM_EXPERTS, NUM_HOP2, TOP_K, 1.0, True, "sum", "sparse", False, gate)
            model = build_model(config, moe, 1).to(device)
            b = fixed[0]
            layer = model.layers[0]
            with torch.no_grad():
                routing = layer.gate(model.atom_encoder(b.x))
            pairs = routing.node.numel() / b.num_nodes
            load = cv_squared(torch.bincount(routing.expert, minlength=NUM_EXPERTS)).item()
            step_ms = time_model(model, fixed, device, 2, args.repeats)["step_ms"]
            lines.append(f"| {backbone} | {gate} | {step_ms:.1f} | {step_ms / plain_ms:.2f} | "
                         f"{pairs:.2f} | {load:.3f} |")
            print(lines[-1], flush=True)
    report = "\n".join([
        f"# Step time per gate ({device.type})", "",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`, commit {code_commit()}",
        f"- hardware: {hardware(device)}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s); data: {dataset}; wall time {time.perf_counter() - started:.0f} s",
        f"- GMoE n={NUM_EXPERTS} (hop-2: {NUM_HOP2}), k={TOP_K}, hidden {HIDDEN}, {LAYERS} layers, "
        "batch 32, sparse dispatch; median of the timed steps after 2 warm-up steps", "",
        *lines, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gates_{device.type}.md"
    path.write_text(report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
