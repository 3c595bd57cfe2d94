"""All experts of a GMoE layer as one grouped computation, whatever their number.

The (node, expert) pairs a gate chose are laid out per expert, each expert's rows padded to the
largest expert's count: row ``e * width + r`` holds the r-th node (ascending) routed to expert
``e``. Every dense transform is then one batched product over the experts' stacked weights
(``[n, width, D] @ [n, D, D']``), every message pass one gather and one ``index_add`` over the
(edge, expert) pairs of all experts (bonds embedded by one lookup in a table of every expert's
bond-feature combinations), and every BatchNorm one reduction per expert row block. The number of
operations is the same for 4 experts as for 32; the work follows the pairs, i.e. ``k``, plus the
padding of uneven experts.

The weights stay in the experts' own modules (``convs[e]``, ``norms[e]``: the state dict and
the dense reference are unchanged) and are stacked at each call; BatchNorm running statistics are
written back to those modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmoe_bench.model.conv import OGBGCNConv, OGBGINConv, PathBondEncoder


class ExpertSlots(NamedTuple):
    """Where each (node, expert) pair lives in the padded per-expert layout."""

    node: Tensor  # [P] node of each pair, pairs in the gate's order (node-major)
    expert: Tensor  # [P]
    row: Tensor  # [P] row of the pair in the [n * width] layout
    counts: Tensor  # [n] pairs per expert
    width: int  # rows per expert: the largest count


class EdgePairs(NamedTuple):
    """Each edge of one graph, once for every expert of its target that aggregates over it."""

    edge: Tensor  # [Q] edge id in the graph
    expert: Tensor  # [Q]
    src: Tensor  # [Q] source node
    dst: Tensor  # [Q] target node
    row: Tensor  # [Q] the target's row in the layout of (node, expert) pairs


def slots_of(expert: Tensor, node: Tensor, num_experts: int, num_nodes: int) -> ExpertSlots:
    """Lay out pairs per expert (nodes ascending within an expert), padded to the largest expert."""
    counts = torch.bincount(expert, minlength=num_experts)
    width = int(counts.max()) if expert.numel() else 0
    order = torch.argsort(expert * num_nodes + node)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
    return ExpertSlots(node, expert, expert * width + rank, counts, width)


def edge_pairs(edge_index: Tensor, targets: ExpertSlots, experts: range,
               num_nodes: int) -> EdgePairs:
    """The edges into each pair's node, for the pairs whose expert is in ``experts``; the pairs
    must be sorted by node (any number per node)."""
    src, dst = edge_index
    per_node = torch.bincount(targets.node, minlength=num_nodes)  # [N]
    first = torch.cumsum(per_node, 0) - per_node  # first pair of each node
    per_edge = per_node[dst]  # [E]: one copy of the edge per pair of its target
    edge = torch.arange(src.numel(), device=src.device).repeat_interleave(per_edge)
    offset = torch.arange(edge.numel(), device=src.device) - (torch.cumsum(per_edge, 0)
                                                              - per_edge)[edge]
    pair = first[dst[edge]] + offset  # [E·pairs per target]
    expert = targets.expert[pair]
    keep = (expert >= experts.start) & (expert < experts.stop)
    pair, edge = pair[keep], edge[keep]
    return EdgePairs(edge, expert[keep], src[edge], dst[edge], targets.row[pair])


def _rows(layout: Tensor, slots: ExpertSlots) -> Tensor:  # [n * width, C] -> [n, width, C]
    return layout.view(slots.counts.numel(), slots.width, -1)


def grouped_linear(x: Tensor, slots: ExpertSlots, linears: Sequence[nn.Linear]) -> Tensor:
    r"""Each expert's :math:`W_e x + b_e` on its own rows: ``[n * width, D] -> [n * width, D']``."""
    weight = torch.stack([lin.weight for lin in linears])  # [n, D', D]
    bias = torch.stack([lin.bias for lin in linears])  # [n, D']
    out = torch.baddbmm(bias[:, None], _rows(x, slots), weight.transpose(1, 2))
    return out.view(-1, weight.size(1))


def grouped_batch_norm(x: Tensor, slots: ExpertSlots, norms: Sequence[nn.BatchNorm1d]) -> Tensor:
    """Each expert's BatchNorm over its own rows (padding excluded), as ``nn.BatchNorm1d`` would.

    In training an expert with at least two rows normalises with their statistics and updates
    its running statistics; an expert with fewer (a single node has no variance) uses its running
    statistics and leaves them, as in evaluation. Padding rows are masked out of the statistics
    (subtracting their known share instead cancels catastrophically when an expert holds a few
    rows of a wide layout: a negative variance, then NaN).
    """
    n, width = slots.counts.numel(), slots.width
    rows = _rows(x, slots)  # [n, width, C]
    running_mean = torch.stack([norm.running_mean for norm in norms])  # [n, C]
    running_var = torch.stack([norm.running_var for norm in norms])
    mean, var = running_mean, running_var
    training = norms[0].training
    if training:
        count = slots.counts.clamp(min=1)[:, None].to(x.dtype)  # [n, 1]
        present = (torch.arange(width, device=x.device) < slots.counts[:, None])[..., None]
        batch_mean = torch.where(present, rows, 0.0).sum(1) / count
        centred = torch.where(present, rows - batch_mean[:, None], 0.0)
        batch_var = centred.square().sum(1) / count
        use_batch = (slots.counts >= 2)[:, None]
        mean = torch.where(use_batch, batch_mean, running_mean)
        var = torch.where(use_batch, batch_var, running_var)
        with torch.no_grad():
            momentum = norms[0].momentum
            unbiased = batch_var * count / (count - 1).clamp(min=1)
            new_mean = torch.where(use_batch, running_mean.lerp(batch_mean, momentum), running_mean)
            new_var = torch.where(use_batch, running_var.lerp(unbiased, momentum), running_var)
            tracked = [norm.num_batches_tracked for norm in norms]
            new_tracked = torch.stack(tracked) + use_batch.flatten()
            # one write per statistic for all experts and no host sync (a few operations
            # instead of 3n: on a GPU each is a kernel launch)
            torch._foreach_copy_([norm.running_mean for norm in norms], list(new_mean))
            torch._foreach_copy_([norm.running_var for norm in norms], list(new_var))
            torch._foreach_copy_(tracked, list(new_tracked))
    weight = torch.stack([norm.weight for norm in norms])
    bias = torch.stack([norm.bias for norm in norms])
    scale = weight * torch.rsqrt(var + norms[0].eps)  # [n, C]
    out = torch.addcmul((bias - mean * scale)[:, None], rows, scale[:, None])
    return out.view(n * width, -1)


def _encoder_halves(encoder: nn.Module) -> list[nn.ModuleList]:
    """The bond encoders' tables, one list per bond: one for a bond, two for a 2-hop path."""
    if isinstance(encoder, PathBondEncoder):
        return [encoder.first.bond_embedding_list, encoder.second.bond_embedding_list]
    return [encoder.bond_embedding_list]


def _combination_table(tables: Sequence[nn.ModuleList]) -> Tensor:
    """``[n * V_0 V_1 ⋯, D]``: for each expert, every combination of one row per column, summed
    in the column order (so a lookup equals OGB's sum of per-column embeddings)."""
    out = torch.stack([columns[0].weight for columns in tables])  # [n, V_0, D]
    for c in range(1, len(tables[0])):
        column = torch.stack([columns[c].weight for columns in tables])  # [n, V_c, D]
        out = (out[:, :, None] + column[:, None]).flatten(1, 2)
    return out.flatten(0, 1)


def grouped_bond_embedding(edge_attr: Tensor, pairs: EdgePairs, first_expert: int,
                           encoders: Sequence[nn.Module]) -> Tensor:
    """Each pair's bond (or path) embedded by its expert's encoder: ``[Q, D]``.

    Bond features take few values (5 × 6 × 2 for OGB), so each expert's table of every feature
    combination is built (``n × 60`` rows) and each pair is one row lookup per bond.
    """
    halves = [_encoder_halves(encoder) for encoder in encoders]
    out: Tensor | None = None
    offset = 0
    for half in range(len(halves[0])):
        tables = [expert_halves[half] for expert_halves in halves]
        sizes = [table.num_embeddings for table in tables[0]]
        combination = edge_attr.new_zeros(pairs.edge.numel())
        attr = edge_attr.index_select(0, pairs.edge)
        for c, size in enumerate(sizes):
            combination = combination * size + attr[:, offset + c]
        offset += len(sizes)
        index = (pairs.expert - first_expert) * math.prod(sizes) + combination
        rows = _combination_table(tables).index_select(0, index)
        out = rows if out is None else out + rows
    assert out is not None
    return out


class HopPairs(NamedTuple):
    """The edge pairs of one kind of expert (bonds or 2-hop paths) and that graph's data."""

    pairs: EdgePairs
    edge_attr: Tensor  # [E, F_e]
    deg: Tensor  # [N] degree + 1 over this graph
    first_expert: int
    encoders: list[nn.Module]


def grouped_gcn(x: Tensor, targets: ExpertSlots, hops: list[HopPairs], deg: Tensor,
                convs: Sequence[OGBGCNConv], all_sources: Tensor | None = None,
                num_seeds: int = 1) -> Tensor:
    r"""Every expert's :class:`OGBGCNConv` for its routed nodes: ``[n * width, D]``, padding rows 0.

    .. math::
        h_{ie} = \sum_{j \in \mathcal{N}_e(i)} \frac{\mathrm{ReLU}(W_e x_j + b_e + e^{(e)}_{ji})}
        {\sqrt{d_i d_j}} + \frac{\mathrm{ReLU}(W_e x_i + b_e + r_e)}{d_i}

    ``W_e x_j`` is computed once for each (node, expert) pair that sends or receives: the
    routed nodes and their neighbours, laid out per expert like the targets. ``all_sources``
    ``[N, n' D]``, when the caller computed it (cheaper when most nodes send to most experts),
    holds every node's ``W_e x_j + b_e`` for each of the ``n'`` experts of its own seed, expert
    ``e`` of a seed being group ``e · num_seeds + seed``. ``deg`` [P] is each pair's degree over
    its expert's graph.
    """
    num_nodes, n = x.size(0), targets.counts.numel()
    if all_sources is not None:
        per_node = all_sources.size(1) // x.size(1)  # n'
        h = all_sources.reshape(num_nodes * per_node, -1)  # row j·n' + e: W_e x_j + b_e
        source_row = torch.cat([targets.node * per_node + targets.expert // num_seeds,
                                *(h.pairs.src * per_node + h.pairs.expert // num_seeds
                                  for h in hops)])
    else:
        keys = torch.cat([targets.expert * num_nodes + targets.node,
                          *(h.pairs.expert * num_nodes + h.pairs.src for h in hops)])
        unique, inverse = torch.unique(keys, return_inverse=True)
        sources = slots_of(unique // num_nodes, unique % num_nodes, n, num_nodes)
        layout = x.new_zeros(n * sources.width, x.size(1)).index_copy(
            0, sources.row, x.index_select(0, sources.node))
        h = grouped_linear(layout, sources, [conv.linear for conv in convs])
        source_row = sources.row[inverse]
    num_pairs = targets.node.numel()
    root = torch.cat([conv.root_emb.weight for conv in convs])  # [n, D]
    self_loop = F.relu(h.index_select(0, source_row[:num_pairs])
                       + root.index_select(0, targets.expert)) / deg[:, None]
    out = x.new_zeros(n * targets.width, x.size(1)).index_add(0, targets.row, self_loop)
    start = num_pairs
    for hop in hops:
        q = hop.pairs.edge.numel()
        bond = grouped_bond_embedding(hop.edge_attr, hop.pairs, hop.first_expert, hop.encoders)
        deg_inv_sqrt = hop.deg.pow(-0.5)
        norm = deg_inv_sqrt[hop.pairs.src] * deg_inv_sqrt[hop.pairs.dst]
        message = norm[:, None] * F.relu(h.index_select(0, source_row[start : start + q]) + bond)
        out = out.index_add(0, hop.pairs.row, message)
        start += q
    return out


def grouped_gin(x: Tensor, targets: ExpertSlots, hops: list[HopPairs],
                convs: Sequence[OGBGINConv]) -> Tensor:
    r"""Every expert's :class:`OGBGINConv` for its routed nodes: ``[n * width, D]``.

    .. math::
        h_{ie} = \mathrm{MLP}_e\Big((1 + \epsilon_e)\, x_i + \sum_{j \in \mathcal{N}_e(i)}
        \mathrm{ReLU}(x_j + e^{(e)}_{ji})\Big)
    """
    n = targets.counts.numel()
    eps = torch.cat([conv.eps for conv in convs])  # [n]
    self_term = (1 + eps.index_select(0, targets.expert))[:, None] * x.index_select(0, targets.node)
    z = x.new_zeros(n * targets.width, x.size(1)).index_add(0, targets.row, self_term)
    for hop in hops:
        bond = grouped_bond_embedding(hop.edge_attr, hop.pairs, hop.first_expert, hop.encoders)
        z = z.index_add(0, hop.pairs.row, F.relu(x.index_select(0, hop.pairs.src) + bond))
    first = [conv.mlp[0] for conv in convs]
    h = grouped_linear(z, targets, first)
    h = F.relu(grouped_batch_norm(h, targets, [conv.mlp[1] for conv in convs]))
    return grouped_linear(h, targets, [conv.mlp[3] for conv in convs])


def dense_experts(x: Tensor, gates: Tensor, convs: Sequence[nn.Module],
                  norms: Sequence[nn.BatchNorm1d], hops: Sequence[tuple[range, Tensor, Tensor, Tensor]],
                  mask: Tensor | None) -> Tensor:
    r"""Every expert on every node, as one grouped computation, weighted by ``gates`` ``[N, n]``:
    :math:`h_i = \sum_e g_{ie}\, \mathrm{BN}_e(\mathrm{conv}_e(x))_i`. ``[N, D]``.

    The dense layout is known before the data (row ``e · N + i`` holds node ``i`` at expert ``e``),
    so no shape depends on the routing: a CUDA graph can hold it, and its number of operations does
    not grow with ``n``. ``hops``: for each kind of expert, ``(experts, edge_index, edge_attr,
    deg)``. ``mask`` ``[N]`` marks the real rows of a padded batch, which come first (the padding is
    appended); BatchNorm's statistics are taken over them.
    """
    num_nodes, n = x.size(0), len(convs)
    device = x.device
    expert = torch.arange(n, device=device)[:, None].expand(n, num_nodes).flatten()  # expert-major
    node = torch.arange(num_nodes, device=device).repeat(n)
    real = num_nodes if mask is None else mask.sum().long()
    counts = torch.as_tensor(real, device=device).expand(n)
    targets = ExpertSlots(node, expert, expert * num_nodes + node, counts, num_nodes)
    hop_pairs, deg = [], x.new_empty(n * num_nodes)
    for experts, edge_index, edge_attr, hop_deg in hops:
        num_edges = edge_index.size(1)
        edge = torch.arange(num_edges, device=device).repeat(len(experts))
        pair_expert = torch.arange(experts.start, experts.stop, device=device)[:, None].expand(
            len(experts), num_edges).flatten()
        src, dst = edge_index[0, edge], edge_index[1, edge]
        pairs = EdgePairs(edge, pair_expert, src, dst, pair_expert * num_nodes + dst)
        hop_pairs.append(HopPairs(pairs, edge_attr, hop_deg, experts.start,
                                  [convs[e].bond_encoder for e in experts]))
        mine = (expert >= experts.start) & (expert < experts.stop)
        deg = torch.where(mine, hop_deg[node], deg)
    if isinstance(convs[0], OGBGCNConv):
        all_sources = F.linear(x, torch.cat([conv.linear.weight for conv in convs]),
                               torch.cat([conv.linear.bias for conv in convs]))
        y = grouped_gcn(x, targets, hop_pairs, deg, convs, all_sources)
    else:
        y = grouped_gin(x, targets, hop_pairs, convs)
    y = grouped_batch_norm(y, targets, norms)  # [n * N, D]
    return (y.view(n, num_nodes, -1) * gates.T[:, :, None]).sum(0)
