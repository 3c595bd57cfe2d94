"""Write an OGB-format dataset folder from SMILES strings, with ogb's own featurizer.

The folder has the layout of an extracted official zip, so :func:`gmoe_bench.data.ogb.load_dataset`
(and ogb itself) reads it as the real thing. The tests build small datasets this way, the benchmark
builds one when no mirror is given, and users can package their own molecules for air-gapped runs.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ogb.utils import smiles2graph
from rdkit import Chem


def _write_csv_gz(path: Path, rows: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt=fmt, delimiter=",")


def write_ogb_folder(
    folder: Path,
    smiles: Sequence[str],
    labels: np.ndarray,  # [num_graphs, num_tasks]; NaN marks a missing label
    split: dict[str, Sequence[int]],  # 'train' | 'valid' | 'test' -> graph indices
    split_name: str = "scaffold",
) -> None:
    """Featurize ``smiles`` with :func:`ogb.utils.smiles2graph` and write them in OGB's layout
    (labels exactly: floats with 17 significant digits). A string rdkit cannot parse is a
    ValueError naming it."""
    for i, s in enumerate(smiles):
        if Chem.MolFromSmiles(s) is None:
            raise ValueError(f"SMILES {i} ({s!r}) is not a molecule rdkit can parse; fix or drop "
                             "it (and its label and split entries).")
    graphs = [smiles2graph(s) for s in smiles]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "RELEASE_v1.txt").write_text("# Written by gmoe_bench.data.from_smiles\n")
    raw = folder / "raw"
    # OGB stores each bond once (add_inverse_edge=True in its registry adds the reverse direction).
    edges = [g["edge_index"][:, ::2].T for g in graphs]
    edge_feats = [g["edge_feat"][::2] for g in graphs]
    _write_csv_gz(raw / "edge.csv.gz", np.concatenate(edges).reshape(-1, 2), "%d")
    _write_csv_gz(raw / "edge-feat.csv.gz", np.concatenate(edge_feats).reshape(-1, 3), "%d")
    _write_csv_gz(raw / "node-feat.csv.gz", np.concatenate([g["node_feat"] for g in graphs]), "%d")
    _write_csv_gz(raw / "num-node-list.csv.gz", np.array([[g["num_nodes"]] for g in graphs]), "%d")
    _write_csv_gz(raw / "num-edge-list.csv.gz", np.array([[len(e)] for e in edges]), "%d")
    labels = np.asarray(labels, dtype=float).reshape(len(graphs), -1)
    _write_csv_gz(raw / "graph-label.csv.gz", labels, "%.17g")
    for part, idx in split.items():
        _write_csv_gz(folder / "split" / split_name / f"{part}.csv.gz",
                      np.asarray(idx, dtype=int).reshape(-1, 1), "%d")
    mapping = folder / "mapping"
    mapping.mkdir(exist_ok=True)
    with gzip.open(mapping / "mol.csv.gz", "wt") as f:
        f.write("smiles\n" + "\n".join(smiles) + "\n")
