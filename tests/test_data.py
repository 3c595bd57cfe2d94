from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from gmoe_bench.config import DatasetConfig
from gmoe_bench.data.augment import drop_nodes
from gmoe_bench.data.from_smiles import write_ogb_folder
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.errors import DataError
from tests.conftest import small_molecules


def dataset_cfg(root: Path, mirror: Path | None, name: str = "ogbg-molbbbp") -> DatasetConfig:
    return DatasetConfig(name=name, root=str(root), mirror=str(mirror) if mirror else None,
                         drop_node_p=0.0)


def test_mirror_is_copied_processed_and_split(small_mirror: Path, tmp_path: Path) -> None:
    data = load_dataset(dataset_cfg(tmp_path, small_mirror))
    n = len(small_molecules())
    assert len(data.graphs) == n
    assert sorted(torch.cat(list(data.split.values())).tolist()) == list(range(n))
    assert (data.num_tasks, data.eval_metric) == (1, "rocauc")
    assert (tmp_path / "ogbg_molbbbp" / "processed" / "geometric_data_processed.pt").is_file()
    assert not (small_mirror / "ogbg_molbbbp" / "processed").exists()  # mirror left untouched
    salt = data.graphs[n - 1]  # [Na+].[Cl-]: two atoms, no bonds
    assert salt.num_nodes == 2 and salt.edge_index.size(1) == 0


def test_packaged_molecules_keep_their_labels_exactly(tmp_path: Path) -> None:
    """Regression targets and missing labels are written exactly (ogb then loads them as float32)."""
    smiles = small_molecules()
    labels = np.linspace(-1e-4, 1.23456789e5, len(smiles))[:, None] / 7.0
    labels[1, 0] = np.nan
    n = len(smiles)
    write_ogb_folder(tmp_path / "mirror" / "ogbg_molesol", smiles, labels,
                     {"train": range(n - 4), "valid": [n - 4, n - 3], "test": [n - 2, n - 1]})
    written = pd.read_csv(tmp_path / "mirror" / "ogbg_molesol" / "raw" / "graph-label.csv.gz",
                          header=None).to_numpy()
    assert np.array_equal(written, labels, equal_nan=True)
    data = load_dataset(dataset_cfg(tmp_path / "root", tmp_path / "mirror", "ogbg-molesol"))
    assert np.array_equal(data.graphs.y.numpy(), labels.astype(np.float32), equal_nan=True)


def test_an_unparsable_smiles_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^SMILES 1 \('C1CC'\) is not a molecule rdkit can parse"):
        write_ogb_folder(tmp_path / "x", ["CCO", "C1CC"], np.zeros((2, 1)),
                         {"train": [0], "valid": [1], "test": [1]})
    assert not (tmp_path / "x").exists()


def test_processed_cache_is_reloaded_with_weights_only(small_mirror: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(dataset_cfg(tmp_path, small_mirror))
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        if str(args[0]).endswith("geometric_data_processed.pt"):
            calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    data = load_dataset(dataset_cfg(tmp_path, None))  # second time: from the cache, no mirror
    assert len(data.graphs) == len(small_molecules())
    assert calls == [None]  # ogb's call, under torch's default weights_only=True


def test_corrupt_processed_cache_is_rebuilt(small_mirror: Path, tmp_path: Path) -> None:
    load_dataset(dataset_cfg(tmp_path, small_mirror))
    cache = tmp_path / "ogbg_molbbbp" / "processed" / "geometric_data_processed.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # truncated, as by a killed writer
    data = load_dataset(dataset_cfg(tmp_path, small_mirror))
    assert len(data.graphs) == len(small_molecules())


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ogbg-molhiv"):
        load_dataset(dataset_cfg(tmp_path, None, name="ogbg-molxyz"))


def test_mirror_without_the_dataset_says_how_to_fix(small_mirror: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no folder 'ogbg_molhiv'"):
        load_dataset(dataset_cfg(tmp_path, small_mirror, name="ogbg-molhiv"))


def test_incomplete_mirror_names_the_missing_files(small_mirror: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_mirror, broken)
    (broken / "ogbg_molbbbp" / "raw" / "edge-feat.csv.gz").unlink()
    with pytest.raises(DataError, match=r"edge-feat\.csv\.gz"):
        load_dataset(dataset_cfg(tmp_path / "root", broken))


def test_stale_folder_never_prompts(small_mirror: Path, tmp_path: Path) -> None:
    """ogb would call input() for a folder without RELEASE_v1.txt; we explain instead."""
    stale = tmp_path / "ogbg_molbbbp"
    shutil.copytree(small_mirror / "ogbg_molbbbp", stale)
    (stale / "RELEASE_v1.txt").unlink()
    with pytest.raises(DataError, match=r"RELEASE_v1\.txt"):
        load_dataset(dataset_cfg(tmp_path, None))
    data = load_dataset(dataset_cfg(tmp_path, small_mirror))  # with a mirror: replaced
    assert len(data.graphs) == len(small_molecules())


def test_missing_dataset_without_network_or_mirror(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import ogb.utils.url

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ogb.utils.url.ur, "urlopen", offline)
    with pytest.raises(DataError, match="GMOE_DATA_MIRROR"):
        load_dataset(dataset_cfg(tmp_path, None))
    assert not (tmp_path / "ogbg_molbbbp").exists()  # nothing half-made is left behind


def paths(sizes: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Path graphs of the given atom counts, batched: atom ids as features, edge ids as bond
    features, both directions of each bond."""
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    edges = [(start + i, start + i + 1) for start, size in zip(starts, sizes, strict=True)
             for i in range(size - 1)]
    edge_index = torch.tensor(edges).T
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return (torch.arange(sum(sizes)).view(-1, 1), edge_index,
            torch.arange(edge_index.size(1)).view(-1, 1), batch)


def test_drop_nodes_keeps_small_graphs_and_every_graph() -> None:
    torch.manual_seed(0)
    # graph 0: a 3-atom path (never dropped); graph 1: a 10-atom path.
    x, edge_index, edge_attr, batch = paths([3, 10])
    x2, ei2, ea2, b2 = drop_nodes(x, edge_index, edge_attr, batch, 2, p=0.5)
    assert (b2 == 0).sum() == 3  # small graph intact
    assert 1 <= (b2 == 1).sum() < 10
    # surviving edges connect surviving atoms and keep their features
    old_edges = {tuple(e) for e in edge_index.T.tolist()}
    for (s, d), a in zip(ei2.T.tolist(), ea2.view(-1).tolist(), strict=True):
        assert (x2[s].item(), x2[d].item()) in old_edges
        assert tuple(edge_index[:, a].tolist()) == (x2[s].item(), x2[d].item())
    _, _, _, b_all = drop_nodes(x, edge_index, edge_attr, batch, 2, p=0.999999)
    assert set(b_all.tolist()) == {0, 1}  # a graph that would lose everything is kept whole


def test_drop_nodes_boundary_is_five_atoms() -> None:
    """As the official code: graphs under 5 atoms stay whole, graphs of 5 are dropped from."""
    torch.manual_seed(0)
    x, edge_index, edge_attr, batch = paths([4, 5])
    kept = [drop_nodes(x, edge_index, edge_attr, batch, 2, p=0.5)[3] for _ in range(50)]
    assert all((b == 0).sum() == 4 for b in kept)
    assert any((b == 1).sum() < 5 for b in kept)
