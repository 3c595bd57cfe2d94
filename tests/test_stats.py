"""Confidence intervals in the reports: of a mean, of GMoE's gain over its backbone (Welch)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gmoe_bench.reports.cli import main as report_main
from gmoe_bench.reports.stats import difference_interval, mean_interval
from gmoe_bench.reports.table import (
    ConfigResult,
    collect,
    entropy_curve,
    gain_table,
    gains,
    latex_table,
    markdown_table,
    write_csv,
)

PLAIN = {"num_experts": 0, "num_hop2": 0, "top_k": 1, "loss_weight": 0.0}
GMOE = {"num_experts": 8, "num_hop2": 0, "top_k": 4, "loss_weight": 1.0}


def result(backbone: str, moe: dict, tests: list[float], drop: float = 0.0,
           hidden: int = 300, metric: str = "rocauc") -> ConfigResult:
    config = {"dataset": {"name": "ogbg-molbbbp", "drop_node_p": drop},
              "model": {"backbone": backbone, "hidden_dim": hidden}, "moe": moe,
              "trainer": {"epochs": 100}}
    seeds = [{"seed": i, "valid": 0.9, "test": t} for i, t in enumerate(tests)]
    label = f"{'gmoe-' if moe['num_experts'] else ''}{backbone} drop={drop}"
    return ConfigResult("ogbg-molbbbp", backbone, metric, config, seeds, label=label)


def test_mean_interval_is_students_t() -> None:
    # mean 2, s = 1, n = 3: 2 ± t(0.975, 2) / √3 = 2 ± 4.3027 · 0.57735
    ci = mean_interval([1.0, 2.0, 3.0])
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((2.0, -0.48414, 4.48414), abs=1e-4)
    assert ci.contains(4.4) and not ci.contains(4.5)
    assert not mean_interval([0.7]).defined  # one seed: no interval
    assert mean_interval([0.7, 0.7]).contains(0.7)  # no spread: the point itself


def test_difference_interval_is_welch() -> None:
    # a: mean 72, var 4; b: mean 69, var 1 (n = 3 each). se = √(5/3) = 1.29099,
    # ν = (5/3)² / ((4/3)²/2 + (1/3)²/2) = 2.94118, t(0.975, 2.94118) = 3.21876 (Welch–Satterthwaite)
    d = difference_interval([70.0, 72.0, 74.0], [68.0, 69.0, 70.0])
    assert d.estimate == pytest.approx(3.0)
    assert (d.low, d.high) == pytest.approx((3 - 4.15540, 3 + 4.15540), abs=1e-4)
    assert not d.excludes_zero
    clear = difference_interval([80.0, 81.0, 82.0], [68.0, 69.0, 70.0])
    assert clear.excludes_zero and clear.low > 0
    assert not difference_interval([0.7], [0.6, 0.65]).defined
    assert not difference_interval([0.7, 0.7], [0.6, 0.6]).defined
    # ten equal seeds: a float mean of 0.95 × 10 is not 0.95, so their std is not exactly 0; no
    # spread is still no interval (not a zero-width one that "excludes zero")
    assert np.std([0.95] * 10) > 0
    assert not difference_interval([0.95] * 10, [0.91] * 10).defined
    assert mean_interval([0.95] * 10).contains(0.95)


def test_gmoe_rows_are_compared_with_their_backbone_under_the_same_semantics(tmp_path: Path) -> None:
    gcn = result("gcn", PLAIN, [0.68, 0.69, 0.70])
    gcn_dropped = result("gcn", PLAIN, [0.60, 0.61, 0.62], drop=0.2)
    gin = result("gin", PLAIN, [0.65, 0.66, 0.67])
    # a different hidden size and the MoE keys do not change the semantics; node dropping does
    gmoe = result("gcn", GMOE, [0.70, 0.71, 0.72], hidden=150)
    gmoe_dropped = result("gcn", GMOE, [0.80, 0.81, 0.82], drop=0.2, hidden=150)
    pairs = gains([gcn, gcn_dropped, gin, gmoe, gmoe_dropped])
    assert [(g.gmoe, g.backbone) for g in pairs] == [(gmoe, gcn), (gmoe_dropped, gcn_dropped)]
    assert [g.verdict for g in pairs] == ["within noise", "better"]
    # +2 points: the same spread on both sides, Welch = pooled here: 2 ± t(0.975, 4) · √(2/3) · 1
    half = 2.776445 * math.sqrt(2 / 3)
    assert pairs[0].difference.scaled(100).low == pytest.approx(2 - half, abs=1e-3)

    table = gain_table([gcn, gmoe, gmoe_dropped, gcn_dropped]).splitlines()
    assert table[2] == (f"| gmoe-gcn drop=0.0 | gcn drop=0.0 | ogbg-molbbbp | 3 / 3 | +2.00 | "
                        f"[{2 - half:+.2f}, {2 + half:+.2f}] | within noise |")
    assert table[3].endswith("| +20.00 | [+17.73, +22.27] | better |")
    assert r"$\Delta$ (test) & 95\% CI (Welch)" in latex_table([gcn, gmoe])
    assert f"[{2 - half:+.2f}, {2 + half:+.2f}]" in latex_table([gcn, gmoe])

    write_csv([gcn, gmoe, gmoe_dropped], tmp_path / "table.csv")
    gcn_row, gmoe_row, dropped_row = csv.DictReader((tmp_path / "table.csv").open())
    assert gcn_row["gain"] == "" and gcn_row["paper_mean"] == "0.6887"
    assert gcn_row["paper_inside_ci"] == "True"  # 68.87 in 69 ± 2.48
    assert gmoe_row["backbone"] == "gcn drop=0.0" and float(gmoe_row["gain"]) == pytest.approx(0.02)
    assert gmoe_row["gain_excludes_zero"] == "False"
    assert gmoe_row["paper_inside_ci"] == "True"  # 70.28 in 71 ± 2.48
    assert dropped_row["paper_inside_ci"] == "False"  # 70.28 not in 81 ± 2.48
    assert dropped_row["backbone"] == ""  # its backbone row (with node dropping) is not given


def test_row_labels_show_hop2_and_the_actual_width(tmp_path: Path) -> None:
    from gmoe_bench.reports.table import _name_rows

    plain = result("gcn", PLAIN, [0.7])
    scaled = result("gcn", {**GMOE, "num_hop2": 4, "scale_hidden": True}, [0.7])
    fixed = result("gcn", {**GMOE, "scale_hidden": False}, [0.7], hidden=150)
    _name_rows([plain, scaled, fixed])
    # 300/√4 = 150: the scaled and the fixed-150 networks are equally wide
    assert [r.label for r in (plain, scaled, fixed)] == [
        "width=300", "λ=1 n=8 hop2=4 k=4 width=150", "λ=1 n=8 hop2=0 k=4 width=150"]


def write_run(folder: Path, moe: dict, tests: list[float], hidden: int) -> None:
    """A summary.json as gmoe-train writes it: per seed its epochs (routing for GMoE)."""
    routing = [[1 / moe["num_experts"]] * moe["num_experts"]] * 2 if moe["num_experts"] else []
    seeds = [{"seed": i, "best_epoch": 2, "valid": 0.9, "test": t, "wall_seconds": 1.0,
              "num_parameters": 10, "commit": "abc",
              "epochs": [{"epoch": e, "valid": 0.9 - 0.1 * (e == 1), "test": t - 0.05 * (e == 1),
                          "routing": routing} for e in (1, 2, 3)]}
             for i, t in enumerate(tests)]
    config = {"dataset": {"name": "ogbg-molbbbp", "drop_node_p": 0.2},
              "model": {"backbone": "gcn", "hidden_dim": hidden}, "moe": moe,
              "trainer": {"epochs": 3}}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "dataset": "ogbg-molbbbp", "model": "gcn", "metric": "rocauc", "config": config,
        "provenance": {"command": "gmoe-train", "commit": "abc"}, "seeds": seeds,
        "data": {"fingerprint": "f" * 16}}))


def test_a_report_is_rebuilt_from_its_digest_alone(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "gcn", PLAIN, [0.68, 0.69, 0.70], hidden=300)
    write_run(tmp_path / "runs" / "gmoe", GMOE, [0.70, 0.72, 0.71], hidden=150)
    # the first epoch routes onto 2 of the 8 experts: entropy log 2 / log 8, then 1
    summary_path = tmp_path / "runs" / "gmoe" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for seed in summary["seeds"]:
        seed["epochs"][0]["routing"] = [[0.5, 0.5] + [0.0] * 6] * 2
    summary_path.write_text(json.dumps(summary))
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "first")]) == 0
    assert report_main([str(tmp_path / "first" / "digest.json"), "--out",
                        str(tmp_path / "again")]) == 0
    first, again = tmp_path / "first", tmp_path / "again"
    for name in ("table.md", "table.csv", "table.tex", "details.md", "paper.md", "digest.json"):
        assert (again / name).read_text() == (first / name).read_text(), name
    assert "| +2.00 |" in (again / "table.md").read_text()  # the gain section survives
    # a digest keeps the routing shares of the best epoch and the entropy of every epoch: the
    # entropy plot is redrawn from the same curves (to the digest's 4 decimals)
    assert (first / "routing_entropy.png").exists() and (again / "routing_entropy.png").exists()
    from_runs, from_digest = ([entropy_curve(s) for r in collect([source]) if r.is_gmoe
                               for s in r.seeds]
                              for source in (tmp_path / "runs", again / "digest.json"))
    assert np.allclose(from_digest, [[math.log(2) / math.log(8), 1.0, 1.0]] * 3, atol=1e-4)
    assert np.allclose(from_digest, from_runs, atol=1e-4)
    # a digest written before it kept the curve still reports, without the entropy plot
    old = json.loads((first / "digest.json").read_text())
    for entry in old:
        for seed in entry["seeds"]:
            seed.pop("routing_entropy_curve", None)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "digest.json").write_text(json.dumps(old))
    assert report_main([str(tmp_path / "old" / "digest.json"), "--out",
                        str(tmp_path / "from_old")]) == 0
    assert not (tmp_path / "from_old" / "routing_entropy.png").exists()
    # the routing heat map is of the best epoch (2 of 3 here), which the digest keeps
    assert (again / "routing.png").read_bytes()[:4] == b"\x89PNG"
    [merged] = [r for r in collect([again / "digest.json"]) if r.is_gmoe]
    assert merged.fingerprint == "f" * 16 and [s["seed"] for s in merged.seeds] == [0, 1, 2]


def test_a_foreign_digest_is_skipped_with_its_name(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "digest.json").write_text('[{"label": "x"}]')
    assert collect([tmp_path / "digest.json"]) == []
    assert f"Skipping {tmp_path / 'digest.json'}: not a readable gmoe-report digest.json" in caplog.text


def test_rows_differing_in_the_gate_are_named_by_it() -> None:
    from gmoe_bench.reports.table import _name_rows

    rows = [result("gcn", {**GMOE, "gate": gate}, [0.7]) for gate in ("top_k", "expert_choice")]
    _name_rows(rows)
    assert [r.label for r in rows] == ["gate=top_k", "gate=expert_choice"]


def test_gmoe_is_compared_only_with_a_backbone_trained_on_the_same_data() -> None:
    gcn_a = result("gcn", PLAIN, [0.68, 0.69, 0.70])
    gcn_b = result("gcn", PLAIN, [0.78, 0.79, 0.80])
    gmoe = result("gcn", GMOE, [0.70, 0.71, 0.72], hidden=150)
    gcn_a.fingerprint, gcn_b.fingerprint, gmoe.fingerprint = "a" * 16, "b" * 16, "a" * 16
    assert [g.backbone for g in gains([gcn_b, gcn_a, gmoe])] == [gcn_a]
    gmoe.fingerprint = None  # runs from before the data was recorded match any copy
    assert [g.backbone for g in gains([gcn_b, gcn_a, gmoe])] == [gcn_b, gcn_a]


def test_configs_building_the_same_network_keep_a_row_each() -> None:
    from gmoe_bench.reports.table import _name_rows

    # the plain backbone ignores scale_hidden: one network, two configs
    rows = [result("gcn", {**PLAIN, "scale_hidden": scale}, [t]) for scale, t in
            ((True, 0.51), (False, 0.71))]
    _name_rows(rows)
    assert [r.label for r in rows] == ["gcn moe.scale_hidden=True",
                                       "gcn moe.scale_hidden=False"]
    table = markdown_table(rows)
    assert "| 51.00 |" in table and "| **71.00** |" in table


def test_a_summary_of_another_schema_is_skipped_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_run(tmp_path / "good", GMOE, [0.7, 0.72], hidden=150)
    write_run(tmp_path / "other", GMOE, [0.6], hidden=150)
    summary = json.loads((tmp_path / "other" / "summary.json").read_text())
    summary["config"]["moe"]["old_key"] = 1
    (tmp_path / "other" / "summary.json").write_text(json.dumps(summary))
    (found,) = collect([tmp_path])
    assert [s["test"] for s in found.seeds] == [0.7, 0.72]
    assert f"Skipping {tmp_path / 'other' / 'summary.json'}: its config is not one" in caplog.text
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0


def test_each_dataset_column_names_its_own_metric() -> None:
    hiv = result("gcn", PLAIN, [0.75])
    esol = result("gcn", PLAIN, [1.1], metric="rmse")
    esol.dataset = "ogbg-molesol"
    header = markdown_table([hiv, esol]).splitlines()[0]
    assert "ogbg-molesol (test rmse) |" in header
    assert "ogbg-molbbbp (test rocauc × 100) |" in header


def test_one_config_on_two_copies_of_the_data_is_two_rows() -> None:
    from gmoe_bench.reports.table import _name_rows

    rows = [result("gcn", GMOE, [t]) for t in (0.6, 0.7)]
    rows[0].fingerprint, rows[1].fingerprint = "a" * 16, "b" * 16
    _name_rows(rows)
    assert [r.label for r in rows] == ["gcn data=aaaaaaaa", "gcn data=bbbbbbbb"]


def test_expert_choice_rows_that_differ_in_evaluation_batch_keep_a_row_each() -> None:
    """Expert choice's capacity follows the batch, so its evaluation batch size is part of what
    the config computes: two such configs are two rows, named by it."""
    from gmoe_bench.reports.table import _name_rows

    rows = [result("gcn", {**GMOE, "gate": "expert_choice"}, [t]) for t in (0.81, 0.61)]
    rows[1].config["trainer"]["eval_batch_size"] = 32
    _name_rows(rows)
    assert [r.label for r in rows] == ["trainer.eval_batch_size=256", "trainer.eval_batch_size=32"]
    table = markdown_table(rows)
    assert "| **81.00** |" in table and "| 61.00 |" in table


def test_runs_from_before_a_key_existed_are_named_by_its_default() -> None:
    """A run stored before ``moe.gate`` existed used the top-k gate: no ``gate=None`` in its name."""
    from gmoe_bench.reports.table import _name_rows

    old = result("gcn", GMOE, [0.7])
    new = result("gcn", {**GMOE, "gate": "top_k", "top_k": 2}, [0.7])
    _name_rows([old, new])
    assert [old.label, new.label] == ["k=4 width=150", "k=2 width=212"]


def test_details_and_plots_leave_out_shares_the_gate_fixes(tmp_path: Path) -> None:
    """Dense gating (every node to every expert) and expert choice (every expert at capacity) make
    the shares even by construction: no entropy, load CV² or heat map that would call them
    balanced; top-k's shares are reported."""
    from gmoe_bench.reports.plots import routing_heatmaps

    for name, moe in (("topk", GMOE), ("dense", {**GMOE, "gate": "dense"}),
                      ("all", {**GMOE, "top_k": 8})):
        write_run(tmp_path / "runs" / name, moe, [0.7, 0.72], hidden=300)
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    details = {line.split(" | ")[0].strip("| "): line.split(" | ")[-3:]
               for line in (tmp_path / "report" / "details.md").read_text().splitlines()[2:]}
    assert details["gate=top_k k=4 width=150"] == ["1.000", "0.0000", "0.000 |"]
    for label in ("gate=dense k=4 width=150", "gate=top_k k=8 width=106"):
        assert details[label] == ["fixed by the gate", "fixed by the gate", "fixed by the gate |"]
    fixed = [r for r in collect([tmp_path / "runs"]) if r.shares_fixed]
    assert len(fixed) == 2 and not routing_heatmaps(fixed, tmp_path / "routing.png")
    assert not (tmp_path / "routing.png").exists()


def test_a_digest_beside_its_own_run_folders_lists_each_job_once(tmp_path: Path) -> None:
    write_run(tmp_path / "runs" / "gmoe", GMOE, [0.70, 0.72], hidden=150)
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    (merged,) = collect([tmp_path / "report" / "digest.json", tmp_path / "runs"])
    assert len(merged.seeds) == 2 and len(merged.jobs) == 1


def test_a_seed_in_a_digest_and_a_run_folder_is_taken_from_the_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the digest's folder sorts before the runs' ("0" < "a" < "b"): the order of paths decides the
    # order of rows, not which copy of a seed is kept
    write_run(tmp_path / "a_plain" / "gcn", PLAIN, [0.68, 0.69], hidden=300)
    write_run(tmp_path / "b_runs" / "gmoe", GMOE, [0.70, 0.72], hidden=150)
    assert report_main([str(tmp_path / "a_plain"), str(tmp_path / "b_runs"), "--out",
                        str(tmp_path / "0_report")]) == 0
    digest_path = tmp_path / "0_report" / "digest.json"
    plain, gmoe = collect([digest_path, tmp_path / "b_runs"])
    assert not plain.is_gmoe and gmoe.is_gmoe  # the digest's row order
    # the folder's record has the routing of every epoch, the digest's only of the best
    assert all(e["routing"] for s in gmoe.seeds for e in s["epochs"])
    assert f"ignoring {digest_path}" in caplog.text


def test_a_single_seed_shows_its_value_without_a_spread() -> None:
    """std over one seed is 0 by arithmetic, not because the run repeats: no "± 0.0000"."""
    from gmoe_bench.tracking.summary import aggregate, summary_line

    one = aggregate([{"valid": 0.9, "test": 0.7}])
    assert summary_line("ogbg-molbbbp", "gcn", "rocauc", one) == (
        "ogbg-molbbbp gcn: test rocauc 0.7000 (valid 0.9000), 1 seed")
    two = aggregate([{"valid": 0.9, "test": 0.7}, {"valid": 0.8, "test": 0.72}])
    assert summary_line("ogbg-molbbbp", "gcn", "rocauc", two) == (
        "ogbg-molbbbp gcn: test rocauc 0.7100 ± 0.0100 (valid 0.8500 ± 0.0500), 2 seeds")
