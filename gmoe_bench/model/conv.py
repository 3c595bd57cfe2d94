"""GCN and GIN convolutions in OGB's formulation (ogb/examples/graphproppred/mol/conv.py).

Both embed bond features and add them to every message. They take node features laid out as
``[targets; extra sources]``: the first ``num_targets`` rows are the nodes whose output is wanted,
the rest are neighbours that only send messages. The plain backbone passes every node as a target;
a GMoE expert passes only the nodes routed to it, so it computes nothing for the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ogb.graphproppred.mol_encoder import BondEncoder
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from gmoe_bench.model.norm import batch_norm


def lookup_sum(tables: nn.ModuleList, features: Tensor) -> Tensor:
    r"""OGB's Atom/BondEncoder sum :math:`\sum_c T_c[f_c]` over the feature columns, by row lookups
    (``index_select``): their gradient is one scatter-add per table, where ``nn.Embedding``'s is a
    chain of sorting kernels on a GPU (hundreds per GMoE step). ``[M, C] -> [M, D]``."""
    out = tables[0].weight.index_select(0, features[:, 0])
    for c in range(1, len(tables)):
        out = out + tables[c].weight.index_select(0, features[:, c])
    return out


class PathBondEncoder(nn.Module):
    r"""Embeds a 2-hop path by its two bonds: :math:`e = \mathrm{Bond}_1(b_{ij}) + \mathrm{Bond}_2(b_{jk})`.

    Input features are the 6 columns ``[bond(i→j), bond(j→k)]``; each half has its own OGB
    ``BondEncoder`` (the same as one embedding table per column, summed).
    """

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.first = BondEncoder(emb_dim)
        self.second = BondEncoder(emb_dim)

    def reset_parameters(self) -> None:
        for encoder in (self.first, self.second):
            for emb in encoder.bond_embedding_list:
                nn.init.xavier_uniform_(emb.weight)

    def forward(self, edge_attr: Tensor) -> Tensor:  # [E, 6] -> [E, emb_dim]
        half = edge_attr.size(1) // 2
        return (lookup_sum(self.first.bond_embedding_list, edge_attr[:, :half])
                + lookup_sum(self.second.bond_embedding_list, edge_attr[:, half:]))


def bond_encoder(emb_dim: int, hops: int) -> nn.Module:
    """OGB's BondEncoder for bonds (hops=1), :class:`PathBondEncoder` for 2-hop paths (hops=2)."""
    return BondEncoder(emb_dim) if hops == 1 else PathBondEncoder(emb_dim)


def embed_bonds(encoder: nn.Module, edge_attr: Tensor) -> Tensor:
    """``encoder(edge_attr)`` (a bond or a 2-hop path encoder) by :func:`lookup_sum`."""
    if isinstance(encoder, PathBondEncoder):
        return encoder(edge_attr)
    return lookup_sum(encoder.bond_embedding_list, edge_attr)


def _reset_bond_encoder(encoder: nn.Module) -> None:
    if isinstance(encoder, PathBondEncoder):
        encoder.reset_parameters()
    else:
        for emb in encoder.bond_embedding_list:
            nn.init.xavier_uniform_(emb.weight)


class OGBGCNConv(MessagePassing):
    r"""OGB's GCN layer with bond features.

    .. math::
        h_i = \sum_{j \in \mathcal{N}(i)} \frac{\mathrm{ReLU}(W x_j + e_{ji})}{\sqrt{d_i d_j}}
              + \frac{\mathrm{ReLU}(W x_i + r)}{d_i},
        \qquad d_i = |\mathcal{N}(i)| + 1

    with :math:`e_{ji}` the embedded bond (or 2-hop path) and :math:`r` a learned root embedding.
    Degrees come from the whole graph (``deg`` argument), so a subset of targets gets exactly the
    values it would get in a full pass.
    """

    def __init__(self, emb_dim: int, hops: int = 1) -> None:
        super().__init__(aggr="add")
        self.linear = nn.Linear(emb_dim, emb_dim)
        self.root_emb = nn.Embedding(1, emb_dim)
        self.bond_encoder = bond_encoder(emb_dim, hops)

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()
        self.root_emb.reset_parameters()
        _reset_bond_encoder(self.bond_encoder)

    def forward(
        self,
        x: Tensor,  # [U, D] targets first, then extra sources
        edge_index: Tensor,  # [2, E] source (< U) -> target (< num_targets)
        edge_attr: Tensor,  # [E, F_e]
        deg: Tensor,  # [U] whole-graph degree + 1
        num_targets: int,
        mask: Tensor | None = None,  # unused: GCN has no BatchNorm of its own
    ) -> Tensor:  # [num_targets, D]
        h = self.linear(x)
        deg_inv_sqrt = deg.pow(-0.5)
        src, dst = edge_index
        norm = deg_inv_sqrt[src] * deg_inv_sqrt[dst]
        bonds = embed_bonds(self.bond_encoder, edge_attr)
        out = self.propagate(edge_index, x=(h, h[:num_targets]), edge_attr=bonds, norm=norm,
                             size=(h.size(0), num_targets))
        return out + F.relu(h[:num_targets] + self.root_emb.weight) / deg[:num_targets, None]

    def message(self, x_j: Tensor, edge_attr: Tensor, norm: Tensor) -> Tensor:
        return norm[:, None] * F.relu(x_j + edge_attr)


class OGBGINConv(MessagePassing):
    r"""OGB's GIN layer with bond features.

    .. math::
        h_i = \mathrm{MLP}\Big((1 + \epsilon)\, x_i + \sum_{j \in \mathcal{N}(i)}
              \mathrm{ReLU}(x_j + e_{ji})\Big)

    with MLP = Linear(D, 2D) → BatchNorm → ReLU → Linear(2D, D).
    """

    def __init__(self, emb_dim: int, hops: int = 1) -> None:
        super().__init__(aggr="add")
        self.mlp = nn.Sequential(
            nn.Linear(emb_dim, 2 * emb_dim), nn.BatchNorm1d(2 * emb_dim), nn.ReLU(),
            nn.Linear(2 * emb_dim, emb_dim),
        )
        self.eps = nn.Parameter(torch.zeros(1))
        self.bond_encoder = bond_encoder(emb_dim, hops)

    def reset_parameters(self) -> None:
        for module in self.mlp:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.zeros_(self.eps)
        _reset_bond_encoder(self.bond_encoder)

    def forward(
        self,
        x: Tensor,  # [U, D] targets first, then extra sources
        edge_index: Tensor,  # [2, E] source (< U) -> target (< num_targets)
        edge_attr: Tensor,  # [E, F_e]
        deg: Tensor,  # unused: GIN sums messages without normalisation
        num_targets: int,
        mask: Tensor | None = None,  # [num_targets] real rows of a padded batch (its BatchNorm)
    ) -> Tensor:  # [num_targets, D]
        x_dst = x[:num_targets]
        agg = self.propagate(edge_index, x=(x, x_dst),
                             edge_attr=embed_bonds(self.bond_encoder, edge_attr),
                             size=(x.size(0), num_targets))
        h = self.mlp[0]((1 + self.eps) * x_dst + agg)
        h = F.relu(batch_norm(h, self.mlp[1], mask))
        return self.mlp[3](h)

    def message(self, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        return F.relu(x_j + edge_attr)


CONVS: dict[str, type[MessagePassing]] = {"gcn": OGBGCNConv, "gin": OGBGINConv}
