r"""How structurally diverse are a dataset's molecules? Entropies of their size, rings and degrees.

For every graph: its atoms, its rings (the circuit rank :math:`|E| - |V| + C`, which for a molecule
is the number of rings of its smallest set of smallest rings), and the degree of each atom. A
dataset's heterogeneity in each is the Shannon entropy (bits) of the empirical distribution,

.. math::
    H = -\sum_v p_v \log_2 p_v,

0 when every graph (atom) has the same value, larger as values spread. Atom counts are binned by 5
atoms so that one extra atom does not count as a new kind of molecule. The summary measure is the
mean of the three entropies. The paper's open question is whether GMoE gains more, and routes more
by structure, on more heterogeneous datasets; these numbers are one side of that comparison.

    gmoe-heterogeneity ogbg-molbbbp ogbg-molhiv ... --out results/analysis_heterogeneity
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gmoe_bench.config import DatasetConfig
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.errors import UserError
from gmoe_bench.records import write_atomic
from gmoe_bench.reports.cli import out_is_folder

ATOM_BIN = 5  # atoms per bin of the size distribution


def entropy_bits(values: Iterable[int]) -> float:
    """Shannon entropy (bits) of the empirical distribution of ``values``; 0 for one value."""
    _, counts = np.unique(np.fromiter(values, dtype=np.int64), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) if p.size > 1 else 0.0


def graph_structure(edge_index: np.ndarray, num_nodes: int) -> tuple[int, np.ndarray]:
    """A molecule's number of rings (circuit rank) and its atoms' degrees, from OGB's edge list
    (each bond stored in both directions)."""
    src, dst = edge_index
    degrees = np.bincount(src, minlength=num_nodes)
    if num_nodes == 0:
        return 0, degrees
    adjacency = coo_matrix((np.ones(src.size), (src, dst)), shape=(num_nodes, num_nodes))
    components, _ = connected_components(adjacency, directed=False)
    return src.size // 2 - num_nodes + components, degrees


def heterogeneity(graphs: Iterable) -> dict[str, float]:
    """The entropies of atoms per graph (binned), rings per graph and atom degree, and their mean."""
    atoms, rings, degrees = [], [], []
    for g in graphs:
        ring_count, atom_degrees = graph_structure(g.edge_index.numpy(), g.num_nodes)
        atoms.append(g.num_nodes // ATOM_BIN)
        rings.append(ring_count)
        degrees.append(atom_degrees)
    out = {"graphs": len(atoms),
           "atoms_entropy": entropy_bits(atoms),
           "rings_entropy": entropy_bits(rings),
           "degree_entropy": entropy_bits(np.concatenate(degrees) if degrees else [])}
    out["heterogeneity"] = float(np.mean([out["atoms_entropy"], out["rings_entropy"],
                                          out["degree_entropy"]]))
    return out


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``gmoe-heterogeneity``): one row per dataset, table.md and table.csv."""
    parser = argparse.ArgumentParser(prog="gmoe-heterogeneity", description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="OGB molecular datasets, e.g. ogbg-molbbbp")
    parser.add_argument("--root", default=None,
                        help="dataset.root, where datasets are kept (default: the GMOE_DATA_ROOT "
                             "environment variable, else data)")
    parser.add_argument("--mirror", default=None,
                        help="dataset.mirror (default: the GMOE_DATA_MIRROR environment variable)")
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md and table.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not out_is_folder("gmoe-heterogeneity", args.out):  # before any dataset is loaded
        raise SystemExit(2)
    mirror = args.mirror or os.environ.get("GMOE_DATA_MIRROR")
    root = args.root or os.environ.get("GMOE_DATA_ROOT", "data")
    rows = []
    try:
        for name in args.datasets:
            data = load_dataset(DatasetConfig(name=name, root=root, mirror=mirror))
            rows.append({"dataset": name, **heterogeneity(data.graphs)})
            logging.info("%s: %s", name, rows[-1])
    except UserError as err:
        print(f"gmoe-heterogeneity: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    table = pd.DataFrame(rows).sort_values("heterogeneity", ascending=False)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "table.csv", lambda f: f.write(table.to_csv(index=False).encode()))
    text = markdown(table)
    write_atomic(args.out / "table.md", lambda f: f.write((text + "\n").encode()))
    print(text)


if __name__ == "__main__":
    main()
