"""Hydra multirun through the launchers, and gmoe-report on the sweep folders."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gmoe_bench.config import CONFIG_DIR
from gmoe_bench.reports.cli import main as report_main
from gmoe_bench.reports.table import collect
from gmoe_bench.sweep_check import CheckSweepJobs
from tests.conftest import REPO, cli_env, run_cli

# A small network: the sweep tests are about launchers, folders and reports, not the model.
SMALL = ("model.hidden_dim=32", "model.num_layers=2")


def sweep(tmp_path: Path, mirror: Path, *overrides: str) -> Path:
    out = tmp_path / "sweep"
    proc = run_cli("-m", f"hydra.sweep.dir={out}", "trainer.epochs=2", "trainer.cpu_threads=1",
                   *overrides, cwd=tmp_path, mirror=mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_job_through_submitit_local(small_mirror: Path, tmp_path: Path) -> None:
    # a process of its own, as on SLURM (one job: the grids' folders and reports are checked on the
    # in-process sweeps below; each submitit job starts torch and W&B anew)
    out = sweep(tmp_path, small_mirror, "hydra/launcher=slurm_local", "moe.num_experts=2",
                "moe.num_hop2=1", "moe.top_k=2", "seeds=[0,1]", "logger.wandb.timeout=120", *SMALL)
    (job,) = out.glob("*/summary.json")
    assert list((out / ".submitit").glob("*/*_log.out"))  # ran through submitit's executor
    summary = json.loads(job.read_text())
    assert summary["complete"] and len(summary["seeds"]) == 2
    assert len(list((job.parent / "wandb").glob("offline-run-*/*.wandb"))) == 3  # 2 seeds + summary
    # the job's command re-runs it alone, with its sweep's values (not submitit's argv)
    command = summary["provenance"]["command"].split()
    assert command[0] == "gmoe-train" and "moe.top_k=2" in command


def test_grid_to_report(small_mirror: Path, tmp_path: Path) -> None:
    out = sweep(tmp_path, small_mirror, "moe.num_experts=2,4", "moe.top_k=1,2", "moe.num_hop2=1",
                "seeds=[0,1]", "logger=none", *SMALL)
    report = tmp_path / "report"
    assert report_main([str(out), "--out", str(report), "--title", "grid"]) == 0
    table = (report / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| n=")]
    assert [r.split(" | ")[0] for r in rows] == ["| n=2 k=1 width=32", "| n=2 k=2 width=23",
                                               "| n=4 k=1 width=32", "| n=4 k=2 width=23"]
    assert sum("**" in r for r in rows) == 1  # the best row of the column
    assert all(r.endswith("| 2 |") for r in rows)  # seeds per row
    assert (report / "table.tex").read_text().count(r"\\") == 5
    assert len((report / "table.csv").read_text().splitlines()) == 5
    details = [line for line in (report / "details.md").read_text().splitlines()
               if line.startswith("| n=")]
    assert len(details) == 4 and all(line.count(" | ") == 10 for line in details)
    # n=2, k=2: both experts for every node, shares fixed by the gate
    assert details[1].endswith(" | fixed by the gate" * 3 + " |")
    chosen = [line.split(" | ") for i, line in enumerate(details) if i != 1]
    entropy, imbalance = ([float(cells[c]) for cells in chosen] for c in (8, 9))
    assert all(0.0 < e <= 1.0 for e in entropy)
    assert all(i >= 0.0 for i in imbalance) and max(imbalance) > 0.0
    runs = json.loads((report / "digest.json").read_text())
    assert [len(r["seeds"]) for r in runs] == [2, 2, 2, 2]
    for run in runs:  # each job's command re-runs that job alone, with its own sweep values
        (job,) = run["jobs"]
        n, k = run["config"]["moe"]["num_experts"], run["config"]["moe"]["top_k"]
        assert job["provenance"]["command"].startswith("gmoe-train ")
        assert f"moe.num_experts={n}" in job["provenance"]["command"].split()
        assert f"moe.top_k={k}" in job["provenance"]["command"].split()
    assert all(len(s["valid_curve"]) == 2 and len(s["routing_at_best"]) == 2
               for r in runs for s in r["seeds"])
    for plot in ("metric.png", "valid_curves.png", "routing.png", "routing_entropy.png"):
        assert (report / plot).read_bytes()[:4] == b"\x89PNG"


def test_a_bad_job_fails_the_sweep_before_any_job_runs(small_mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = run_cli("-m", f"hydra.sweep.dir={out}", "moe=gmoe", "moe.num_experts=2",
                   "moe.num_hop2=1", "moe.top_k=1,3", "seeds=[0]", "logger=none", *SMALL,
                   # resolved per job, as the launcher resolves it
                   f"trainer.checkpoint_dir={tmp_path}/ckpt/${{hydra:job.num}}", cwd=tmp_path,
                   mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 2
    # the job named by its own sweep value, not the overrides every job shares
    assert ("gmoe-train: error: in the sweep job 'moe.top_k=3': moe.top_k=3 must be between 1 and "
            "moe.num_experts=2. No job was run.") in proc.stderr
    assert not out.exists() and not (tmp_path / "data").exists()


def refused(tmp_path: Path, mirror: Path, *overrides: str) -> str:
    """gmoe-train's one-line error for a sweep it refuses before any job runs (nothing trained)."""
    proc = run_cli(*overrides, "logger=none", "trainer.cpu_threads=1", *SMALL, cwd=tmp_path,
                   mirror=mirror, data_root=tmp_path / "data")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("summary.json"))
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("gmoe-train: error:")]
    return line


def test_a_dataset_missing_from_the_mirror_fails_the_sweep_at_once(small_mirror: Path,
                                                                     tmp_path: Path) -> None:
    # the small mirror holds ogbg-molbbbp only: job 1's dataset, not job 0's training, fails first
    line = refused(tmp_path, small_mirror, "-m", f"hydra.sweep.dir={tmp_path / 's'}",
                   "dataset=ogbg-molbbbp,ogbg-molbace")
    assert "in the sweep job 'dataset=ogbg-molbace': " in line
    assert f"The data mirror {small_mirror} has no folder 'ogbg_molbace'" in line
    line = refused(tmp_path, small_mirror, "-m", f"hydra.sweep.dir={tmp_path / 's'}",
                   "dataset.name=ogbg-molbbbp,ogbg-molbbp")
    assert "did you mean dataset.name=ogbg-molbbbp?" in line


def test_the_other_modes_output_folder_is_refused(small_mirror: Path, tmp_path: Path) -> None:
    # Hydra reads hydra.run.dir only in a single run, hydra.sweep.dir only in a sweep
    line = refused(tmp_path, small_mirror, "+experiment=paper_baselines",
                   f"hydra.run.dir={tmp_path / 'mine'}")
    assert f"give hydra.sweep.dir={tmp_path / 'mine'} instead" in line
    line = refused(tmp_path, small_mirror, f"hydra.sweep.dir={tmp_path / 'mine'}")
    assert f"give hydra.run.dir={tmp_path / 'mine'} instead, or add -m" in line
    assert not (tmp_path / "mine").exists()


def test_a_search_refuses_a_choice_it_would_override(small_mirror: Path, tmp_path: Path) -> None:
    line = refused(tmp_path, small_mirror, "hparams_search=gmoe_optuna", "experts=n8_hop2",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    assert ("experts=n8_hop2 sets moe.num_experts, moe.num_hop2, which the search "
            "(hydra.sweeper.params) varies in every trial, so it would have no effect") in line
    assert "(moe.num_experts=8 moe.num_hop2=8)" in line


def test_jobs_that_compute_the_same_run_are_refused(small_mirror: Path, tmp_path: Path) -> None:
    # k without experts: three jobs of one plain GCN, sharing its checkpoints (at once in parallel)
    line = refused(tmp_path, small_mirror, "-m", "hydra/launcher=parallel",
                   f"hydra.sweep.dir={tmp_path / 's'}", "moe.top_k=1,2,4", "seeds=[0]")
    assert ("the sweep jobs #0 'moe.top_k=1' and #1 'moe.top_k=2' train the same configuration on "
            "seeds [0] (moe.top_k=2 has no effect") in line
    assert "add moe=gmoe to sweep GMoE" in line
    # a repeated seed two jobs apart, a job of other seeds between them
    line = refused(tmp_path, small_mirror, "-m", f"hydra.sweep.dir={tmp_path / 's'}",
                   "seeds=[0,1],[2],[1]")
    assert "the sweep jobs #0 'seeds=[0,1]' and #2 'seeds=[1]' train the same configuration on " \
           "seeds [1]; drop the repeated value" in line


def test_slurm_without_slurm_is_one_sentence(small_mirror: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    line = refused(tmp_path, small_mirror, "-m", "hydra/launcher=slurm",
                   f"hydra.sweep.dir={tmp_path / 's'}", "seeds=[0]")
    assert line == ("gmoe-train: error: hydra/launcher=slurm submits to SLURM, but this machine has "
                    "no srun; start the sweep on the cluster's login node, or try it here with "
                    "hydra/launcher=slurm_local.")


def test_a_launcher_or_sweeper_key_names_the_choice_that_has_it(small_mirror: Path,
                                                                 tmp_path: Path) -> None:
    line = refused(tmp_path, small_mirror, "-m", "hydra.launcher.n_jobs=2",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    assert line == ("gmoe-train: error: 'hydra.launcher.n_jobs' is not a key of the launcher this "
                    "command uses; choose the launcher that has it first: hydra/launcher=parallel.")
    line = refused(tmp_path, small_mirror, "hydra.sweeper.n_trials=5")
    assert line.endswith("choose the sweeper that has it first: hparams_search=gmoe_optuna.")
    # a misspelling of the chosen launcher's key names the key, not another launcher
    line = refused(tmp_path, small_mirror, "-m", "hydra/launcher=parallel", "hydra.launcher.n_job=2",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    assert line == ("gmoe-train: error: 'hydra.launcher.n_job' is not a key of any launcher "
                    "gmoe-train offers; did you mean hydra.launcher.n_jobs?")


def test_seeds_spread_over_jobs_are_merged(small_mirror: Path, tmp_path: Path) -> None:
    # a '..' in an override once cancelled the job number in the folder name: jobs overwrote each other
    out = sweep(tmp_path, small_mirror, "model=gcn,gin", "seeds=[0],[1]", "logger=none",
                "dataset.root=data/../data")
    assert len(list(out.glob("*/summary.json"))) == 4
    results = collect([out])
    assert sorted(r.label for r in results) == ["gcn", "gin"]
    assert all(sorted(s["seed"] for s in r.seeds) == [0, 1] for r in results)


def test_report_without_results_is_an_error(tmp_path: Path, capsys) -> None:
    assert report_main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no summary.json" in capsys.readouterr().err


FAST = ("trainer.epochs=1", "trainer.cpu_threads=1", "model.hidden_dim=16", "model.num_layers=2",
        "logger=none", "seeds=[0]")


def test_optuna_search_without_dash_m(small_mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    # moe=gmoe, which the search's config chooses itself, is no conflict with it
    proc = run_cli("hparams_search=gmoe_optuna", "moe=gmoe", "hydra.sweeper.n_trials=3",
                   f"hydra.sweep.dir={out}", *FAST, cwd=tmp_path, mirror=small_mirror,
                   data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    assert len(trials) == 3 and all(t["config"]["moe"]["num_experts"] in (4, 8) for t in trials)
    best = (out / "optimization_results.yaml").read_text()
    best_valid = max(t["aggregate"]["valid_mean"] for t in trials)
    assert f"best_value: {best_valid}" in best  # the objective is the mean validation metric


def test_grid_experiment_sweeps_without_dash_m(small_mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    proc = run_cli("+experiment=paper_baselines", f"hydra.sweep.dir={out}", *FAST, cwd=tmp_path,
                   mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    backbones = sorted(json.loads(p.read_text())["config"]["model"]["backbone"]
                       for p in out.glob("*/summary.json"))
    assert backbones == ["gcn", "gin"]  # both jobs of the grid, not one default configuration


def make_target(target: str, tmp_path: Path, mirror: Path, args: str) -> None:
    """``make target`` of the repository's Makefile, run in ``tmp_path`` (its multirun/ and
    results/ land there) with this interpreter's scripts and the small mirror."""
    repo = Path(__file__).resolve().parents[1]
    env = cli_env(mirror, tmp_path / "data")
    proc = subprocess.run(
        ["make", "-f", str(repo / "Makefile"), "-C", str(tmp_path), target,
         f"BIN={Path(sys.executable).parent}", "STAMP=", f"ARGS={args}"],
        capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_make_reproduce_official_trains_the_five_rows_and_reports(
        small_mirror: Path, tmp_path: Path) -> None:
    """The preset=official table end to end: GCN and GIN at width 300 with node dropping, GMoE-GCN
    and GMoE-GIN with n=8 all hop-1, GMoE-GCN with n=8 all hop-2 (k=4, width 150, mean, dense),
    each GMoE row set against its backbone."""
    make_target("reproduce-official", tmp_path, small_mirror,
                "trainer.epochs=1 'seeds=[0,1]' model.num_layers=2 logger=none "
                "trainer.cpu_threads=1 trainer.progress=false")
    runs = json.loads((tmp_path / "results/official_molbbbp/digest.json").read_text())
    rows = {(r["config"]["model"]["backbone"], r["config"]["moe"]["num_experts"],
             r["config"]["moe"]["num_hop2"], r["config"]["model"]["hidden_dim"]): r for r in runs}
    assert set(rows) == {("gcn", 0, 0, 300), ("gin", 0, 0, 300), ("gcn", 8, 0, 150),
                         ("gin", 8, 0, 150), ("gcn", 8, 8, 150)}
    for run in runs:
        assert run["config"]["dataset"]["drop_node_p"] == 0.2 and len(run["seeds"]) == 2
        assert run["config"]["trainer"]["epochs"] == 1  # ARGS come last
    for key in ((8, 0), (8, 8)):
        moe = rows[("gcn", *key, 150)]["config"]["moe"]
        assert (moe["combine"], moe["dispatch"], moe["top_k"], moe["loss_weight"]) == (
            "mean", "dense", 4, 1.0)
    gains = (tmp_path / "results/official_molbbbp/table.csv").read_text().splitlines()
    assert sum(line.split(",")[0].startswith("gcn n=8") for line in gains[1:]) == 2
    assert all(",gcn width=300," in line for line in gains[1:] if line.startswith("gcn n=8"))


def test_make_reproduce_official_ablation_changes_one_setting_per_run(
        small_mirror: Path, tmp_path: Path) -> None:
    make_target("reproduce-official-ablation", tmp_path, small_mirror,
                "trainer.epochs=1 model.num_layers=2 logger=none trainer.cpu_threads=1 "
                "trainer.progress=false")
    runs = tmp_path / "multirun/official_ablation_30ep"
    configs = {d.name: json.loads((d / "summary.json").read_text())["config"]
               for d in runs.iterdir()}
    assert set(configs) == {"preset", "no_drop", "sum", "sparse"}
    preset = configs.pop("preset")
    assert preset["seeds"] == [0, 1] and preset["moe"]["num_experts"] == 8
    changed = {name: [(section, key) for section in ("dataset", "model", "moe")
                      for key in preset[section] if config[section][key] != preset[section][key]]
               for name, config in configs.items()}
    assert changed == {"no_drop": [("dataset", "drop_node_p")], "sum": [("moe", "combine")],
                       "sparse": [("moe", "dispatch")]}
    assert (tmp_path / "results/official_ablation_30ep/table.md").exists()


def documented_sweeps() -> list[str]:
    """Every complete ``gmoe-train -m`` example of the launcher configs' comments and the docs, and
    every experiment's grid."""
    sources = [*(REPO / "gmoe_bench" / "configs" / "hydra" / "launcher").glob("*.yaml"),
               REPO / "docs" / "sweeps.md", REPO / "README.md"]
    lines = [line.strip().lstrip("#").split("  #")[0].strip()
             for path in sources for line in path.read_text().splitlines()]
    experiments = [f"gmoe-train -m +experiment={path.stem}"
                   for path in (REPO / "gmoe_bench" / "configs" / "experiment").glob("*.yaml")]
    return sorted({line for line in lines if line.startswith("gmoe-train -m ") and "..." not in line}
                  | set(experiments))


@pytest.mark.parametrize("command", documented_sweeps())
def test_documented_sweeps_pass_the_pre_check(command: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a documented example that trains one configuration several times (k without moe=gmoe) once
    # sat in the launcher configs; each is composed and checked as gmoe-train checks it
    monkeypatch.delenv("GMOE_DATA_MIRROR", raising=False)  # no mirror: any dataset may download
    (tmp_path / "srun").touch(mode=0o755)  # as on a SLURM login node (the sweep is not launched)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    overrides = [arg for arg in shlex.split(command)[1:] if arg != "-m"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # the sweep's master config, as gmoe-train -m composes it
        cfg = GlobalHydra.instance().config_loader().load_configuration(
            config_name="train", overrides=overrides, run_mode=RunMode.MULTIRUN)
        monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
        HydraConfig.instance().set_config(cfg)
        CheckSweepJobs().on_multirun_start(cfg, config_name="train")  # exits 2 on a refusal
