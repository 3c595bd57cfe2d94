"""gmoe-structure-gain: heterogeneity against GMoE's gain and routing strength, on fixed numbers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from gmoe_bench.analysis.structure_gain import main
from tests.conftest import seed_record
from tests.test_robustness import compose_cfg

# dataset: (metric, heterogeneity, backbone test per seed, GMoE test per seed)
DATASETS = {
    "ogbg-molfreesolv": ("rmse", 1.6, [2.5, 2.7, 2.3], [2.4, 2.6, 2.2]),  # GMoE 4 % better
    "ogbg-molbbbp": ("rocauc", 2.4, [0.68, 0.70, 0.66], [0.70, 0.72, 0.68]),  # 2.94 % better
    "ogbg-molsider": ("rocauc", 2.7, [0.60, 0.62, 0.58], [0.63, 0.65, 0.61]),  # 5 % better
}


def write_run(folder: Path, config: dict, metric: str, tests: list[float], valid: float) -> None:
    folder.mkdir(parents=True)
    summary = {"dataset": config["dataset"]["name"], "model": config["model"]["backbone"],
               "metric": metric, "config": config, "provenance": {},
               "seeds": [seed_record(s, valid, t) for s, t in enumerate(tests)]}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path: Path, small_mirror: Path) -> Path:
    """GCN and GMoE-GCN rows on three datasets; on ogbg-molbbbp (ROC-AUC) and ogbg-molfreesolv (RMSE)
    a second GMoE-GCN row with a worse validation score and a better test (not the one chosen), and
    GIN rows on ogbg-molbbbp only."""
    out = tmp_path / "runs"

    def config(*overrides: str) -> dict:
        return OmegaConf.to_container(compose_cfg(tmp_path, small_mirror, *overrides), resolve=True)

    for dataset, (metric, _, plain, gmoe) in DATASETS.items():
        better_valid = 1.0 if metric == "rocauc" else 0.1
        write_run(out / dataset / "gcn", config(f"dataset={dataset}"), metric, plain, 0.5)
        write_run(out / dataset / "gmoe", config(f"dataset={dataset}", "moe=gmoe"), metric, gmoe,
                  better_valid)
    write_run(out / "bbbp_worse_valid", config("dataset=ogbg-molbbbp", "moe=gmoe",
                                               "experts=n8_hop2"), "rocauc", [0.9] * 3, 0.2)
    write_run(out / "freesolv_worse_valid", config("dataset=ogbg-molfreesolv", "moe=gmoe",
                                                   "experts=n8_hop2"), "rmse", [1.0] * 3, 0.3)
    write_run(out / "gin", config("dataset=ogbg-molbbbp", "model=gin"), "rocauc", [0.7] * 3, 0.5)
    write_run(out / "gmoe_gin", config("dataset=ogbg-molbbbp", "model=gin", "moe=gmoe"),
              "rocauc", [0.69, 0.70, 0.71], 0.6)
    return out


def test_gain_and_routing_against_heterogeneity(runs: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    table_csv = tmp_path / "heterogeneity.csv"
    pd.DataFrame([{"dataset": d, "heterogeneity": h} for d, (_, h, _, _) in DATASETS.items()]
                 ).to_csv(table_csv, index=False)
    routing = tmp_path / "routing_structure.json"
    seed_stats = {p: {"cramers_v": [v, v]} for p, v in (("element", 0.1), ("degree", 0.2),
                                                         ("ring", 0.3))}
    routing.write_text(json.dumps([{"dataset": "ogbg-molbbbp", "backbone": "gcn", "per_seed": [
        {"seed": 0, "statistics": seed_stats}]}]))
    out = tmp_path / "report"
    assert main([str(table_csv), "--runs", str(runs), "--routing", str(routing),
                 "--out", str(out)]) == 0

    table = pd.read_csv(out / "table.csv")
    gcn = table[table.backbone == "gcn"].set_index("dataset")
    # regression: lower RMSE is a positive gain
    assert gcn.loc["ogbg-molfreesolv", "relative_gain_pct"] == pytest.approx(4.0)
    assert gcn.loc["ogbg-molfreesolv", "difference"] == pytest.approx(-0.1)
    # the chosen ogbg-molbbbp row is the better validation one, not the better test one
    assert gcn.loc["ogbg-molbbbp", "relative_gain_pct"] == pytest.approx(100 * 0.02 / 0.68)
    assert gcn.loc["ogbg-molsider", "relative_gain_pct"] == pytest.approx(5.0)
    assert gcn.loc["ogbg-molbbbp", "cramers_v"] == pytest.approx(0.2)
    assert pd.isna(gcn.loc["ogbg-molsider", "cramers_v"])
    assert list(table.dataset[table.backbone == "gcn"]) == [
        "ogbg-molsider", "ogbg-molbbbp", "ogbg-molfreesolv"]  # by decreasing heterogeneity

    report = (out / "table.md").read_text()
    # gains rank 4 %, 2.9 %, 5 % against heterogeneity 1.6, 2.4, 2.7: ρ = 0.5
    # and of the 6 orderings of 3 gains, every one has |ρ| ≥ 0.5: exact p = 1
    assert "GCN: heterogeneity against GMoE's relative gain: Spearman ρ = +0.50 (exact p = 1.00, " \
        "3 datasets)" in report
    gin = table[table.backbone == "gin"].set_index("dataset")
    assert pd.isna(gin.loc["ogbg-molbbbp", "cramers_v"])  # the routing analysed GCN only
    assert "against Cramér's V: no correlation stated: 1 dataset(s), at least 3 needed" in report
    assert "GIN: heterogeneity against GMoE's relative gain: no correlation stated: 1 dataset" \
        in report
    assert (out / "structure_gain.png").stat().st_size > 0
    assert report == capsys.readouterr().out


@pytest.mark.parametrize(("file", "text", "message"), [
    ("heterogeneity", "dataset,graphs\nogbg-molbbbp,2039\n", "has no dataset and heterogeneity columns"),
    ("heterogeneity", "dataset,heterogeneity\nogbg-molbbbp,2.4\nogbg-molbbbp,2.5\n",
     "lists ogbg-molbbbp more than once"),
    ("heterogeneity", "", "cannot be read as a table"),
    ("routing", '{"not": "a list of analyses"}', "is not a routing_structure.json of gmoe-routing"),
    ("routing", '[{"dataset": "ogbg-molbbbp", "per_seed": []}]', "--routing-backbone gcn|gin"),
])
def test_bad_inputs_are_named(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              file: str, text: str, message: str) -> None:
    table_csv, routing = tmp_path / "heterogeneity.csv", tmp_path / "routing.json"
    table_csv.write_text("dataset,heterogeneity\nogbg-molbbbp,2.4\n")
    routing.write_text("[]")
    (table_csv if file == "heterogeneity" else routing).write_text(text)
    out = tmp_path / "r"
    assert main([str(table_csv), "--runs", str(runs), "--routing", str(routing),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_correlation_p_value_counts_orderings_and_scales_to_every_dataset() -> None:
    from gmoe_bench.analysis.structure_gain import correlation

    x, y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]
    found = correlation(x, y)
    # by hand: ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 6·6 / 210; p = share of the 720 orderings with
    # |ρ| at least as large
    assert found.rho == pytest.approx(1 - 36 / 210)

    def rho(order: tuple[float, ...]) -> float:
        return 1 - 6 * sum((a - b) ** 2 for a, b in zip(x, order, strict=True)) / 210

    orderings = list(itertools.permutations(y))
    expected = sum(abs(rho(o)) >= abs(found.rho) - 1e-12 for o in orderings) / len(orderings)
    assert found.p_value == pytest.approx(expected)
    assert "exact p = " in found.text()
    # twelve datasets (every ogbg-mol*): 12! orderings are sampled, not enumerated
    many = correlation([float(i) for i in range(12)], [float(i) for i in range(12)])
    assert many.rho == pytest.approx(1.0) and many.p_value < 1e-3
    assert "99,999 permutations p = " in many.text()


def test_a_gmoe_row_still_training_is_shown_but_left_out_of_the_correlation(
        runs: Path, tmp_path: Path) -> None:
    # ogbg-molsider's GMoE-GCN row has 2 of its backbone's 3 seeds: its partial mean is in the
    # table, marked, and the correlation over the two finished datasets is not stated
    summary_path = runs / "ogbg-molsider" / "gmoe" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["seeds"] = summary["seeds"][:2]
    summary_path.write_text(json.dumps(summary))
    table_csv = tmp_path / "heterogeneity.csv"
    pd.DataFrame([{"dataset": d, "heterogeneity": h} for d, (_, h, _, _) in DATASETS.items()]
                 ).to_csv(table_csv, index=False)
    out = tmp_path / "report"
    assert main([str(table_csv), "--runs", str(runs), "--out", str(out)]) == 0

    gcn = pd.read_csv(out / "table.csv").query("backbone == 'gcn'").set_index("dataset")
    assert gcn.loc["ogbg-molsider", "seeds"] == "2 / 3"
    assert not gcn.loc["ogbg-molsider", "finished"] and gcn.loc["ogbg-molbbbp", "finished"]
    assert ("GCN: heterogeneity against GMoE's relative gain: no correlation stated: 2 dataset(s), "
            "at least 3 needed; ogbg-molsider (2 / 3 seeds) left out, GMoE seeds still missing"
            in (out / "table.md").read_text())
