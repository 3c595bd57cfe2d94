"""Gates of a GMoE layer: which experts each node goes to, with which weights, and the
load-balance statistics.

``moe.gate`` picks one: ``top_k``, the paper's noisy top-k (Shazeer et al., 2017;
deterministic with ``moe.noisy_gating=false``); ``dense``, a softmax over all experts; ``expert_choice``,
each expert taking its top nodes (Zhou et al., 2022); ``random``, a frozen random top-k with equal
weights, a control without learned routing. Every gate returns a :class:`Routing`: (node, expert,
weight) pairs, node-major, that the layer's dispatch consumes whatever their number per node.

A gate is split in two steps so that the gates of several seeds trained together
(:mod:`gmoe_bench.model.seed_group`) run as one: :meth:`projections` are the per-node linear maps
(``x @ W``, one product for all seeds there), :meth:`route` the rest, given those products, the
standard normal noise (drawn by the caller, from each seed's own stream) and the seeds' row
:class:`Segments`, over which importance and load are summed per seed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISE_EPSILON = 1e-2  # floor of the noise scale, as in Shazeer et al. and the official GMoE code


def cv_squared(x: Tensor) -> Tensor:
    r"""Squared coefficient of variation :math:`\mathrm{Var}(x) / (\mathrm{mean}(x)^2 + 10^{-10})`
    over the last dimension (``[n] -> []``, ``[S, n] -> [S]``).

    Zero when all entries are equal (and for a single entry); grows as ``x`` grows uneven. Uses
    the unbiased variance, as the official GMoE code does.
    """
    if x.size(-1) < 2:
        return x.new_zeros(x.shape[:-1])
    x = x.float()
    return x.var(-1) / (x.mean(-1) ** 2 + 1e-10)


class Segments(NamedTuple):
    """Rows split into contiguous runs, one per seed of a group trained together."""

    index: Tensor  # [N] run of each row, ascending
    sizes: list[int]  # rows per run


def _per_segment(values: Tensor, segments: Segments | None, mask: Tensor | None) -> Tensor:
    """``[N, n]`` summed over the rows of each segment: ``[S, n]``, or ``[n]`` without segments;
    ``mask`` ``[N]`` (0 for a padding row) leaves rows out."""
    if mask is not None:
        values = torch.where(mask[:, None] > 0, values, 0.0)
    if segments is None:
        return values.sum(0)
    out = values.new_zeros(len(segments.sizes), values.size(1))
    return out.index_add(0, segments.index, values)


def count_pairs(keys: Tensor, size: int, weight: Tensor | None = None) -> Tensor:
    """How many pairs have each key in ``0 .. size-1`` (each counted ``weight`` times): ``[size]``.
    Unlike ``torch.bincount``, the output size does not depend on the values, so on a GPU it
    needs no host sync (and can be captured in a CUDA graph)."""
    ones = torch.ones_like(keys) if weight is None else weight.to(keys.dtype)
    return keys.new_zeros(size).index_add_(0, keys, ones)


def _counts(node: Tensor, expert: Tensor, num_experts: int, segments: Segments | None,
            dtype: torch.dtype, mask: Tensor | None) -> Tensor:
    """Pairs per expert: ``[n]``, or ``[S, n]`` per segment; pairs of padding nodes left out."""
    weight = None if mask is None else mask[node]
    if segments is None:
        return count_pairs(expert, num_experts, weight).to(dtype)
    keys = segments.index[node] * num_experts + expert
    num_segments = len(segments.sizes)
    counts = count_pairs(keys, num_segments * num_experts, weight)
    return counts.view(num_segments, num_experts).to(dtype)


class Routing(NamedTuple):
    """A gate's decision for a set of nodes: (node, expert, weight) pairs sorted by node."""

    node: Tensor  # [P]
    expert: Tensor  # [P]
    weight: Tensor  # [P]
    importance: Tensor  # [n] (or [S, n] per seed) sum over nodes of the gate values
    load: Tensor  # [n] (or [S, n]) (smooth estimate of the) number of nodes routed to each expert

    def dense_gates(self, num_nodes: int, num_experts: int) -> Tensor:  # [N, n], 0 if unchosen
        gates = self.weight.new_zeros(num_nodes, num_experts)
        return gates.index_put((self.node, self.expert), self.weight)


def _top_k_pairs(top_index: Tensor, top_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[N, k] choices as node-major pairs."""
    num_nodes, k = top_index.shape
    # expanded, not repeat_interleave: its output size is not read back from the device
    node = torch.arange(num_nodes, device=top_index.device)[:, None].expand(num_nodes, k).flatten()
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

    @property
    def weights(self) -> list[Tensor]:
        """The per-node linear maps :meth:`route` needs, ``[D, n]`` each."""
        return [self.w_gate, self.w_noise] if self.draws_noise else [self.w_gate]

    @property
    def draws_noise(self) -> bool:
        return self.noisy and self.training

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Routing:  # x: [N, D]
        projections = [x @ w for w in self.weights]  # [N, n] each
        noise = torch.randn_like(projections[0]) if self.draws_noise else None
        return self.route(projections, noise, None, mask)

    def logits(self, projections: list[Tensor], noise: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Clean logits, the logits used (noisy in training with ``noisy``), and the noise scale."""
        clean = projections[0]  # [N, n]
        if noise is None:
            return clean, clean, None
        noise_std = F.softplus(projections[1]) + NOISE_EPSILON
        return clean, clean + noise * noise_std, noise_std

    def route(self, projections: list[Tensor], noise: Tensor | None,
              segments: Segments | None, mask: Tensor | None = None) -> Routing:
        """The routing, given ``x @ w`` for each of :attr:`weights`, standard normal ``noise``
        ``[N, n]`` (when :attr:`draws_noise`), the seeds' segments (None for one seed) and the
        real rows of a padded batch (``mask`` ``[N]``, 0 for padding: left out of importance and
        load; None: every row)."""
        clean, logits, noise_std = self.logits(projections, noise)
        k = self.top_k
        top_logits, top_index = logits.topk(min(k + 1, self.num_experts), dim=1)
        top_weight = torch.softmax(top_logits[:, :k], dim=1)
        node, expert, weight = _top_k_pairs(top_index[:, :k], top_weight)
        importance = _per_segment(top_weight.new_zeros(clean.shape).scatter(
            1, top_index[:, :k], top_weight), segments, mask)
        if noise_std is not None and k < self.num_experts:
            load = _per_segment(self._prob_in_top_k(clean, logits, noise_std, top_logits),
                                segments, mask)
        else:
            load = _counts(node, expert, self.num_experts, segments, clean.dtype, mask)
        return Routing(node, expert, weight, importance, load)

    def _prob_in_top_k(self, clean: Tensor, noisy: Tensor, noise_std: Tensor,
                       top_logits: Tensor) -> Tensor:
        """P(expert in top k) per node, resampling only its own noise: [N, n]."""
        threshold_if_in = top_logits[:, self.top_k : self.top_k + 1]  # (k+1)-th largest
        threshold_if_out = top_logits[:, self.top_k - 1 : self.top_k]  # k-th largest
        is_in = noisy > threshold_if_in
        # the standard normal CDF (torch.distributions.Normal(0, 1).cdf in one operation)
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)


class DenseGate(NoisyTopKGate):
    r"""Every node to every expert, weighted by :math:`\mathrm{softmax}(H(x))` over all ``n``
    (``H`` as in :class:`NoisyTopKGate`); the load is then the same for every expert, so only the
    importance term balances. ``top_k`` is not used."""

    def route(self, projections: list[Tensor], noise: Tensor | None,
              segments: Segments | None, mask: Tensor | None = None) -> Routing:
        _, logits, _ = self.logits(projections, noise)
        probs = torch.softmax(logits, dim=1)  # [N, n]
        index = torch.arange(self.num_experts, device=probs.device).expand_as(probs)
        node, expert, weight = _top_k_pairs(index, probs)
        load = _per_segment(torch.ones_like(probs), segments, mask)  # every node at every expert
        return Routing(node, expert, weight, _per_segment(probs, segments, mask), load)


class ExpertChoiceGate(NoisyTopKGate):
    r"""Each expert takes the :math:`C = \lceil kN/n \rceil` nodes with the highest
    :math:`P = \mathrm{softmax}(H(x))` in its column (Zhou et al., 2022), weighted by
    :math:`P_{ie}`: on average k experts per node, some nodes none, every expert exactly C nodes.
    ``C`` follows the number of nodes of the batch."""

    def route(self, projections: list[Tensor], noise: Tensor | None,
              segments: Segments | None, mask: Tensor | None = None) -> Routing:
        if mask is not None:
            raise ValueError("the expert-choice gate's capacity follows the batch's node count, "
                             "so it cannot run on a padded batch: use moe.gate=top_k or dense")
        _, logits, _ = self.logits(projections, noise)
        probs = torch.softmax(logits, dim=1)  # [N, n]
        n = probs.size(1)
        # each seed's experts choose among that seed's nodes only
        sizes = [probs.size(0)] if segments is None else segments.sizes
        nodes, start = [], 0
        for size in sizes:
            capacity = min(size, math.ceil(self.top_k * size / n))
            nodes.append(probs[start : start + size].topk(capacity, dim=0).indices.T.flatten()
                         + start)  # [n·C]: expert-major
            start += size
        node = torch.cat(nodes)
        expert = torch.cat([torch.arange(n, device=probs.device).repeat_interleave(c.numel() // n)
                            for c in nodes])
        order = torch.argsort(node * n + expert)  # node-major
        node, expert = node[order], expert[order]
        weight = probs[node, expert]
        importance = _per_segment(probs.new_zeros(probs.shape).index_put((node, expert), weight),
                                  segments, None)
        load = _counts(node, expert, n, segments, probs.dtype, None)
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

    draws_noise = False

    def reset_parameters(self) -> None:
        self.projection.normal_()

    @property
    def weights(self) -> list[Tensor]:
        return [self.projection]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        return self.route([x.detach() @ self.projection], None, None, mask)

    def route(self, projections: list[Tensor], noise: Tensor | None,
              segments: Segments | None, mask: Tensor | None = None) -> Routing:
        top_index = projections[0].detach().topk(self.top_k, dim=1).indices
        top_weight = projections[0].new_full(top_index.shape, 1.0 / self.top_k)
        node, expert, weight = _top_k_pairs(top_index, top_weight)
        counts = _counts(node, expert, self.num_experts, segments, top_weight.dtype, mask)
        return Routing(node, expert, weight, counts / self.top_k, counts)


Gate = NoisyTopKGate | RandomGate


def build_gate(kind: str, in_dim: int, num_experts: int, top_k: int, noisy: bool) -> Gate:
    """The gate ``moe.gate`` names (a ``gmoe_bench.config.Gate``)."""
    if kind == "random":
        return RandomGate(in_dim, num_experts, top_k)
    gate = {"top_k": NoisyTopKGate, "dense": DenseGate, "expert_choice": ExpertChoiceGate}[kind]
    return gate(in_dim, num_experts, top_k, noisy)
