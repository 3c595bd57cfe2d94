"""W&B offline files, and W&B failures that must not stop training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gmoe_bench.config import CONFIG_DIR
from gmoe_bench.train import train
from tests.conftest import run_cli
from tests.wandb_records import finished_runs


@pytest.mark.parametrize("seeds_per_group", [1, 2])
def test_offline_runs_hold_the_metrics(small_mirror: Path, tmp_path: Path,
                                       seeds_per_group: int) -> None:
    """One W&B run per seed with its curves and best epoch, and one summary run, whether the
    seeds train one at a time (logged live) or together (logged seed by seed at the end)."""
    proc = run_cli("moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2", "moe.loss_weight=1",
                   "seeds=[0,1]", "trainer.epochs=2", "logger.wandb.tags=[smoke]",
                   f"trainer.seeds_per_group={seeds_per_group}",
                   # time for W&B to write its run files on a busy machine (15 s is not always)
                   "logger.wandb.timeout=120",
                   cwd=tmp_path, mirror=small_mirror, data_root=tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    runs = finished_runs(tmp_path / "run" / "wandb", count=3)  # 2 seeds and the summary
    assert all("job_type" in r for r in runs), "a W&B run file has no run record"
    train_runs = sorted((r for r in runs if r["job_type"] == "train"), key=lambda r: r["name"])
    (summary_run,) = [r for r in runs if r["job_type"] == "summary"]
    assert len(train_runs) == 2
    assert len({r["group"] for r in runs}) == 1  # all seeds of a config in one group
    for run, seed in zip(train_runs, summary["seeds"], strict=True):
        assert run["name"].endswith(f"seed={seed['seed']}")
        history = run["history"]
        assert [row["epoch"] for row in history] == [1, 2]
        assert [row["valid/rocauc"] for row in history] == [e["valid"] for e in seed["epochs"]]
        assert history[-1]["routing/layer0/expert3"] == seed["epochs"][-1]["routing"][0][3]
        assert 0 < history[-1]["routing/hop2_share"] < 1
        assert history[-1]["train/aux_loss"] > 0 and history[-1]["time/graphs_per_s"] > 0
        assert run["summary"]["best/test_rocauc"] == seed["test"]
        assert run["summary"]["best/epoch"] == seed["best_epoch"]
    assert summary_run["summary"]["test_mean"] == pytest.approx(summary["aggregate"]["test_mean"])
    assert summary_run["summary"]["test_std"] == pytest.approx(summary["aggregate"]["test_std"])


def test_wandb_failure_warns_once_and_training_goes_on(
        small_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    calls = []

    def broken_init(*args, **kwargs):
        calls.append(kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb, "init", broken_init)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"dataset.mirror={small_mirror}", f"dataset.root={tmp_path / 'data'}",
            "seeds=[0,1]", "trainer.epochs=1", "trainer.progress=false",
            f"trainer.checkpoint_dir={tmp_path / 'ckpt'}", "logger.wandb.mode=offline"])
    with caplog.at_level(logging.WARNING):
        valid_mean = train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and len(summary["seeds"]) == 2
    assert valid_mean == pytest.approx(summary["aggregate"]["valid_mean"])
    assert len(calls) == 1  # W&B switched off after the first failure
    warnings = [r for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
