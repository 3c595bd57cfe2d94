"""Noisy top-k gating (Shazeer et al., 2017) and its load-balance losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.normal import Normal

NOISE_EPSILON = 1e-2  # floor of the noise scale, as in Shazeer et al. and the official GMoE code


def cv_squared(x: Tensor) -> Tensor:
    r"""Squared coefficient of variation :math:`\mathrm{Var}(x) / (\mathrm{mean}(x)^2 + 10^{-10})`.

    Zero when all entries are equal (and for a single entry); grows as ``x`` grows uneven. Uses
    the unbiased variance, as the official GMoE code does.
    """
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


class Routing(NamedTuple):
    """The gate's decision for a set of nodes."""

    top_index: Tensor  # [N, k] chosen experts of each node
    top_weight: Tensor  # [N, k] softmax over the chosen logits
    importance: Tensor  # [n] sum over nodes of the gate values
    load: Tensor  # [n] (smooth estimate of the) number of nodes routed to each expert

    def dense_gates(self, num_experts: int) -> Tensor:  # [N, n], zero for unchosen experts
        gates = self.top_weight.new_zeros(self.top_weight.size(0), num_experts)
        return gates.scatter(1, self.top_index, self.top_weight)


class NoisyTopKGate(nn.Module):
    r"""Routes each node to ``k`` of ``n`` experts.

    .. math::
        H(x) = x W_g + \epsilon \cdot (\mathrm{softplus}(x W_n) + 10^{-2}),\quad \epsilon \sim N(0, 1)
        \qquad G(x) = \mathrm{softmax}(\mathrm{TopK}(H(x), k))

    Noise is added only in training with ``noisy=True``. The load of an expert is the number of
    nodes routed to it, or, while the gate is noisy and ``k < n``, the differentiable sum over
    nodes of the probability of being in the top k (Shazeer et al., Appendix A), so that the load
    loss trains :math:`W_g` and :math:`W_n`. Both weights start at zero, as in the official code.
    """

    def __init__(self, in_dim: int, num_experts: int, top_k: int, noisy: bool) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy = noisy
        self.w_gate = nn.Parameter(torch.zeros(in_dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(in_dim, num_experts))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)

    def forward(self, x: Tensor) -> Routing:  # x: [N, D]
        clean = x @ self.w_gate  # [N, n]
        noisy = self.noisy and self.training
        if noisy:
            noise_std = F.softplus(x @ self.w_noise) + NOISE_EPSILON
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        k = self.top_k
        top_logits, top_index = logits.topk(min(k + 1, self.num_experts), dim=1)
        top_weight = torch.softmax(top_logits[:, :k], dim=1)
        routing = Routing(top_index[:, :k], top_weight, x.new_zeros(0), x.new_zeros(0))
        importance = routing.dense_gates(self.num_experts).sum(0)
        if noisy and k < self.num_experts:
            load = self._prob_in_top_k(clean, logits, noise_std, top_logits).sum(0)
        else:
            load = torch.bincount(routing.top_index.flatten(), minlength=self.num_experts).to(x.dtype)
        return routing._replace(importance=importance, load=load)

    def _prob_in_top_k(self, clean: Tensor, noisy: Tensor, noise_std: Tensor,
                       top_logits: Tensor) -> Tensor:
        """P(expert in top k) per node, resampling only its own noise: [N, n]."""
        threshold_if_in = top_logits[:, self.top_k : self.top_k + 1]  # (k+1)-th largest
        threshold_if_out = top_logits[:, self.top_k - 1 : self.top_k]  # k-th largest
        is_in = noisy > threshold_if_in
        normal = Normal(clean.new_zeros(()), clean.new_ones(()))
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)
