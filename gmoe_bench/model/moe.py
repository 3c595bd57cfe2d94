"""The GMoE layer: n GCN/GIN experts over 1-hop and 2-hop neighbourhoods behind a gate (noisy top-k)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmoe_bench.model.conv import CONVS, OGBGCNConv
from gmoe_bench.model.experts import (
    HopPairs,
    dense_experts,
    edge_pairs,
    grouped_batch_norm,
    grouped_gcn,
    grouped_gin,
    slots_of,
)
from gmoe_bench.model.gate import Routing, build_gate, count_pairs, cv_squared
from gmoe_bench.model.norm import batch_norm


class HopGraph(NamedTuple):
    """The edges one kind of expert aggregates over (bonds, or 2-hop paths)."""

    edge_index: Tensor  # [2, E]
    edge_attr: Tensor  # [E, F_e]
    deg: Tensor  # [N] degree + 1 over these edges (OGB counts edges by source)


class LayerStats(NamedTuple):
    """What a GMoE layer reports besides its output."""

    importance_loss: Tensor  # CV² of expert importance ([S]: per seed of a group)
    load_loss: Tensor  # CV² of expert load
    expert_counts: Tensor  # [n] ([S, n]) nodes routed to each expert (detached)


class GMoELayer(nn.Module):
    r"""Graph mixture of experts (Wang et al., 2023).

    .. math::
        h_i = \sum_{e \in \mathrm{TopK}(i)} G(x)_{ie}\; \mathrm{BN}_e\big(\mathrm{conv}_e(x)\big)_i

    Experts ``0 .. n-m-1`` aggregate over bonds, experts ``n-m .. n-1`` over 2-hop paths
    (``m = num_hop2``). ``combine="mean"`` divides the sum by ``n`` as the official code does.

    ``dispatch="sparse"`` runs each expert only for the nodes routed to it (their messages need the
    features of their neighbours, which are gathered but not transformed by GIN), so cost follows
    ``k``; all experts run together as one grouped computation
    (:mod:`gmoe_bench.model.experts`), so the number of operations does not grow with ``n``. Its
    BatchNorm then normalises over those nodes: the batch it actually processes, as in
    Shazeer et al.'s experts; an expert given a single node in a training step uses its running
    statistics for it. ``dispatch="dense"`` is the official formulation: every expert on every
    node, BatchNorm over all nodes, outputs weighted by gates that are zero for unchosen experts.
    In evaluation both give the same outputs and gradients.
    """

    def __init__(self, backbone: str, emb_dim: int, num_experts: int, num_hop2: int, top_k: int,
                 noisy_gating: bool, combine: str, dispatch: str, gate: str = "top_k") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_hop1 = num_experts - num_hop2
        self.combine = combine
        self.dispatch = dispatch
        conv = CONVS[backbone]
        self.convs = nn.ModuleList(conv(emb_dim, hops=1 if e < self.num_hop1 else 2)
                                   for e in range(num_experts))
        self.norms = nn.ModuleList(nn.BatchNorm1d(emb_dim) for _ in range(num_experts))
        self.gate = build_gate(gate, emb_dim, num_experts, top_k, noisy_gating)

    def reset_parameters(self) -> None:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            conv.reset_parameters()
            norm.reset_parameters()
        self.gate.reset_parameters()

    def forward(self, x: Tensor, hop1: HopGraph, hop2: HopGraph | None,
                mask: Tensor | None = None) -> tuple[Tensor, LayerStats]:
        """``mask`` ``[N]`` marks the real rows of a padded batch (1.0; padding 0.0), which alone
        enter BatchNorm statistics, importance, load and counts: dense dispatch only, whose
        shapes do not depend on the routing."""
        routing = self.gate(x, mask)
        if self.dispatch == "sparse":
            if mask is not None:
                raise ValueError("a padded batch (CUDA graphs) needs moe.dispatch=dense: sparse "
                                 "dispatch's shapes follow the routing")
            # with k ≥ n/2 experts per node nearly every node sends to every expert: one product
            # for all is cheaper
            all_sources = None
            if is_gcn(self.convs) and 2 * routing.node.numel() >= self.num_experts * x.size(0):
                all_sources = F.linear(x, torch.cat([conv.linear.weight for conv in self.convs]),
                                       torch.cat([conv.linear.bias for conv in self.convs]))
            out = run_experts(x, routing.node, routing.expert, routing.weight, self.convs,
                              self.norms, self.num_hop1, hop1, hop2, all_sources)
        else:
            out = self._dense(x, routing, hop1, hop2, mask)
        if self.combine == "mean":
            out = out / self.num_experts
        counts = count_pairs(routing.expert, self.num_experts,
                             None if mask is None else mask[routing.node])
        return out, LayerStats(cv_squared(routing.importance), cv_squared(routing.load), counts)

    def _dense(self, x: Tensor, routing: Routing, hop1: HopGraph, hop2: HopGraph | None,
               mask: Tensor | None) -> Tensor:
        # The same sums either way. A GPU step is bound by its number of kernels, which the
        # grouped form keeps independent of n; on a CPU the per-expert loop is faster
        # (results/bench/dense_x86_64_cpu_2_cores.md: grouped 1.13-1.33x slower).
        run = self.dense_grouped if x.is_cuda else self.dense_reference
        return run(x, routing, hop1, hop2, mask)

    def dense_grouped(self, x: Tensor, routing: Routing, hop1: HopGraph, hop2: HopGraph | None,
                      mask: Tensor | None = None) -> Tensor:
        """Dense dispatch with every expert in one grouped computation
        (:func:`~gmoe_bench.model.experts.dense_experts`)."""
        gates = routing.dense_gates(x.size(0), self.num_experts)  # [N, n]
        hops = []
        for experts, graph in ((range(0, self.num_hop1), hop1),
                               (range(self.num_hop1, self.num_experts), hop2)):
            if len(experts):
                assert graph is not None, "hop-2 experts need the hop-2 graph"
                hops.append((experts, graph.edge_index, graph.edge_attr, graph.deg))
        return dense_experts(x, gates, self.convs, self.norms, hops, mask)

    def dense_reference(self, x: Tensor, routing: Routing, hop1: HopGraph, hop2: HopGraph | None,
                        mask: Tensor | None = None) -> Tensor:
        """Dense dispatch one expert at a time, as the official code runs it: what the grouped
        computation must equal (the tests compare them)."""
        gates = routing.dense_gates(x.size(0), self.num_experts)  # [N, n]
        out = torch.zeros_like(x)
        for e, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            g = hop1 if e < self.num_hop1 else hop2
            assert g is not None, "hop-2 experts need the hop-2 graph"
            y = batch_norm(conv(x, g.edge_index, g.edge_attr, g.deg, x.size(0), mask), norm, mask)
            out = out + gates[:, e : e + 1] * y
        return out


def is_gcn(convs: Sequence[nn.Module]) -> bool:
    return isinstance(convs[0], OGBGCNConv)


def run_experts(x: Tensor, node: Tensor, expert: Tensor, weight: Tensor,
                convs: Sequence[nn.Module], norms: Sequence[nn.BatchNorm1d], num_hop1: int,
                hop1: HopGraph, hop2: HopGraph | None, all_sources: Tensor | None = None,
                num_seeds: int = 1) -> Tensor:
    r""":math:`h_i = \sum_p w_p\, \mathrm{BN}_{e_p}(\mathrm{conv}_{e_p}(x))_i` over the pairs
    :math:`p = (i, e_p, w_p)` (node-major), each expert run only for its own nodes, all experts
    as one grouped computation (:mod:`gmoe_bench.model.experts`): ``[N, D]``.

    Experts ``0 .. num_hop1 - 1`` aggregate over ``hop1``, the others over ``hop2``. ``convs``
    and ``norms`` may be any experts: a GMoE layer's, the experts of several seeds' layers, or
    several seeds' backbone layers (each node routed to its own seed's, with weight 1).
    GCN experts may be given ``all_sources``, every node's linear map by every expert of its seed
    (see :func:`~gmoe_bench.model.experts.grouped_gcn`; expert ``e`` of seed ``s`` is then
    ``e · num_seeds + s``).
    """
    num_nodes, num_experts = x.size(0), len(convs)
    if node.numel() == 0:  # no atoms (an empty batch): no expert runs, and none can be shaped
        return torch.zeros_like(x)
    targets = slots_of(expert, node, num_experts, num_nodes)
    hops: list[HopPairs] = []
    deg = x.new_empty(node.numel())
    for experts, graph in ((range(0, num_hop1), hop1), (range(num_hop1, num_experts), hop2)):
        if not len(experts):
            continue
        assert graph is not None, "hop-2 experts need the hop-2 graph"
        pairs = edge_pairs(graph.edge_index, targets, experts, num_nodes)
        hops.append(HopPairs(pairs, graph.edge_attr, graph.deg, experts.start,
                             [convs[e].bond_encoder for e in experts]))
        mine = (targets.expert >= experts.start) & (targets.expert < experts.stop)
        deg = torch.where(mine, graph.deg[node], deg)
    if is_gcn(convs):
        y = grouped_gcn(x, targets, hops, deg, convs, all_sources, num_seeds)
    else:
        y = grouped_gin(x, targets, hops, convs)
    y = grouped_batch_norm(y, targets, norms)  # [n * width, D]
    weighted = weight[:, None] * y.index_select(0, targets.row)
    return torch.zeros_like(x).index_add(0, node, weighted)
