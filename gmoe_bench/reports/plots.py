"""PNG plots of collected results: metric per configuration, validation curves, expert routing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from gmoe_bench.reports.table import ConfigResult, entropy_curve


def metric_per_config(results: list[ConfigResult], path: Path) -> None:
    """Test (bars, std error bars) and validation (dots) metric of each configuration."""
    datasets = sorted({r.dataset for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 0.5 * len(results) + 2),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in results if r.dataset == dataset]
        y = np.arange(len(rows))
        test = np.array([r.mean_std("test") for r in rows])
        valid = np.array([r.mean_std("valid") for r in rows])
        ax.barh(y, test[:, 0], xerr=test[:, 1], color="tab:blue", alpha=0.8, label="test")
        ax.errorbar(valid[:, 0], y, xerr=valid[:, 1], fmt="o", color="tab:orange", label="valid")
        ax.set_yticks(y, [f"{r.label} ({len(r.seeds)})" for r in rows])
        low = min(test[:, 0].min(), valid[:, 0].min())
        ax.set_xlim(max(0.0, low - 0.1), None)
        ax.set_xlabel(f"{rows[0].metric} (mean ± std over seeds)")
        ax.set_title(dataset)
        # below the axes: inside, it would hide a configuration's validation dot
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validation_curves(results: list[ConfigResult], path: Path) -> None:
    """Mean validation metric per epoch (shaded: ± std over seeds), one line per configuration."""
    datasets = sorted({r.dataset for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in results if r.dataset == dataset):
            length = min(len(s["epochs"]) for s in r.seeds)
            curves = np.array([[e["valid"] for e in s["epochs"][:length]] for s in r.seeds])
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, curves.mean(0), label=r.label)
            ax.fill_between(epochs, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0),
                            alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {r.metric}")
        ax.set_title(dataset)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def routing_heatmaps(results: list[ConfigResult], path: Path) -> bool:
    """Share of nodes routed to each expert per layer at each seed's best validation epoch (the
    weights the metrics come from, and all a report rebuilt from a digest keeps), mean over seeds.

    Returns False (and writes nothing) when no configuration has experts whose shares the gate
    leaves free (:attr:`~gmoe_bench.reports.table.ConfigResult.shares_fixed`).
    """
    def at_best(seed: dict) -> list[list[float]]:
        return seed["epochs"][seed["best_epoch"] - 1]["routing"]

    moe = [r for r in results if not r.shares_fixed and all(at_best(s) for s in r.seeds)]
    if not moe:
        return False
    cols = min(4, len(moe))
    rows = -(-len(moe) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(moe):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, moe, strict=False):
        shares = np.mean([at_best(s) for s in r.seeds], axis=0)  # [L, n]
        image = ax.imshow(shares, cmap="viridis", vmin=0, aspect="auto")
        num_hop2 = r.config["moe"]["num_hop2"]
        if num_hop2:
            ax.axvline(shares.shape[1] - num_hop2 - 0.5, color="white", linewidth=2)
        ax.set_xlabel("expert (right of the line: hop-2)" if num_hop2 else "expert")
        ax.set_yticks(range(shares.shape[0]), [str(i + 1) for i in range(shares.shape[0])])
        ax.set_ylabel("layer")
        ax.set_title(f"{r.dataset}\n{r.label}", fontsize="small")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def entropy_curves(results: list[ConfigResult], path: Path) -> bool:
    """Routing entropy (mean over layers and seeds) per epoch, one line per GMoE configuration:
    a falling line is the gate collapsing onto fewer experts. False (no file) without GMoE whose
    shares the gate leaves free."""
    # every seed needs every epoch's entropy (digests written before they kept it have none)
    moe = [(r, curves) for r in results if not r.shares_fixed
           and None not in (curves := [entropy_curve(s) for s in r.seeds])]
    if not moe:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, curves in moe:
        length = min(len(c) for c in curves)
        mean = np.array([c[:length] for c in curves]).mean(0)
        ax.plot(np.arange(1, length + 1), mean, label=f"{r.dataset} {r.label}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("routing entropy (1 = uniform over experts)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
