"""End-to-end runs of gmoe-train as a user starts it (Hydra overrides on the command line)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_cli_subprocess


def load_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_baseline_two_seeds_end_to_end(small_mirror: Path, tmp_path: Path) -> None:
    # the one run through the real command (a new process); the other tests call main() in-process
    proc = run_cli_subprocess("model=gin", "seeds=[0,1]", "trainer.epochs=2", "logger=none",
                   cwd=tmp_path, mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path)
    assert summary["complete"] and summary["metric"] == "rocauc"
    assert [s["seed"] for s in summary["seeds"]] == [0, 1]
    for seed in summary["seeds"]:
        assert len(seed["epochs"]) == 2
        best = seed["epochs"][seed["best_epoch"] - 1]
        assert best["valid"] == max(e["valid"] for e in seed["epochs"]) == seed["valid"]
        assert best["test"] == seed["test"]
        assert 0.0 <= seed["test"] <= 1.0 and seed["wall_seconds"] > 0
    agg = summary["aggregate"]
    tests = [s["test"] for s in summary["seeds"]]
    assert agg["test_mean"] == pytest.approx(sum(tests) / 2)
    assert agg["test_std"] == pytest.approx(abs(tests[0] - tests[1]) / 2)
    assert summary["config"]["model"]["backbone"] == "gin"
    assert "model=gin 'seeds=[0,1]'" in summary["provenance"]["command"]  # shell-quoted
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("ogbg-molbbbp gin: test rocauc ")
    assert last_line.endswith(", 2 seeds")


def test_same_seed_on_cpu_repeats_exactly(small_mirror: Path, tmp_path: Path) -> None:
    curves = []
    for attempt in ("a", "b"):
        workdir = tmp_path / attempt
        workdir.mkdir()
        proc = run_cli("moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2", "seeds=[3]",
                       "trainer.epochs=2", "dataset.drop_node_p=0.2", "logger=none",
                       cwd=workdir, mirror=small_mirror, data_root=tmp_path / "data")
        assert proc.returncode == 0, proc.stderr
        seed = load_summary(workdir)["seeds"][0]
        curves.append([(e["train_loss"], e["valid"], e["test"], e["routing"])
                       for e in seed["epochs"]])
    assert curves[0] == curves[1]


@pytest.mark.parametrize("backbone", ["gcn", "gin"])
def test_gmoe_with_hop2_experts_and_node_drop(small_mirror: Path, tmp_path: Path,
                                              backbone: str) -> None:
    proc = run_cli(f"model={backbone}", "moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2",
                   "moe.loss_weight=1", "dataset.drop_node_p=0.2", "seeds=[0]",
                   "trainer.epochs=2", "logger=none",
                   cwd=tmp_path, mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path)
    epoch = summary["seeds"][0]["epochs"][-1]
    assert summary["model"] == f"gmoe-{backbone} n=4 hop2=2 k=2 λ=1"
    assert len(epoch["routing"]) == 5  # one row per layer
    for layer in epoch["routing"]:
        assert sum(layer) == pytest.approx(1.0, abs=1e-4)
        assert sum(layer[2:]) > 0  # hop-2 experts receive nodes
    assert epoch["aux_loss"] > 0 and math.isfinite(epoch["train_loss"])


def test_bad_config_is_one_paragraph_and_exit_2(small_mirror: Path, tmp_path: Path) -> None:
    proc = run_cli("moe.num_experts=4", "moe.top_k=8", cwd=tmp_path, mirror=small_mirror,
                   data_root=tmp_path / "data")
    assert proc.returncode == 2
    assert "gmoe-train: error: moe.top_k=8 must be between 1 and moe.num_experts=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # rejected before any data was touched


@pytest.mark.parametrize(("overrides", "message"), [
    (("hydra.run.dir={file}",), "cannot create the output folder {file} (File exists); set "
                                "hydra.run.dir (hydra.sweep.dir for a sweep) to a folder"),
    (("-m", "hydra.sweep.dir={file}/sweep"), "cannot create the output folder {file}/sweep (Not a "
                                             "directory)"),
    (("trainer=null",), "Config group override must be a string or a list. Got NoneType. A "
                        "config group (model=, trainer=, ...) takes one of its options"),
    # another ValueError of Hydra's: said alone, without the config-group hint
    (("-m", "--cfg=job"), "Only one of --run, --multirun, --cfg, --info and --shell_completion "
                          "can be specified.\n"),
])
def test_unusable_output_folders_and_empty_groups_are_one_sentence(
        small_mirror: Path, tmp_path: Path, overrides: tuple[str, ...], message: str) -> None:
    file = tmp_path / "taken"
    file.write_text("the user's")
    proc = run_cli(*(o.format(file=file) for o in overrides), "seeds=[0]", cwd=tmp_path,
                   mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 2
    assert f"gmoe-train: error: {message.format(file=file)}" in proc.stderr
    assert "Traceback" not in proc.stderr and file.read_text() == "the user's"
    assert ("config group" in proc.stderr) == ("trainer=null" in overrides)


def test_cuda_without_a_gpu_is_a_config_error(small_mirror: Path, tmp_path: Path) -> None:
    proc = run_cli("trainer.device=cuda", "trainer.epochs=1", "seeds=[0]", cwd=tmp_path,
                   mirror=small_mirror, data_root=tmp_path / "data")
    if proc.returncode == 0:
        pytest.skip("this machine has a CUDA device")
    assert proc.returncode == 2
    assert "trainer.device=cuda but this machine has 0 visible CUDA device(s)" in proc.stderr


def test_help_lists_the_config_groups(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path, mirror=None, data_root=tmp_path)
    assert proc.returncode == 0
    for group in ("dataset: ogbg-molbace, ogbg-molbbbp, ogbg-molclintox", "model: gcn, gin",
                  "moe: gmoe, none", "trainer: default", "logger: none, wandb", "preset: official",
                  "hparams_search: gmoe_optuna"):
        assert group in proc.stdout
    # the groups outside the defaults, and the launchers, which Hydra's own list leaves out
    assert "add them with a +\n(+experiment=paper_molbbbp, +capacity=gcn_wide)" in proc.stdout
    assert "hydra/launcher=parallel (n_jobs on this machine), slurm or slurm_local" in proc.stdout


@pytest.mark.real_data
@pytest.mark.skipif(not os.environ.get("GMOE_DATA_MIRROR"), reason="needs GMOE_DATA_MIRROR")
def test_real_molbbbp_gcn_two_seeds(tmp_path: Path) -> None:
    mirror = Path(os.environ["GMOE_DATA_MIRROR"])
    # the real dataset end to end; a narrower GCN (64) keeps it quick, and still above chance
    proc = run_cli("dataset=ogbg-molbbbp", "model=gcn", "model.hidden_dim=64", "seeds=[0,1]",
                   "trainer.epochs=2", "logger=none", cwd=tmp_path, mirror=mirror,
                   data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path)
    assert len(summary["seeds"]) == 2
    assert 0.5 < summary["aggregate"]["test_mean"] < 1.0
    assert sum(len(s["epochs"]) for s in summary["seeds"]) == 4


@pytest.mark.parametrize("gate", ["dense", "expert_choice", "random"])
def test_every_gate_trains_and_reports_its_routing(small_mirror: Path, tmp_path: Path,
                                                  gate: str) -> None:
    proc = run_cli("moe=gmoe", "moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2",
                   f"moe.gate={gate}", "seeds=[0]", "trainer.epochs=1", "logger=none",
                   cwd=tmp_path, mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path)
    assert summary["model"] == f"gmoe-gcn n=4 hop2=2 k=2 λ=1 gate={gate}"
    epoch = summary["seeds"][0]["epochs"][-1]
    for layer in epoch["routing"]:
        assert sum(layer) == pytest.approx(1.0, abs=1e-4) and min(layer) > 0
    assert math.isfinite(epoch["train_loss"]) and 0.0 <= summary["seeds"][0]["test"] <= 1.0
