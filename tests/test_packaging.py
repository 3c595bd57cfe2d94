"""A non-editable install (a wheel) works away from the checkout, and gmoe-report needs no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


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


def test_report_and_select_import_no_torch() -> None:
    """gmoe-report and gmoe-select read JSON and write tables: importing them loads neither torch
    nor the training code, and runs no git."""
    check = ("import sys, gmoe_bench.reports.cli; "
             "heavy = sorted(m for m in ('torch', 'torch_geometric', 'ogb', 'gmoe_bench.engine', "
             "'gmoe_bench.model', 'gmoe_bench.data.ogb') if m in sys.modules); "
             "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
