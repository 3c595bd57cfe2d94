"""Structural heterogeneity of a dataset: entropies of molecule size, rings and atom degree."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from gmoe_bench.analysis.heterogeneity import entropy_bits, graph_structure, heterogeneity, main
from tests.conftest import small_molecules
from tests.test_hop2 import graph


def test_entropy_in_bits() -> None:
    assert entropy_bits([3, 3, 3]) == 0.0
    assert entropy_bits([0, 1]) == pytest.approx(1.0)
    assert entropy_bits([0, 1, 2, 3]) == pytest.approx(2.0)
    assert entropy_bits([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))


@pytest.mark.parametrize(("smiles", "rings", "degrees"), [
    ("c1ccccc1", 1, [2] * 6),  # benzene
    ("c1ccc2ccccc2c1", 2, [2, 2, 2, 3, 2, 2, 2, 2, 3, 2]),  # naphthalene: fused rings count twice
    ("CCO", 0, [1, 2, 1]),
    ("[Na+].[Cl-]", 0, [0, 0]),  # two fragments, no bond
    ("C1CC1.C1CC1", 2, [2] * 6),  # two separate rings
])
def test_rings_and_degrees_of_a_molecule(smiles: str, rings: int, degrees: list[int]) -> None:
    g = graph(smiles)
    ring_count, atom_degrees = graph_structure(g.edge_index.numpy(), g.num_nodes)
    assert ring_count == rings
    assert atom_degrees.tolist() == degrees


def test_identical_molecules_are_not_heterogeneous_and_varied_ones_are() -> None:
    same = heterogeneity([graph("c1ccccc1")] * 5)
    assert (same["atoms_entropy"], same["rings_entropy"], same["degree_entropy"]) == (0, 0, 0)
    varied = heterogeneity([graph(s) for s in small_molecules()])
    assert varied["graphs"] == len(small_molecules())
    assert min(varied["atoms_entropy"], varied["rings_entropy"], varied["degree_entropy"]) > 0.5
    assert varied["heterogeneity"] == pytest.approx(
        (varied["atoms_entropy"] + varied["rings_entropy"] + varied["degree_entropy"]) / 3)


def test_cli_writes_one_row_per_dataset(small_mirror: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    main(["ogbg-molbbbp", "--root", str(tmp_path / "data"), "--mirror", str(small_mirror),
          "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert table["dataset"].tolist() == ["ogbg-molbbbp"]
    assert table["graphs"].tolist() == [len(small_molecules())]
    assert "| ogbg-molbbbp | 74 |" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["ogbg-molnothing", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "gmoe-heterogeneity: error:" in capsys.readouterr().err


def test_cli_checks_out_before_loading_and_reads_the_data_root(
        small_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["ogbg-molbbbp", "--mirror", str(small_mirror), "--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "mine"
    assert not (tmp_path / "data").exists()  # nothing loaded for the refused run
    monkeypatch.setenv("GMOE_DATA_ROOT", str(tmp_path / "shared_root"))
    main(["ogbg-molbbbp", "--mirror", str(small_mirror), "--out", str(tmp_path / "out")])
    assert (tmp_path / "shared_root" / "ogbg_molbbbp" / "processed").is_dir()
    assert not (tmp_path / "data").exists()
