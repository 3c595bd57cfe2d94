"""Hydra multirun through the launchers, and gmoe-report on the sweep folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gmoe_bench.reports.cli import main as report_main
from gmoe_bench.reports.table import collect
from tests.conftest import cli_env, run_cli

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
    assert "gmoe-train: error: in the sweep job '" in proc.stderr and " moe.top_k=3 " in proc.stderr
    assert "': moe.top_k=3 must be between 1 and moe.num_experts=2. No job was run." in proc.stderr
    assert not out.exists() and not (tmp_path / "data").exists()


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
    proc = run_cli("hparams_search=gmoe_optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={out}",
                   *FAST, cwd=tmp_path, mirror=small_mirror, data_root=tmp_path / "data")
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
