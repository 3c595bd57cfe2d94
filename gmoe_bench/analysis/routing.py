r"""Does routing follow molecular structure? Expert choices of trained GMoE models per atom class.

For every node of a split and every GMoE layer, the gate's (noise-free) top-k experts are tallied
against three atom properties read from OGB's features: element (C, N, O, other), degree (number
of bonds) and ring membership. Per layer and property the association between class and expert is
Cramér's V over (node, chosen expert) pairs,

.. math::
    V = \sqrt{\frac{\chi^2 / N}{\min(r - 1, c - 1)}},

0 when every class spreads over the experts alike, 1 when the class fixes the expert; and the share
of each class's assignments that go to hop-2 experts. Both are invariant to how experts are
numbered, so they are averaged over seeds (an expert index means nothing across seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_geometric.loader import DataLoader
from torch_geometric.utils import degree

from gmoe_bench.config import Gate
from gmoe_bench.data.ogb import MolDataset, load_dataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, checkpoint_directory
from gmoe_bench.errors import UserError, describe_error
from gmoe_bench.model import MolGNN, build_model
from gmoe_bench.model.gate import Routing
from gmoe_bench.model.moe import GMoELayer
from gmoe_bench.records import mean_std_text
from gmoe_bench.reports.cli import dirs_exist, out_is_folder
from gmoe_bench.reports.table import ConfigResult, collect

# OGB atom features (ogb.utils.features): column 0 is atomic number - 1, column 8 is "in ring".
ATOMIC_NUM_COLUMN, IN_RING_COLUMN = 0, 8


@dataclass(frozen=True)
class AtomProperty:
    name: str
    classes: tuple[str, ...]
    classify: Callable[[Tensor, Tensor], Tensor]  # (x [N, 9], bonds per atom [N]) -> class [N]


def _element(x: Tensor, bonds: Tensor) -> Tensor:
    atomic_num = x[:, ATOMIC_NUM_COLUMN] + 1
    out = torch.full_like(atomic_num, 3)  # other
    for cls, z in enumerate((6, 7, 8)):  # C, N, O
        out[atomic_num == z] = cls
    return out


def _degree(x: Tensor, bonds: Tensor) -> Tensor:
    return (bonds.clamp(min=1, max=4) - 1).long()  # isolated atoms counted with degree 1


def _ring(x: Tensor, bonds: Tensor) -> Tensor:
    return x[:, IN_RING_COLUMN].long()


PROPERTIES = (
    AtomProperty("element", ("C", "N", "O", "other"), _element),
    AtomProperty("degree", ("≤1", "2", "3", "≥4"), _degree),
    AtomProperty("ring", ("chain", "ring"), _ring),
)


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V of a contingency table (rows: classes, columns: experts); empty rows/columns
    are dropped, and a table with a single row or column gives 0."""
    table = table[table.sum(1) > 0][:, table.sum(0) > 0].astype(float)
    if min(table.shape) < 2:
        return 0.0
    total = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / total
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(np.sqrt(chi2 / total / (min(table.shape) - 1)))


@torch.no_grad()
def routing_counts(model: MolGNN, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Per property, counts [L, classes, n] of (node, chosen expert) pairs in evaluation mode."""
    layers = [m for m in model.layers if isinstance(m, GMoELayer)]
    if not layers:
        raise ValueError("the model has no GMoE layers")
    num_experts = layers[0].num_experts
    counts = {p.name: np.zeros((len(layers), len(p.classes), num_experts), dtype=np.int64)
              for p in PROPERTIES}
    chosen: list[Routing] = []
    hooks = [layer.gate.register_forward_hook(lambda _m, _i, out: chosen.append(out))
             for layer in layers]
    model.eval()
    try:
        for batch in loader:
            batch = batch.to(device)
            chosen.clear()
            model(batch.x, batch.edge_index, batch.edge_attr, batch.batch, batch.num_graphs)
            bonds = degree(batch.edge_index[0], batch.num_nodes)
            for prop in PROPERTIES:
                cls = prop.classify(batch.x, bonds)  # [N]
                for layer, routing in enumerate(chosen):  # (node, expert) pairs
                    flat = cls[routing.node] * num_experts + routing.expert
                    tally = torch.bincount(flat, minlength=len(prop.classes) * num_experts)
                    counts[prop.name][layer] += tally.view(len(prop.classes), -1).cpu().numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def chance_v(table: np.ndarray, top_k: int) -> float:
    r"""Cramér's V expected from independence alone, :math:`\sqrt{(r-1)(c-1) / (N \min(r-1, c-1))}`
    (E[χ²] = degrees of freedom), counting N as atoms, not pairs: an atom's k pairs are not
    independent draws, so this is the conservative (higher) level."""
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if min(table.shape) < 2:
        return 0.0
    rows, cols = table.shape
    atoms = table.sum() / top_k
    return float(np.sqrt((rows - 1) * (cols - 1) / (atoms * (min(rows, cols) - 1))))


def structure_statistics(counts: dict[str, np.ndarray], num_hop2: int) -> dict[str, dict]:
    """Per property: Cramér's V per layer, and per layer and class the share going to hop-2."""
    stats = {}
    for name, table in counts.items():  # table: [L, classes, n]
        per_class = table.sum(2).clip(min=1)
        hop2 = table[:, :, table.shape[2] - num_hop2:].sum(2) / per_class if num_hop2 else \
            np.zeros(per_class.shape)
        stats[name] = {"cramers_v": [cramers_v(layer) for layer in table],
                       "hop2_share": hop2.tolist(),
                       "class_pairs": table.sum(2).tolist()}
    return stats


@dataclass
class RoutingAnalysis:
    """The structure statistics of one configuration, per seed."""

    label: str
    dataset: str
    backbone: str
    num_hop2: int
    top_k: int
    seeds: list[int]
    counts: list[dict[str, np.ndarray]]  # per seed: property -> [L, classes, n]

    def statistics(self) -> list[dict[str, dict]]:
        return [structure_statistics(c, self.num_hop2) for c in self.counts]

    def mean_cramers_v(self, prop: str) -> tuple[np.ndarray, np.ndarray]:  # [L] mean, std over seeds
        values = np.array([s[prop]["cramers_v"] for s in self.statistics()])
        return values.mean(0), values.std(0)

    def hop2_share_by_class(self, prop: str) -> np.ndarray:  # [classes], mean over layers and seeds
        return np.mean([np.mean(s[prop]["hop2_share"], axis=0) for s in self.statistics()], axis=0)

    def to_dict(self) -> dict:
        return {"label": self.label, "dataset": self.dataset, "backbone": self.backbone,
                "num_hop2": self.num_hop2,
                "seeds": self.seeds,
                "per_seed": [{"seed": seed, "counts": {k: v.tolist() for k, v in counts.items()},
                              "statistics": stats}
                             for seed, counts, stats in zip(self.seeds, self.counts,
                                                            self.statistics(), strict=True)]}


def markdown_report(analyses: list[RoutingAnalysis], split: str) -> str:
    lines = [f"Routing against atom structure on the {split} split (gate without noise, every "
             "(atom, chosen expert) pair counted). Cramér's V between atom class and expert per "
             "layer, mean ± std over seeds: 0 = every class routed alike, 1 = the class fixes the "
             "expert.", ""]
    for a in analyses:
        num_layers = len(a.mean_cramers_v(PROPERTIES[0].name)[0])
        lines += [f"### {a.dataset}: {a.label} (seeds {', '.join(map(str, a.seeds))})", "",
                  "| property | " + " | ".join(f"layer {i + 1}" for i in range(num_layers)) + " |",
                  "|---|" + "---|" * num_layers]
        for prop in PROPERTIES:
            mean, std = a.mean_cramers_v(prop.name)
            chance = max(chance_v(t, a.top_k) for c in a.counts for t in c[prop.name])
            lines.append(f"| {prop.name} (chance ≤ {chance:.3f}) | " + " | ".join(
                mean_std_text(m, s, len(a.seeds), 3) for m, s in zip(mean, std, strict=True)) + " |")
        num_experts = a.counts[0][PROPERTIES[0].name].shape[2]
        if 0 < a.num_hop2 < num_experts:
            lines += ["", "Share of assignments going to hop-2 experts, mean over layers and seeds "
                      f"(hop-2 experts are {a.num_hop2} of {num_experts}):", ""]
            for prop in PROPERTIES:
                shares = a.hop2_share_by_class(prop.name)
                lines.append(f"- {prop.name}: " + ", ".join(
                    f"{c} {s:.3f}" for c, s in zip(prop.classes, shares, strict=True)))
        lines.append("")
    return "\n".join(lines)


def plot_report(analyses: list[RoutingAnalysis], path_v: str, path_classes: str) -> None:
    """Cramér's V per layer (one row per configuration) and, for each configuration's first seed,
    the expert shares of every (layer, class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROPERTIES), figsize=(5 * len(PROPERTIES), 3.8), squeeze=False)
    for ax, prop in zip(axes[0], PROPERTIES, strict=True):
        for a in analyses:
            mean, std = a.mean_cramers_v(prop.name)
            layers = np.arange(1, len(mean) + 1)
            ax.errorbar(layers, mean, yerr=std, marker="o", capsize=3, label=a.label)
            ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("Cramér's V (class, expert)")
        ax.set_title(f"routing vs {prop.name}")
        ax.set_ylim(0, None)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path_v, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(analyses), len(PROPERTIES),
                             figsize=(4.5 * len(PROPERTIES), 4.5 * len(analyses)), squeeze=False)
    for row, a in zip(axes, analyses, strict=True):
        for ax, prop in zip(row, PROPERTIES, strict=True):
            table = a.counts[0][prop.name]  # [L, classes, n]
            shares = table / table.sum(2, keepdims=True).clip(min=1)
            image = ax.imshow(shares.reshape(-1, shares.shape[2]), cmap="viridis", vmin=0,
                              aspect="auto")
            ax.set_yticks(np.arange(shares.shape[0] * shares.shape[1]),
                          [f"L{layer + 1} {c}" for layer in range(shares.shape[0])
                           for c in prop.classes], fontsize=6)
            num_experts = shares.shape[2]
            if 0 < a.num_hop2 < num_experts:
                ax.axvline(num_experts - a.num_hop2 - 0.5, color="white", linewidth=2)
            ax.set_xlabel("expert (right of the line: hop-2)" if a.num_hop2 else "expert")
            ax.set_title(f"{a.label}, seed {a.seeds[0]}: {prop.name}", fontsize="small")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path_classes, dpi=110)
    plt.close(fig)


def analyse_routing(result: ConfigResult, data: MolDataset, split: str,
                    checkpoint_root: Path | None) -> RoutingAnalysis:
    """Load every seed's best-validation weights and tally its routing on ``split``."""
    cfg = result.typed
    if checkpoint_root is not None:
        cfg.trainer.checkpoint_dir = str(checkpoint_root)
    if result.fingerprint is not None and result.fingerprint != data.fingerprint:
        raise UserError(f"'{result.label}' was trained on other data than {data.folder} holds now "
                        f"(content hash {result.fingerprint}, now {data.fingerprint}); routing it on "
                        "this data would mislead. Restore the data it was trained on.")
    directory = checkpoint_directory(cfg, result.dataset, result.fingerprint)
    loader = DataLoader(data.graphs[data.split[split]], batch_size=cfg.trainer.eval_batch_size)
    counts = []
    for seed in sorted(s["seed"] for s in result.seeds):
        path = SeedCheckpoint(directory, seed).best_model_path
        if not path.is_file():
            raise UserError(f"{path} does not exist: the best-validation weights of seed {seed} of "
                            f"'{result.label}' are not there. Runs made before gmoe-train kept them "
                            "lack them: delete the seed's .json next to it and re-run the same "
                            "command; if the checkpoints were moved, pass --checkpoint-dir.")
        model = build_model(cfg.model, cfg.moe, data.num_tasks)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu"))
        except Exception as err:  # truncated, foreign or of another architecture
            raise UserError(f"{path} cannot be loaded as the weights of seed {seed} of "
                            f"'{result.label}' ({describe_error(err)}). "
                            "Delete the seed's .json beside it and re-run the same command to "
                            "train it again.") from err
        counts.append(routing_counts(model, loader, torch.device("cpu")))
    return RoutingAnalysis(result.label, result.dataset, cfg.model.backbone, cfg.moe.num_hop2,
                           cfg.moe.top_k,
                           sorted(s["seed"] for s in result.seeds), counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gmoe-routing",
        description="Relate the routing of trained GMoE models to atom structure (element, degree, "
                    "ring membership): for every GMoE configuration under the given folders, load "
                    "each seed's best-validation weights (kept in trainer.checkpoint_dir), route "
                    "the chosen split without gate noise, and write routing_structure.md/.json, "
                    "routing_structure.png (Cramér's V per layer) and routing_classes.png.")
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--split", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="checkpoint root, if not the runs' trainer.checkpoint_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not (dirs_exist("gmoe-routing", args.dirs) and out_is_folder("gmoe-routing", args.out)):
        return 2
    # k = n, or the dense gate, routes every node to every expert: no choice to relate to structure.
    results = [r for r in collect(args.dirs) if r.is_gmoe
               and r.typed.moe.top_k < r.typed.moe.num_experts and r.typed.moe.gate != Gate.dense]
    if not results:
        print(f"gmoe-routing: error: no GMoE run that chooses among its experts (top_k < "
              f"num_experts, a gate other than dense) with a finished seed under "
              f"{', '.join(map(str, args.dirs))}.", file=sys.stderr)
        return 2
    datasets: dict[tuple[str, str], MolDataset] = {}  # by (name, root): copies may differ
    analyses = []
    try:
        for result in results:
            key = (result.dataset, result.config["dataset"]["root"])
            if key not in datasets:
                datasets[key] = load_dataset(result.typed.dataset)
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


if __name__ == "__main__":
    raise SystemExit(main())
