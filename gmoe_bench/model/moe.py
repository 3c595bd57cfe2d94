"""The GMoE layer: n GCN/GIN experts over 1-hop and 2-hop neighbourhoods behind a noisy top-k gate."""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gmoe_bench.model.conv import CONVS
from gmoe_bench.model.gate import NoisyTopKGate, Routing, cv_squared


class HopGraph(NamedTuple):
    """The edges one kind of expert aggregates over (bonds, or 2-hop paths)."""

    edge_index: Tensor  # [2, E]
    edge_attr: Tensor  # [E, F_e]
    deg: Tensor  # [N] degree + 1 over these edges (OGB counts edges by source)


class LayerStats(NamedTuple):
    """What a GMoE layer reports besides its output."""

    importance_loss: Tensor  # CV² of expert importance
    load_loss: Tensor  # CV² of expert load
    expert_counts: Tensor  # [n] nodes routed to each expert (detached)


@contextmanager
def _frozen_norms(module: nn.Module, freeze: bool):
    """Run ``module`` with BatchNorm on running statistics: a single node has no batch variance."""
    if not freeze or not module.training:
        yield
        return
    module.eval()
    try:
        yield
    finally:
        module.train()


class GMoELayer(nn.Module):
    r"""Graph mixture of experts (Wang et al., 2023).

    .. math::
        h_i = \sum_{e \in \mathrm{TopK}(i)} G(x)_{ie}\; \mathrm{BN}_e\big(\mathrm{conv}_e(x)\big)_i

    Experts ``0 .. n-m-1`` aggregate over bonds, experts ``n-m .. n-1`` over 2-hop paths
    (``m = num_hop2``). ``combine="mean"`` divides the sum by ``n`` as the official code does.

    ``dispatch="sparse"`` runs each expert only for the nodes routed to it (their messages need the
    features of their neighbours, which are gathered but not transformed by GIN), so cost follows
    ``k``. Its BatchNorm then normalises over those nodes: the batch it actually processes, as in
    Shazeer et al.'s experts; an expert given a single node in a training step uses its running
    statistics for it. ``dispatch="dense"`` is the official formulation: every expert on every
    node, BatchNorm over all nodes, outputs weighted by gates that are zero for unchosen experts.
    In evaluation both give the same outputs and gradients.
    """

    def __init__(self, backbone: str, emb_dim: int, num_experts: int, num_hop2: int, top_k: int,
                 noisy_gating: bool, combine: str, dispatch: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_hop1 = num_experts - num_hop2
        self.combine = combine
        self.dispatch = dispatch
        conv = CONVS[backbone]
        self.convs = nn.ModuleList(conv(emb_dim, hops=1 if e < self.num_hop1 else 2)
                                   for e in range(num_experts))
        self.norms = nn.ModuleList(nn.BatchNorm1d(emb_dim) for _ in range(num_experts))
        self.gate = NoisyTopKGate(emb_dim, num_experts, top_k, noisy_gating)

    def reset_parameters(self) -> None:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            conv.reset_parameters()
            norm.reset_parameters()
        self.gate.reset_parameters()

    def forward(self, x: Tensor, hop1: HopGraph, hop2: HopGraph | None) -> tuple[Tensor, LayerStats]:
        routing = self.gate(x)
        run = self._sparse if self.dispatch == "sparse" else self._dense
        out = run(x, routing, hop1, hop2)
        if self.combine == "mean":
            out = out / self.num_experts
        counts = torch.bincount(routing.top_index.flatten(), minlength=self.num_experts)
        return out, LayerStats(cv_squared(routing.importance), cv_squared(routing.load), counts)

    def _graph(self, expert: int, hop1: HopGraph, hop2: HopGraph | None) -> HopGraph:
        if expert < self.num_hop1:
            return hop1
        assert hop2 is not None, "hop-2 experts need the hop-2 graph"
        return hop2

    def _dense(self, x: Tensor, routing: Routing, hop1: HopGraph, hop2: HopGraph | None) -> Tensor:
        gates = routing.dense_gates(self.num_experts)  # [N, n]
        out = torch.zeros_like(x)
        for e, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            g = self._graph(e, hop1, hop2)
            y = norm(conv(x, g.edge_index, g.edge_attr, g.deg, x.size(0)))
            out = out + gates[:, e : e + 1] * y
        return out

    def _sparse(self, x: Tensor, routing: Routing, hop1: HopGraph, hop2: HopGraph | None) -> Tensor:
        num_nodes, k = routing.top_index.shape
        n = self.num_experts
        # (node, expert) pairs grouped by expert, nodes ascending within each expert
        pair_expert = routing.top_index.flatten()
        pair_node = torch.arange(num_nodes, device=x.device).repeat_interleave(k)
        order = torch.argsort(pair_expert * num_nodes + pair_node)
        pair_expert, pair_node = pair_expert[order], pair_node[order]
        pair_weight = routing.top_weight.flatten()[order]
        counts = torch.bincount(pair_expert, minlength=n)
        # slot[e, i]: row of node i among expert e's targets, -1 where i is not routed to e
        slot = torch.full((n, num_nodes), -1, dtype=torch.long, device=x.device)
        slot[pair_expert, pair_node] = (torch.arange(pair_expert.numel(), device=x.device)
                                        - (torch.cumsum(counts, 0) - counts)[pair_expert])
        targets = pair_node.split(counts.tolist())
        outputs: list[Tensor] = []
        for experts, graph in ((range(0, self.num_hop1), hop1), (range(self.num_hop1, n), hop2)):
            if len(experts):
                assert graph is not None, "hop-2 experts need the hop-2 graph"
                outputs += self._run_experts(experts, x, graph, routing.top_index, slot, targets)
        y = torch.cat(outputs)  # [N·k, D] in pair order
        return torch.zeros_like(x).index_add(0, pair_node, pair_weight[:, None] * y)

    def _run_experts(self, experts: range, x: Tensor, graph: HopGraph, top_index: Tensor,
                     slot: Tensor, targets: tuple[Tensor, ...]) -> list[Tensor]:
        """Experts ``experts`` (all over ``graph``), each for its routed nodes only: [T_e, D] each.

        Every expert gets its targets first and then the extra neighbours its targets receive
        messages from, with the edges into its targets relabelled to those rows. The relabelling
        is done for all experts at once; only the convolutions run per expert.
        """
        num_nodes, n = x.size(0), self.num_experts
        src, dst = graph.edge_index
        # every edge, once for each expert of its target node that aggregates over this graph
        edge = torch.arange(src.numel(), device=x.device).repeat_interleave(top_index.size(1))
        expert = top_index[dst].flatten()
        keep = (expert >= experts.start) & (expert < experts.stop)
        edge, expert = edge[keep], expert[keep]
        by_expert = torch.argsort(expert, stable=True)
        edge, expert = edge[by_expert], expert[by_expert]
        src_local, dst_local = slot[expert, src[edge]], slot[expert, dst[edge]]
        # number each expert's extra sources (not routed to it) after its targets
        is_extra = src_local < 0
        extra_key, extra_of_edge = torch.unique(expert[is_extra] * num_nodes + src[edge][is_extra],
                                                return_inverse=True)
        extra_expert = extra_key // num_nodes
        extra_counts = torch.bincount(extra_expert, minlength=n)
        extra_rank = (torch.arange(extra_key.numel(), device=x.device)
                      - (torch.cumsum(extra_counts, 0) - extra_counts)[extra_expert])
        target_counts = slot.new_tensor([t.numel() for t in targets])
        src_local[is_extra] = target_counts[expert[is_extra]] + extra_rank[extra_of_edge]

        edge_counts = torch.bincount(expert, minlength=n).tolist()
        extras = (extra_key % num_nodes).split(extra_counts.tolist())
        edge_index = torch.stack([src_local, dst_local]).split(edge_counts, dim=1)
        edge_attr = graph.edge_attr[edge].split(edge_counts)
        outputs = []
        for e in experts:
            num_targets = targets[e].numel()
            if num_targets == 0:
                outputs.append(x.new_zeros(0, x.size(1)))
                continue
            nodes = torch.cat([targets[e], extras[e]])
            conv, norm = self.convs[e], self.norms[e]
            with _frozen_norms(conv, num_targets < 2), _frozen_norms(norm, num_targets < 2):
                y = conv(x[nodes], edge_index[e], edge_attr[e], graph.deg[nodes], num_targets)
                outputs.append(norm(y))
        return outputs
