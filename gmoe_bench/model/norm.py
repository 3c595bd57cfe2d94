"""BatchNorm over the real rows of a padded batch (the static shapes of CUDA-graph replay)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def batch_norm(x: Tensor, norm: nn.BatchNorm1d, mask: Tensor | None) -> Tensor:
    r"""``norm(x)``, with the training statistics taken over the rows where ``mask`` is 1.

    .. math::
        \mu = \frac{\sum_i m_i x_i}{\sum_i m_i},\quad
        \sigma^2 = \frac{\sum_i m_i (x_i - \mu)^2}{\sum_i m_i},\quad
        y_i = \gamma \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    so the real rows get exactly what ``nn.BatchNorm1d`` gives them without the padding, and the
    running statistics move as they would (unbiased variance, ``momentum``); padding rows come out
    as a row of zeros would. ``mask``: ``[N]``,
    1.0 for a real row and 0.0 for padding; None (or evaluation) is ``norm(x)`` itself. No
    operation depends on the values (no host sync), so the step can be captured in a CUDA graph.
    """
    if mask is None or not norm.training:
        return norm(x)
    assert norm.momentum is not None, "a cumulative-average BatchNorm is not used here"
    # Padding rows are replaced by 0 first (selected, not multiplied: one may hold inf, and
    # 0 · inf would turn the statistics, or their gradients, into NaN).
    real = mask[:, None] > 0  # [N, 1]
    x = torch.where(real, x, 0.0)
    count = mask.sum()
    mean = x.sum(0) / count  # [C]
    var = torch.where(real, (x - mean).square(), 0.0).sum(0) / count
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1).clamp(min=1), norm.momentum)
        norm.num_batches_tracked.add_(1)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return torch.addcmul(norm.bias - mean * scale, x, scale)
