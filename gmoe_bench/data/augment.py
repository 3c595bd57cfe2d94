"""Random node dropping on a collated batch of training graphs."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import scatter, subgraph

# The official GMoE code leaves graphs this small intact.
MIN_ATOMS_TO_DROP = 5


def drop_nodes(
    x: Tensor,  # [N, F]
    edge_index: Tensor,  # [2, E]
    edge_attr: Tensor,  # [E, F_e]
    batch: Tensor,  # [N] graph of each node
    num_graphs: int,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Drop each atom with probability ``p``, with its bonds, and relabel what is left.

    As in the official GMoE code, graphs with fewer than 5 atoms are left intact, and a graph that
    would lose every atom keeps all of them, so every graph still has a prediction.
    The coin flips come from ``generator`` (torch's global random state by default).
    Returns the new ``(x, edge_index, edge_attr, batch)``.
    """
    sizes = scatter(torch.ones_like(batch), batch, dim_size=num_graphs, reduce="sum")
    coins = torch.rand(batch.numel(), device=batch.device, generator=generator)
    keep = (coins >= p) | (sizes < MIN_ATOMS_TO_DROP)[batch]
    kept = scatter(keep.long(), batch, dim_size=num_graphs, reduce="sum")
    keep |= (kept == 0)[batch]
    edge_index, edge_attr = subgraph(keep, edge_index, edge_attr, relabel_nodes=True,
                                     num_nodes=batch.numel())
    return x[keep], edge_index, edge_attr, batch[keep]
