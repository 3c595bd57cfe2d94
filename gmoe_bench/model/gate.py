"""Gates of a GMoE layer: which experts each node goes to, with which weights, and the
load-balance statistics.

``moe.gate`` picks one: ``top_k``, the paper's noisy top-k (Shazeer et al., 2017;
deterministic with ``moe.noisy_gating=false``); ``dense``, a softmax over all experts; ``expert_choice``,
each expert taking its top nodes (Zhou et al., 2022); ``random``, a frozen random top-k with equal
weights, a control without learned routing. Every gate returns a :class:`Routing`: (node, expert,
weight) pairs, node-major, that the layer's dispatch consumes whatever their number per node.
"""

from __future__ import annotations

import math
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
    """A gate's decision for a set of nodes: (node, expert, weight) pairs sorted by node."""

    node: Tensor  # [P]
    expert: Tensor  # [P]
    weight: Tensor  # [P]
    importance: Tensor  # [n] sum over nodes of the gate values
    load: Tensor  # [n] (smooth estimate of the) number of nodes routed to each expert

    def dense_gates(self, num_nodes: int, num_experts: int) -> Tensor:  # [N, n], 0 if unchosen
        gates = self.weight.new_zeros(num_nodes, num_experts)
        return gates.index_put((self.node, self.expert), self.weight)


def _top_k_pairs(top_index: Tensor, top_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[N, k] choices as node-major pairs."""
    num_nodes, k = top_index.shape
    node = torch.arange(num_nodes, device=top_index.device).repeat_interleave(k)
    return node, top_index.flatten(), top_weight.flatten()


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

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Clean logits, the logits used (noisy in training with ``noisy``), and the noise scale."""
        clean = x @ self.w_gate  # [N, n]
        if not (self.noisy and self.training):
            return clean, clean, None
        noise_std = F.softplus(x @ self.w_noise) + NOISE_EPSILON
        return clean, clean + torch.randn_like(clean) * noise_std, noise_std

    def forward(self, x: Tensor) -> Routing:  # x: [N, D]
        clean, logits, noise_std = self.logits(x)
        k = self.top_k
        top_logits, top_index = logits.topk(min(k + 1, self.num_experts), dim=1)
        top_weight = torch.softmax(top_logits[:, :k], dim=1)
        node, expert, weight = _top_k_pairs(top_index[:, :k], top_weight)
        importance = top_weight.new_zeros(x.size(0), self.num_experts).scatter(
            1, top_index[:, :k], top_weight).sum(0)
        if noise_std is not None and k < self.num_experts:
            load = self._prob_in_top_k(clean, logits, noise_std, top_logits).sum(0)
        else:
            load = torch.bincount(expert, minlength=self.num_experts).to(x.dtype)
        return Routing(node, expert, weight, importance, load)

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


class DenseGate(NoisyTopKGate):
    r"""Every node to every expert, weighted by :math:`\mathrm{softmax}(H(x))` over all ``n``
    (``H`` as in :class:`NoisyTopKGate`); the load is then the same for every expert, so only the
    importance term balances. ``top_k`` is not used."""

    def forward(self, x: Tensor) -> Routing:
        _, logits, _ = self.logits(x)
        probs = torch.softmax(logits, dim=1)  # [N, n]
        index = torch.arange(self.num_experts, device=x.device).expand_as(probs)
        node, expert, weight = _top_k_pairs(index, probs)
        load = probs.new_full((self.num_experts,), float(x.size(0)))
        return Routing(node, expert, weight, probs.sum(0), load)


class ExpertChoiceGate(NoisyTopKGate):
    r"""Each expert takes the :math:`C = \lceil kN/n \rceil` nodes with the highest
    :math:`P = \mathrm{softmax}(H(x))` in its column (Zhou et al., 2022), weighted by
    :math:`P_{ie}`: on average k experts per node, some nodes none, every expert exactly C nodes.
    ``C`` follows the number of nodes of the batch."""

    def forward(self, x: Tensor) -> Routing:
        _, logits, _ = self.logits(x)
        probs = torch.softmax(logits, dim=1)  # [N, n]
        num_nodes, n = probs.shape
        capacity = min(num_nodes, math.ceil(self.top_k * num_nodes / n))
        chosen = probs.topk(capacity, dim=0).indices  # [C, n]
        node = chosen.T.flatten()
        expert = torch.arange(n, device=x.device).repeat_interleave(capacity)
        order = torch.argsort(node * n + expert)  # node-major
        node, expert = node[order], expert[order]
        weight = probs[node, expert]
        importance = probs.new_zeros(n).index_add(0, expert, weight)
        load = torch.bincount(expert, minlength=n).to(x.dtype)
        return Routing(node, expert, weight, importance, load)


class RandomGate(nn.Module):
    """A control without learned routing: each node goes to the top ``k`` experts of a frozen
    random projection of its features (drawn at initialisation, the same in training and
    evaluation), each with weight ``1/k``."""

    def __init__(self, in_dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.register_buffer("projection", torch.randn(in_dim, num_experts))

    def reset_parameters(self) -> None:
        self.projection.normal_()

    def forward(self, x: Tensor) -> Routing:
        top_index = (x.detach() @ self.projection).topk(self.top_k, dim=1).indices
        top_weight = x.new_full(top_index.shape, 1.0 / self.top_k)
        node, expert, weight = _top_k_pairs(top_index, top_weight)
        counts = torch.bincount(expert, minlength=self.num_experts).to(x.dtype)
        return Routing(node, expert, weight, counts / self.top_k, counts)


def build_gate(kind: str, in_dim: int, num_experts: int, top_k: int, noisy: bool) -> nn.Module:
    """The gate ``moe.gate`` names (a ``gmoe_bench.config.Gate``)."""
    if kind == "random":
        return RandomGate(in_dim, num_experts, top_k)
    gate = {"top_k": NoisyTopKGate, "dense": DenseGate, "expert_choice": ExpertChoiceGate}[kind]
    return gate(in_dim, num_experts, top_k, noisy)
