"""Graph-level predictor: OGB's GNN (atom encoder, L message-passing layers, pooling, linear head),
with plain GCN/GIN layers or GMoE layers."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from ogb.graphproppred.mol_encoder import AtomEncoder
from torch import Tensor, nn
from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool
from torch_geometric.utils import degree

from gmoe_bench.data.hop2 import two_hop_edges
from gmoe_bench.model.conv import CONVS, lookup_sum
from gmoe_bench.model.moe import GMoELayer, HopGraph, LayerStats
from gmoe_bench.model.norm import batch_norm

POOLS = {"mean": global_mean_pool, "sum": global_add_pool, "max": global_max_pool}


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, as F.dropout; the mask from rand_like is ~3× faster on CPU than bernoulli_."""
    if not training or p == 0.0:
        return x
    return x * (torch.rand_like(x) >= p) / (1.0 - p)


class BackboneLayer(nn.Module):
    """One layer of OGB's GNN: convolution, then BatchNorm."""

    def __init__(self, backbone: str, emb_dim: int) -> None:
        super().__init__()
        self.conv = CONVS[backbone](emb_dim, hops=1)
        self.norm = nn.BatchNorm1d(emb_dim)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, x: Tensor, hop1: HopGraph, hop2: HopGraph | None,
                mask: Tensor | None = None) -> tuple[Tensor, None]:
        h = self.conv(x, hop1.edge_index, hop1.edge_attr, hop1.deg, x.size(0), mask)
        return batch_norm(h, self.norm, mask), None


def hop_graphs(edge_index: Tensor, edge_attr: Tensor, num_nodes: int, needs_hop2: bool,
               hop2_edges: tuple[Tensor, Tensor] | None = None) -> tuple[HopGraph, HopGraph | None]:
    """The bonds, and the 2-hop paths when a hop-2 expert needs them (``hop2_edges`` when the
    caller built them, as :func:`~gmoe_bench.data.hop2.two_hop_edges` does), with their degrees."""
    hop1 = HopGraph(edge_index, edge_attr, degree(edge_index[0], num_nodes) + 1)
    if not needs_hop2:
        return hop1, None
    if hop2_edges is None:
        hop2_edges = two_hop_edges(edge_index, edge_attr, num_nodes)
    index2, attr2 = hop2_edges
    return hop1, HopGraph(index2, attr2, degree(index2[0], num_nodes) + 1)


class ModelOutput(NamedTuple):
    logits: Tensor  # [G, num_tasks]
    aux_loss: Tensor  # λ · mean over layers of CV²(importance) + CV²(load); 0 without experts
    expert_counts: Tensor | None  # [L, n] nodes routed to each expert per layer (detached)


def _virtual_node_mlp(emb_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(emb_dim, 2 * emb_dim), nn.BatchNorm1d(2 * emb_dim), nn.ReLU(),
        nn.Linear(2 * emb_dim, emb_dim), nn.BatchNorm1d(emb_dim), nn.ReLU(),
    )


def _run_mlp(mlp: nn.Sequential, x: Tensor, mask: Tensor | None) -> Tensor:
    """``mlp(x)``, its BatchNorms over the rows where ``mask`` is 1."""
    for module in mlp:
        x = batch_norm(x, module, mask) if isinstance(module, nn.BatchNorm1d) else module(x)
    return x


class MolGNN(nn.Module):
    r"""OGB's molecular GNN.

    .. math::
        h^{(0)} = \mathrm{AtomEncoder}(x),\quad
        h^{(l+1)} = \mathrm{Dropout}(\mathrm{ReLU}(\mathrm{Layer}_l(h^{(l)}))),\quad
        \hat y = W\, \mathrm{Pool}(h^{(L)}) + b

    (no ReLU after the last layer; JK = last). ``layers`` holds each ``Layer``: conv + BatchNorm
    (:class:`BackboneLayer`) or a :class:`GMoELayer` (built by ``build_model``). With
    ``virtual_node``, a per-graph virtual node is added to every atom before each layer and updated
    by an MLP, as in OGB.
    """

    def __init__(self, num_tasks: int, emb_dim: int, num_layers: int, dropout: float,
                 virtual_node: bool, pooling: str, layers: list[nn.Module],
                 aux_loss_weight: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.aux_loss_weight = aux_loss_weight
        self.atom_encoder = AtomEncoder(emb_dim)
        self.layers = nn.ModuleList(layers)
        self.needs_hop2 = any(isinstance(m, GMoELayer) and m.num_hop1 < m.num_experts
                              for m in self.layers)
        self.virtual_node = nn.Embedding(1, emb_dim) if virtual_node else None
        self.virtual_mlps = nn.ModuleList(
            _virtual_node_mlp(emb_dim) for _ in range(num_layers - 1) if virtual_node)
        self.pool = POOLS[pooling]
        self.head = nn.Linear(emb_dim, num_tasks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in self.atom_encoder.atom_embedding_list:
            nn.init.xavier_uniform_(emb.weight)
        for layer in self.layers:
            layer.reset_parameters()
        if self.virtual_node is not None:
            nn.init.zeros_(self.virtual_node.weight)
        for mlp in self.virtual_mlps:
            for module in mlp:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.head.reset_parameters()

    def forward(
        self,
        x: Tensor,  # [N, 9] atom features
        edge_index: Tensor,  # [2, E]
        edge_attr: Tensor,  # [E, 3] bond features
        batch: Tensor,  # [N] graph of each atom
        num_graphs: int,
        node_mask: Tensor | None = None,  # [N] 1.0 real atom, 0.0 padding (data.padding)
        hop2_edges: tuple[Tensor, Tensor] | None = None,  # ([2, E2], [E2, 6]) built beforehand
    ) -> ModelOutput:
        """With ``node_mask`` (a padded batch, whose padding atoms form graphs of their own), the
        padding enters no BatchNorm statistics and no balance statistic: every real graph gets
        what it gets without the padding."""
        hop1, hop2 = hop_graphs(edge_index, edge_attr, x.size(0), self.needs_hop2, hop2_edges)
        real_rows = None if node_mask is None else node_mask[:, None] > 0  # [N, 1], once per step
        graph_mask = None
        if node_mask is not None and self.virtual_node is not None:  # graphs with a real atom
            graph_mask = (node_mask.new_zeros(num_graphs).index_add(0, batch, node_mask) > 0).to(
                node_mask.dtype)
        h = lookup_sum(self.atom_encoder.atom_embedding_list, x)  # = self.atom_encoder(x)
        virtual = None
        if self.virtual_node is not None:
            virtual = self.virtual_node.weight.expand(num_graphs, -1)
        stats: list[LayerStats] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if virtual is not None:
                h = h + virtual[batch]
            h_in = h
            h, layer_stats = layer(h, hop1, hop2, node_mask)
            if layer_stats is not None:
                stats.append(layer_stats)
            h = dropout(h if i == last else F.relu(h), self.dropout, self.training)
            if real_rows is not None:  # padding atoms back to 0: unnormalised sums (GIN) over
                h = torch.where(real_rows, h, 0.0)  # their self-loops would explode
            if virtual is not None and i < last:
                pooled = global_add_pool(h_in, batch, size=num_graphs) + virtual
                virtual = dropout(_run_mlp(self.virtual_mlps[i], pooled, graph_mask), self.dropout,
                                  self.training)

        logits = self.head(self.pool(h, batch, size=num_graphs))
        if not stats:
            return ModelOutput(logits, logits.new_zeros(()), None)
        balance = torch.stack([s.importance_loss + s.load_loss for s in stats]).mean()
        counts = torch.stack([s.expert_counts for s in stats])
        return ModelOutput(logits, self.aux_loss_weight * balance, counts)
