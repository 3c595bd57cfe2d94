"""A non-editable install (a wheel) works away from the checkout, and gmoe-report needs no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gmoe_bench.records import SUMMARY_FILE, EpochRecord, SeedResult, write_json_atomic
from tests.conftest import REPO
from tests.test_robustness import compose_cfg


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GMOE_DATA_MIRROR", "PYTHONPATH")}
    return {**env, "WANDB_SILENT": "true", **extra}


@pytest.mark.slow
def test_wheel_trains_from_another_directory(tmp_path: Path, small_mirror: Path) -> None:
    """Build a wheel from a copy of the sources, install it (not editable) into a folder of its own,
    and train from a directory that holds no configs: gmoe-train finds the configs it ships."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "gmoe_bench", source / "gmoe_bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("gmoe_bench-*.whl"))
    site = tmp_path / "site"
    # --no-deps: torch and the rest come from this environment; only gmoe-bench is new
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env(PYTHONPATH=str(site), GMOE_DATA_MIRROR=str(small_mirror),
                     GMOE_DATA_ROOT=str(tmp_path / "data"))
    where = subprocess.run([sys.executable, "-c", "import gmoe_bench; print(gmoe_bench.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout

    train = [sys.executable, str(site / "bin" / "gmoe-train")]
    helped = subprocess.run([*train, "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "ogbg-molbbbp" in helped.stdout  # the dataset group, read from the installed configs

    ran = subprocess.run([*train, "trainer.epochs=1", "seeds=[0]", "logger=none", "trainer.progress=false",
                          "hydra.run.dir=run", f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert [s["seed"] for s in summary["seeds"]] == [0]


def test_report_and_select_run_without_torch_or_git(tmp_path: Path, small_mirror: Path) -> None:
    """gmoe-report and gmoe-select read JSON and write text: neither importing nor running them
    loads torch or the training code, and they run no git (a `git` on PATH that leaves a mark)."""
    jobs = {"gcn": ((), 0.9), "gmoe_k1": (("moe=gmoe", "moe.top_k=1"), 0.8),
            "gmoe_k2": (("moe=gmoe", "moe.top_k=2"), 0.85)}  # name: (overrides, validation)
    for name, (overrides, valid) in jobs.items():
        config = OmegaConf.to_container(compose_cfg(tmp_path, small_mirror, *overrides), resolve=True)
        seeds = [SeedResult(seed, best_epoch=1, valid=valid, test=0.7 + seed / 100,
                            wall_seconds=1.0, num_parameters=10, commit=None,
                            epochs=[EpochRecord(1, 0.5, 0.0, valid, 0.7 + seed / 100, 1.0, 10.0,
                                                0)]).to_dict()
                 for seed in (0, 1)]
        (tmp_path / "runs" / name).mkdir(parents=True)
        write_json_atomic(tmp_path / "runs" / name / SUMMARY_FILE, {
            "dataset": "ogbg-molbbbp", "model": name, "metric": "rocauc", "config": config,
            "provenance": {"command": "gmoe-train"}, "seeds": seeds})
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text(f"#!/bin/sh\ntouch {tmp_path / 'git_ran'}\nexit 1\n")
    (fake_bin / "git").chmod(0o755)
    runs, out = str(tmp_path / "runs"), str(tmp_path / "report")
    check = ("import sys; from gmoe_bench.reports.cli import main, select_main; "
             f"assert main([{runs!r}, '--out', {out!r}]) == 0; "
             f"assert select_main([{runs!r}, '--backbone', 'gcn']) == 0; "
             "heavy = sorted(m for m in ('torch', 'torch_geometric', 'ogb', 'gmoe_bench.engine', "
             "'gmoe_bench.model', 'gmoe_bench.data') if m in sys.modules); "
             "assert not heavy, heavy")
    env = _clean_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "70.50 ± 0.50" in (tmp_path / "report" / "table.md").read_text()
    # the plain GCN is no candidate; of the two GMoE jobs, k=2 has the higher validation
    assert done.stdout.splitlines()[-1] == "moe.top_k=2"
    assert "`gmoe-train +experiment=paper_selected moe.top_k=2`" in (
        tmp_path / "report" / "paper.md").read_text()
    assert not (tmp_path / "git_ran").exists()
