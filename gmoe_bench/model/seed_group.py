"""Several seeds of one model trained in lockstep, as one computation.

The seeds' batches are joined into one disjoint graph, seed after seed (``node_sizes`` atoms and
``graph_sizes`` graphs each). Message passing, pooling and everything row-wise run on the joined
graph as for one model. Every per-node (or per-graph) dense transform runs as one grouped product
over the seeds' stacked weights (atoms of seed ``s`` padded to the largest seed's count, as experts
are in :mod:`gmoe_bench.model.experts`): the atom encoder is one lookup in the seeds' stacked
tables; a backbone layer is the expert machinery with each atom routed to its own seed's layer with
weight 1; a GMoE layer is one gate product for all seeds and the ``S × n`` experts grouped as one;
BatchNorm normalises each seed's rows with that seed's statistics; the head is one product.

Each seed keeps everything it has when trained alone: its weights (the models stay separate
modules, the state dicts unchanged), its BatchNorm statistics, and, through ``streams``, its own
random numbers: dropout masks and gate noise for seed ``s`` are drawn from ``streams[s]`` with the
shapes a solo run draws, so a seed's result does not depend on the other seeds of its group (up to
floating-point rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import global_add_pool

from gmoe_bench.model.experts import ExpertSlots, grouped_batch_norm
from gmoe_bench.model.gate import Segments, count_pairs, cv_squared
from gmoe_bench.model.gnn import MolGNN, hop_graphs
from gmoe_bench.model.moe import GMoELayer, HopGraph, LayerStats, is_gcn, run_experts


class GroupOutput(NamedTuple):
    logits: Tensor  # [G, num_tasks]: the graphs of every seed, seed after seed
    aux_loss: Tensor  # [S] each seed's λ-weighted balance loss (0 without experts)
    expert_counts: Tensor | None  # [S, L, n] atoms routed to each expert (detached)


class SeedLayout(NamedTuple):
    """Rows (atoms or graphs) of the seeds, contiguous per seed, and their padded layout."""

    segments: Segments  # seed of each row
    slots: ExpertSlots  # row r of seed s at s * width + r


def seed_layout(sizes: list[int], device: torch.device) -> SeedLayout:
    num_seeds, total = len(sizes), sum(sizes)
    counts = torch.tensor(sizes, device=device)
    index = torch.repeat_interleave(torch.arange(num_seeds, device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    width = max(sizes)
    rows = torch.arange(total, device=device)
    slots = ExpertSlots(rows, index, index * width + rows - starts[index], counts, width)
    return SeedLayout(Segments(index, sizes), slots)


def _padded(x: Tensor, layout: SeedLayout) -> Tensor:  # [N, C] -> [S * width, C]
    slots = layout.slots
    return x.new_zeros(slots.counts.numel() * slots.width, x.size(1)).index_copy(0, slots.row, x)


def _affine(x: Tensor, layout: SeedLayout, weights: Sequence[Tensor],
            biases: Sequence[Tensor]) -> Tensor:
    """``W_s x + b_s`` on the rows of each seed ``s`` (``W_s``: ``[D', D]``): ``[N, D']``."""
    slots = layout.slots
    padded = _padded(x, layout).view(slots.counts.numel(), slots.width, -1)
    out = torch.baddbmm(torch.stack(list(biases))[:, None], padded,
                        torch.stack(list(weights)).transpose(1, 2))
    return out.view(-1, out.size(-1)).index_select(0, slots.row)


def _linear(x: Tensor, layout: SeedLayout, linears: Sequence[nn.Linear]) -> Tensor:
    """Each seed's linear map on its own rows: ``[N, D] -> [N, D']``."""
    return _affine(x, layout, [lin.weight for lin in linears], [lin.bias for lin in linears])


def _batch_norm(x: Tensor, layout: SeedLayout, norms: Sequence[nn.BatchNorm1d]) -> Tensor:
    return grouped_batch_norm(_padded(x, layout), layout.slots, norms).index_select(
        0, layout.slots.row)


def _project(x: Tensor, layout: SeedLayout, weights: Sequence[Tensor]) -> Tensor:
    """``x @ W_s`` for each seed's ``[D, n]`` matrix: ``[N, n]``."""
    slots = layout.slots
    padded = _padded(x, layout).view(slots.counts.numel(), slots.width, -1)
    out = torch.bmm(padded, torch.stack(list(weights)))
    return out.view(-1, out.size(-1)).index_select(0, slots.row)


def _draw(streams: Sequence[torch.Generator], sizes: list[int], columns: int, like: Tensor,
          normal: bool) -> Tensor:
    """Each seed's ``[size, columns]`` uniform (or standard normal) numbers from its own stream."""
    draw = torch.randn if normal else torch.rand
    return torch.cat([draw(size, columns, generator=stream, device=like.device, dtype=like.dtype)
                      for stream, size in zip(streams, sizes, strict=True)])


def _dropout(x: Tensor, p: float, training: bool, layout: SeedLayout,
             streams: Sequence[torch.Generator]) -> Tensor:
    """:func:`~gmoe_bench.model.gnn.dropout` with each seed's mask from its own stream."""
    if not training or p == 0.0:
        return x
    return x * (_draw(streams, layout.segments.sizes, x.size(1), x, normal=False) >= p) / (1.0 - p)


def _mlp(x: Tensor, layout: SeedLayout, mlps: Sequence[nn.Sequential]) -> Tensor:
    """The seeds' MLPs (Linear, BatchNorm, ReLU, ...) on their own rows."""
    for j, module in enumerate(mlps[0]):
        column = [mlp[j] for mlp in mlps]
        if isinstance(module, nn.Linear):
            x = _linear(x, layout, column)
        elif isinstance(module, nn.BatchNorm1d):
            x = _batch_norm(x, layout, column)
        else:
            x = module(x)
    return x


def _atom_embedding(models: Sequence[MolGNN], x: Tensor, layout: SeedLayout) -> Tensor:
    """Each seed's AtomEncoder: per feature, one lookup in the seeds' stacked tables."""
    seed = layout.segments.index
    out: Tensor | None = None
    for i in range(x.size(1)):
        tables = torch.cat([m.atom_encoder.atom_embedding_list[i].weight for m in models])
        vocab = tables.size(0) // len(models)
        rows = tables.index_select(0, seed * vocab + x[:, i])
        out = rows if out is None else out + rows
    assert out is not None
    return out


def _gmoe(layers: Sequence[GMoELayer], x: Tensor, layout: SeedLayout, hop1: HopGraph,
          hop2: HopGraph | None, streams: Sequence[torch.Generator] | None
          ) -> tuple[Tensor, LayerStats]:
    """The seeds' GMoE layers: one gate product, the ``S × n`` experts as one grouped computation
    (expert ``e`` of seed ``s`` is group ``e · S + s``, so hop-1 experts come first)."""
    first, num_seeds = layers[0], len(layers)
    n, num_nodes = first.num_experts, x.size(0)
    gate = first.gate
    projections = [_project(x, layout, [layer.gate.weights[j] for layer in layers])
                   for j in range(len(gate.weights))]
    noise = None
    if gate.draws_noise:
        assert streams is not None, "a noisy gate in training needs the seeds' random streams"
        noise = _draw(streams, layout.segments.sizes, n, x, normal=True)
    routing = gate.route(projections, noise, layout.segments)
    node, expert, weight = routing.node, routing.expert, routing.weight
    if first.dispatch == "dense":  # every expert on every node, weighted 0 where not chosen
        weight = routing.dense_gates(num_nodes, n).flatten()
        node = torch.arange(num_nodes, device=x.device).repeat_interleave(n)
        expert = torch.arange(n, device=x.device).repeat(num_nodes)
    seed = layout.segments.index
    convs = [layer.convs[e] for e in range(n) for layer in layers]
    norms = [layer.norms[e] for e in range(n) for layer in layers]
    all_sources = None  # as GMoELayer: one product when most nodes go to most experts
    if is_gcn(first.convs) and 2 * node.numel() >= n * num_nodes:
        all_sources = _affine(x, layout, [torch.cat([c.linear.weight for c in layer.convs])
                                          for layer in layers],
                              [torch.cat([c.linear.bias for c in layer.convs]) for layer in layers])
    out = run_experts(x, node, expert * num_seeds + seed[node], weight, convs, norms,
                      first.num_hop1 * num_seeds, hop1, hop2, all_sources, num_seeds)
    if first.combine == "mean":
        out = out / n
    counts = count_pairs(seed[routing.node] * n + routing.expert, num_seeds * n)
    return out, LayerStats(cv_squared(routing.importance), cv_squared(routing.load),
                           counts.view(num_seeds, n))


def group_forward(
    models: Sequence[MolGNN],
    x: Tensor,  # [N, 9] atoms of every seed's batch, seed after seed
    edge_index: Tensor,  # [2, E]
    edge_attr: Tensor,  # [E, 3]
    batch: Tensor,  # [N] graph of each atom (graphs numbered across seeds)
    node_sizes: list[int],  # atoms per seed
    graph_sizes: list[int],  # graphs per seed
    streams: Sequence[torch.Generator] | None,  # each seed's random stream (training)
) -> GroupOutput:
    """Every seed's :class:`~gmoe_bench.model.gnn.MolGNN` on its own batch. One model without
    streams is simply its own forward, drawing from torch's global random state as a solo run."""
    num_graphs = sum(graph_sizes)
    if len(models) == 1 and streams is None:
        out = models[0](x, edge_index, edge_attr, batch, num_graphs)
        counts = None if out.expert_counts is None else out.expert_counts[None]
        return GroupOutput(out.logits, out.aux_loss[None], counts)

    first = models[0]
    training = first.training
    if training and first.dropout > 0:
        assert streams is not None, "dropout in training needs the seeds' random streams"
    nodes = seed_layout(node_sizes, x.device)
    graphs = seed_layout(graph_sizes, x.device)
    num_nodes = x.size(0)
    hop1, hop2 = hop_graphs(edge_index, edge_attr, num_nodes, first.needs_hop2)
    ones = x.new_ones(num_nodes, dtype=torch.float)

    def drop(h: Tensor, layout: SeedLayout) -> Tensor:
        return h if streams is None else _dropout(h, first.dropout, training, layout, streams)

    h = _atom_embedding(models, x, nodes)
    virtual = None
    if first.virtual_node is not None:
        virtual = torch.cat([m.virtual_node.weight for m in models]).index_select(
            0, graphs.segments.index)  # [G, D]
    stats: list[LayerStats] = []
    last = len(first.layers) - 1
    for i in range(len(first.layers)):
        layers = [m.layers[i] for m in models]
        if virtual is not None:
            h = h + virtual[batch]
        h_in = h
        if isinstance(layers[0], GMoELayer):
            h, layer_stats = _gmoe(layers, h, nodes, hop1, hop2, streams)
            stats.append(layer_stats)
        else:  # each atom to its own seed's layer, weight 1
            convs = [layer.conv for layer in layers]
            all_sources = _linear(h, nodes, [c.linear for c in convs]) if is_gcn(convs) else None
            h = run_experts(h, nodes.slots.node, nodes.segments.index, ones, convs,
                            [layer.norm for layer in layers], len(layers), hop1, None,
                            all_sources, len(layers))
        h = drop(h if i == last else F.relu(h), nodes)
        if virtual is not None and i < last:
            pooled = global_add_pool(h_in, batch, size=num_graphs) + virtual
            virtual = drop(_mlp(pooled, graphs, [m.virtual_mlps[i] for m in models]), graphs)

    logits = _linear(first.pool(h, batch, size=num_graphs), graphs, [m.head for m in models])
    if not stats:
        return GroupOutput(logits, logits.new_zeros(len(models)), None)
    balance = torch.stack([s.importance_loss + s.load_loss for s in stats]).mean(0)  # [S]
    counts = torch.stack([s.expert_counts for s in stats], dim=1)  # [S, L, n]
    return GroupOutput(logits, first.aux_loss_weight * balance, counts)

