"""Hop-2 edges: one directed edge i→k for every 2-hop path i→j→k of a molecule graph."""

from __future__ import annotations

import torch
from torch import Tensor


def two_hop_edges(
    edge_index: Tensor,  # [2, E] directed edges (both directions of each bond)
    edge_attr: Tensor,  # [E, F_e] bond features
    num_nodes: int,
) -> tuple[Tensor, Tensor]:
    r"""All paths :math:`i \to j \to k` with :math:`k \ne i` and :math:`k \notin \mathcal{N}(i)`.

    Each path gives one edge ``i→k`` (two paths between the same atoms give two edges) whose
    features are the concatenation ``[attr(i→j), attr(j→k)]``, shape ``[E2, 2·F_e]``. Built with
    index arithmetic over the whole (batched) graph: the out-edges of ``j`` are a contiguous block
    once edges are sorted by source, so every first edge is paired with that block.
    """
    src, dst = edge_index
    device = edge_index.device
    order = torch.argsort(src, stable=True)
    out_degree = torch.bincount(src, minlength=num_nodes)
    block_start = torch.cumsum(out_degree, 0) - out_degree  # [N] first sorted edge leaving each node

    pairs_per_edge = out_degree[dst]  # [E] second edges that follow each first edge
    first = torch.repeat_interleave(torch.arange(src.numel(), device=device), pairs_per_edge)
    pair_start = torch.cumsum(pairs_per_edge, 0) - pairs_per_edge
    offset = torch.arange(first.numel(), device=device) - pair_start[first]
    second = order[block_start[dst[first]] + offset]

    i, k = src[first], dst[second]
    is_neighbour = torch.isin(i * num_nodes + k, src * num_nodes + dst)
    keep = (k != i) & ~is_neighbour
    first, second = first[keep], second[keep]
    hop2_index = torch.stack([src[first], dst[second]])
    hop2_attr = torch.cat([edge_attr[first], edge_attr[second]], dim=1)
    return hop2_index, hop2_attr
