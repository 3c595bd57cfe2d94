"""Dense dispatch (moe.dispatch=dense): the experts as one grouped computation against one expert
at a time (the official code's loop, ``GMoELayer.dense_reference``), side by side in one run.

    python scripts/bench_dense.py                 # CPU, or the GPU when there is one
    python scripts/bench_dense.py --device cuda

GMoE-GCN and GMoE-GIN (k=4, all hop-2 experts, hidden 300/√k) at n ∈ {4, 8, 16}, batch 32 of
ogbg-molhiv from GMOE_DATA_MIRROR (else molecules built here): the median training step (ms) of each.
Writes results/bench/dense_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import fixed_batches, step_benchmark_arguments, time_model

from gmoe_bench.config import ModelConfig, MoEConfig
from gmoe_bench.model import build_model
from gmoe_bench.model.moe import GMoELayer
from gmoe_bench.records import code_commit, hardware


def dense_by(model: torch.nn.Module, grouped: bool) -> torch.nn.Module:
    """``model`` with each GMoE layer's dense dispatch fixed to one form, whatever the device."""
    for layer in model.modules():
        if isinstance(layer, GMoELayer):
            layer._dense = layer.dense_grouped if grouped else layer.dense_reference  # type: ignore[method-assign]
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_benchmark_arguments(parser, repeats=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    started = time.perf_counter()
    device, fixed, dataset = fixed_batches(args)
    rows = []
    for backbone in ("gcn", "gin"):
        for n in args.experts:
            row: dict[str, Any] = {"backbone": backbone, "n": n}
            for label, grouped in (("grouped_ms", True), ("per_expert_ms", False)):
                torch.manual_seed(0)
                model = build_model(ModelConfig(backbone, 5, 300, 0.5, False, "mean"),
                                    MoEConfig(n, n, 4, 1.0, True, "sum", "dense", True, "top_k"),
                                    1).to(device)
                dense_by(model, grouped)
                row[label] = time_model(model, fixed, device, 1, args.repeats)["step_ms"]
            row["ratio"] = row["grouped_ms"] / row["per_expert_ms"]
            print(f"GMoE-{backbone.upper()} n={n} k=4 dense: grouped {row['grouped_ms']:.1f} ms, "
                  f"one expert at a time {row['per_expert_ms']:.1f} ms ({row['ratio']:.2f}×)",
                  flush=True)
            rows.append(row)
    name = hardware(device)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": code_commit(),
              "device": name, "machine": platform.platform(), "torch": torch.__version__,
              "dataset": dataset, "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - started, "rows": rows}
    lines = [f"# Dense dispatch, grouped against one expert at a time: {name}", "",
             f"- command: `{report['command']}`", f"- commit: {report['commit']}",
             f"- machine: {report['machine']}, torch {report['torch']}, "
             f"{report['threads']} threads",
             f"- dataset: {dataset}, batch 32; median of {args.repeats} training steps",
             f"- wall time: {report['wall_seconds']:.0f} s", "",
             "| model (k=4, all hop-2) | grouped ms | one expert at a time ms | ratio |",
             "|---|---|---|---|"]
    lines += [f"| GMoE-{r['backbone'].upper()} n={r['n']} | {r['grouped_ms']:.1f} | "
              f"{r['per_expert_ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    stem = "dense_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"written to {args.out / stem}.md")


if __name__ == "__main__":
    main()
