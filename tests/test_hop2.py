from __future__ import annotations

import torch
from ogb.utils import smiles2graph
from torch_geometric.data import Batch, Data

from gmoe_bench.data.hop2 import two_hop_edges
from gmoe_bench.model.gnn import hop_graphs
from tests.conftest import small_molecules


def graph(smiles: str) -> Data:
    g = smiles2graph(smiles)
    return Data(x=torch.from_numpy(g["node_feat"]), edge_index=torch.from_numpy(g["edge_index"]),
                edge_attr=torch.from_numpy(g["edge_feat"]), num_nodes=g["num_nodes"])


def hop2(smiles: str) -> tuple[list[tuple[int, int]], torch.Tensor, Data]:
    g = graph(smiles)
    index, attr = two_hop_edges(g.edge_index, g.edge_attr, g.num_nodes)
    return sorted(map(tuple, index.T.tolist())), attr, g


def brute_force(g: Data) -> list[tuple[int, int, tuple[int, ...]]]:
    """Every path i→j→k, k≠i, k not a neighbour of i: (i, k, features of both bonds)."""
    edges = g.edge_index.T.tolist()
    attr = g.edge_attr.tolist()
    neighbours = {(a, b) for a, b in edges}
    paths = []
    for e1, (i, j) in enumerate(edges):
        for e2, (j2, k) in enumerate(edges):
            if j2 == j and k != i and (i, k) not in neighbours:
                paths.append((i, k, tuple(attr[e1] + attr[e2])))
    return sorted(paths)


def test_propane_has_one_path_each_way() -> None:
    edges, attr, g = hop2("CCC")  # atoms 0-1-2
    assert edges == [(0, 2), (2, 0)]
    single_bond = g.edge_attr[0].tolist()
    assert attr.tolist() == [single_bond + single_bond] * 2


def test_cyclopropane_has_none() -> None:
    edges, attr, _ = hop2("C1CC1")  # every atom is a neighbour of every other
    assert edges == [] and attr.shape == (0, 6)


def test_benzene_links_meta_positions_only() -> None:
    edges, _, _ = hop2("c1ccccc1")
    expected = sorted((i, (i + d) % 6) for i in range(6) for d in (2, 4))
    assert edges == expected  # para (distance 3) and ortho (neighbours) are excluded


def test_cyclobutane_counts_both_paths() -> None:
    edges, _, _ = hop2("C1CCC1")  # 0 reaches 2 through 1 and through 3
    assert edges == sorted([(0, 2), (0, 2), (1, 3), (1, 3), (2, 0), (2, 0), (3, 1), (3, 1)])


def test_single_atom_and_no_bonds() -> None:
    for smiles in ("C", "[Na+].[Cl-]"):
        edges, attr, _ = hop2(smiles)
        assert edges == [] and attr.shape == (0, 6)


def test_batched_equals_brute_force_per_graph() -> None:
    graphs = [graph(s) for s in small_molecules()]
    batch = Batch.from_data_list(graphs)
    index, attr = two_hop_edges(batch.edge_index, batch.edge_attr, batch.num_nodes)
    got = sorted((i, k, tuple(a)) for (i, k), a in zip(index.T.tolist(), attr.tolist(),
                                                        strict=True))
    expected = []
    for g, offset in zip(graphs, batch.ptr.tolist(), strict=False):
        expected += [(i + offset, k + offset, a) for i, k, a in brute_force(g)]
    assert got == sorted(expected)
    assert len(got) > 100


def test_hop_graphs_degrees_count_their_own_edges() -> None:
    """Each kind of expert normalises by its own graph's degree (+1 for the self-loop): propane's
    ends have 1 bond and 1 two-hop path, its middle 2 bonds and none; benzene's atoms 2 bonds and
    2 two-hop paths (the meta positions)."""
    b = Batch.from_data_list([graph("CCC"), graph("c1ccccc1")])
    hop1, hop2_graph = hop_graphs(b.edge_index, b.edge_attr, b.num_nodes, True)
    assert hop1.deg.tolist() == [2, 3, 2] + [3] * 6
    assert hop2_graph is not None and hop2_graph.deg.tolist() == [2, 1, 2] + [3] * 6
    assert hop_graphs(b.edge_index, b.edge_attr, b.num_nodes, False)[1] is None
