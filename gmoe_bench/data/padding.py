"""Batches padded to a few fixed shapes, so that a training step can be captured once per shape as
a CUDA graph and replayed (engine/graphed.py).

Padding atoms form one extra graph of their own, joined only to each other by padding bonds
(self-loops), so no message reaches a real atom; its label is missing (NaN), so it adds no loss, and
the model leaves padding rows out of every statistic (``node_mask``). Graphs are padded to the batch
size with empty graphs whose labels are missing too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from gmoe_bench.data.hop2 import two_hop_edges

# Rows are rounded up to these multiples: few shapes (few graphs to capture), little padding.
NODE_MULTIPLE, EDGE_MULTIPLE = 128, 256


class GraphBatch(Protocol):
    """A collated batch: a PyG ``Batch``, or :class:`Graphs` (after node dropping, say)."""

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    y: Tensor

    @property
    def num_graphs(self) -> int: ...


class Graphs(NamedTuple):
    x: Tensor  # [N, 9]
    edge_index: Tensor  # [2, E]
    edge_attr: Tensor  # [E, 3]
    batch: Tensor  # [N]
    y: Tensor  # [G, T]
    num_graphs: int


class PaddedBatch(NamedTuple):
    x: Tensor  # [N, 9] atom features, padding atoms 0
    edge_index: Tensor  # [2, E]
    edge_attr: Tensor  # [E, 3]
    batch: Tensor  # [N] graph of each atom; padding atoms in the last graph
    y: Tensor  # [G, T] labels, NaN for padding graphs
    node_mask: Tensor  # [N] 1.0 for a real atom, 0.0 for padding
    hop2_index: Tensor  # [2, E2] 2-hop paths ([2, 0] when the model needs none)
    hop2_attr: Tensor  # [E2, 6]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(atoms, bonds, 2-hop paths, graphs): one CUDA graph per distinct shape."""
        return (self.x.size(0), self.edge_index.size(1), self.hop2_index.size(1), self.y.size(0))

    @property
    def num_graphs(self) -> int:
        return self.y.size(0)


def _round_up(count: int, multiple: int) -> int:
    return multiple * math.ceil(count / multiple)


def padded_shape(batch: GraphBatch, hop2: tuple[Tensor, Tensor] | None,
                 batch_size: int) -> tuple[int, int, int, int]:
    """The smallest padded shape for ``batch``: at least one padding atom (the padding graph's)."""
    return (_round_up(batch.x.size(0) + 1, NODE_MULTIPLE),
            _round_up(batch.edge_index.size(1), EDGE_MULTIPLE),
            0 if hop2 is None else _round_up(hop2[0].size(1), EDGE_MULTIPLE),
            batch_size + 1)


def _pad_rows(t: Tensor, rows: int, value: float = 0) -> Tensor:
    return torch.cat([t, t.new_full((rows - t.size(0), *t.shape[1:]), value)])


def _pad_edges(index: Tensor, attr: Tensor, count: int, pad_atom: int) -> tuple[Tensor, Tensor]:
    """``count`` edges: the real ones, then self-loops on a padding atom with features 0."""
    extra = count - index.size(1)
    loops = index.new_full((2, extra), pad_atom)
    return torch.cat([index, loops], 1), _pad_rows(attr, count)


def pad_batch(batch: GraphBatch, hop2: tuple[Tensor, Tensor] | None,
              shape: tuple[int, int, int, int]) -> PaddedBatch:
    """``batch`` (with its 2-hop paths ``hop2`` when the model needs them) padded to ``shape``, as
    :func:`padded_shape` gives it or larger (several seeds' batches padded to their largest)."""
    num_nodes, num_edges, num_hop2, num_graphs = shape
    real_nodes, real_graphs = batch.x.size(0), batch.num_graphs
    real_hop2 = 0 if hop2 is None else hop2[0].size(1)
    if (num_nodes <= real_nodes or num_edges < batch.edge_index.size(1) or num_hop2 < real_hop2
            or num_graphs <= real_graphs):
        raise ValueError(f"shape {shape} is smaller than the batch's "
                         f"{padded_shape(batch, hop2, real_graphs)}")
    pad_atom = real_nodes  # the first padding atom holds every padding bond
    edge_index, edge_attr = _pad_edges(batch.edge_index, batch.edge_attr, num_edges, pad_atom)
    if hop2 is None:
        hop2_index = batch.edge_index.new_zeros(2, 0)
        hop2_attr = batch.edge_attr.new_zeros(0, 2 * batch.edge_attr.size(1))
    else:
        hop2_index, hop2_attr = _pad_edges(*hop2, num_hop2, pad_atom)
    y = batch.y.view(real_graphs, -1).float()
    return PaddedBatch(
        x=_pad_rows(batch.x, num_nodes),
        edge_index=edge_index, edge_attr=edge_attr,
        batch=_pad_rows(batch.batch, num_nodes, num_graphs - 1),
        y=_pad_rows(y, num_graphs, math.nan),
        node_mask=_pad_rows(torch.ones(real_nodes, device=batch.x.device), num_nodes),
        hop2_index=hop2_index, hop2_attr=hop2_attr)


def two_hop_edges_each(batches: Sequence[GraphBatch]) -> list[tuple[Tensor, Tensor]]:
    """:func:`~gmoe_bench.data.hop2.two_hop_edges` of each batch, built in one call over their
    disjoint union (a GPU pays per call, in launches and host syncs, not per path) and split back:
    paths come out in the order of their first bond, so each batch's are contiguous and in the
    order a call of its own gives."""
    if len(batches) == 1:  # nothing to split: no host sync for the counts
        b = batches[0]
        return [two_hop_edges(b.edge_index, b.edge_attr, b.x.size(0))]
    sizes = [b.x.size(0) for b in batches]
    offsets = [0, *itertools.accumulate(sizes)]
    edge_index = torch.cat([b.edge_index + offset for b, offset in zip(batches, offsets, strict=False)], 1)
    edge_attr = torch.cat([b.edge_attr for b in batches])
    index2, attr2 = two_hop_edges(edge_index, edge_attr, offsets[-1])
    owner = torch.bucketize(index2[0], index2.new_tensor(offsets[1:]), right=True)
    counts = torch.bincount(owner, minlength=len(batches)).tolist()  # one host sync for all
    return [(index - offset, attr) for index, attr, offset
            in zip(index2.split(counts, 1), attr2.split(counts), offsets, strict=False)]


def pad_together(batches: Sequence[GraphBatch], needs_hop2: bool,
                 batch_size: int | None = None) -> list[PaddedBatch]:
    """Each batch (one per seed of a group) padded to the same shape, the smallest that holds all,
    with ``batch_size`` graphs (default: the largest batch's) and the padding graph; 2-hop paths
    built first when ``needs_hop2``."""
    batch_size = batch_size or max(b.num_graphs for b in batches)
    hop2s: Sequence[tuple[Tensor, Tensor] | None] = (
        two_hop_edges_each(batches) if needs_hop2 else [None] * len(batches))
    shapes = [padded_shape(b, h, batch_size) for b, h in zip(batches, hop2s, strict=True)]
    shape = tuple(max(column) for column in zip(*shapes, strict=True))
    return [pad_batch(b, h, shape) for b, h in zip(batches, hop2s, strict=True)]  # type: ignore[arg-type]
