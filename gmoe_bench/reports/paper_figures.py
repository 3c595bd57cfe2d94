"""The paper's figures (Wang et al., 2023, ROC-AUC × 100, mean ± std over 10 seeds)."""

from __future__ import annotations

from typing import Any

PAPER_SEEDS = 10
PAPER_EPOCHS = 100

# (dataset, model family) -> (mean, std)
PAPER = {
    ("ogbg-molbbbp", "GCN"): (68.87, 1.51),
    ("ogbg-molbbbp", "GMoE-GCN"): (70.28, 1.36),
    ("ogbg-molbbbp", "GIN"): (65.5, 1.8),
    ("ogbg-molbbbp", "GMoE-GIN"): (66.93, 1.72),
    ("ogbg-molhiv", "GCN"): (76.06, 0.97),
    ("ogbg-molhiv", "GMoE-GCN"): (77.87, 1.03),
    ("ogbg-molhiv", "GIN"): (75.4, 1.5),
    ("ogbg-molhiv", "GMoE-GIN"): (76.14, 1.03),
}


def family(result: Any) -> str:
    """'GCN', 'GIN', 'GMoE-GCN' or 'GMoE-GIN' for a collected result (a ConfigResult)."""
    backbone = result.config["model"]["backbone"].upper()
    return f"GMoE-{backbone}" if result.config["moe"]["num_experts"] > 0 else backbone


def paper_figure(result: Any) -> tuple[float, float] | None:
    """The paper's (mean, std) × 100 for the result's dataset and model family, if it reports one."""
    if result.metric != "rocauc":
        return None
    return PAPER.get((result.dataset, family(result)))
