"""The task loss of a batch of graphs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def task_loss(logits: Tensor, y: Tensor, task_type: str) -> Tensor:
    """BCE-with-logits (classification) or MSE (regression) over the labelled entries only.
    Masked rather than indexed, so its shapes never depend on the labels: no host sync, and a
    CUDA graph can hold it; a batch with no labels gives 0."""
    y = y.view(logits.shape).to(logits.dtype)
    labelled = ~torch.isnan(y)
    y = torch.where(labelled, y, 0.0)
    if "classification" in task_type:
        per_entry = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    else:
        per_entry = F.mse_loss(logits, y, reduction="none")
    return torch.where(labelled, per_entry, 0.0).sum() / labelled.sum().clamp(min=1)
