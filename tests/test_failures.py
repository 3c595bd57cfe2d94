"""Hostile inputs and environments (issue 18): nothing is lost, nothing is silently wrong, nothing
hangs, and every failure is one sentence naming the path it concerns."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from gmoe_bench import entry, output_dirs
from gmoe_bench import train as train_module
from gmoe_bench.analysis.routing import main as routing_main
from gmoe_bench.config import (
    CONFIG_DIR,
    EXECUTION_KEYS,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    WandbConfig,
    execution_override_keys,
    validate,
)
from gmoe_bench.data import ogb
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine.checkpoint import rng_state
from gmoe_bench.engine.run import build_optimizer
from gmoe_bench.errors import ConfigError, DataError, TrainingError
from gmoe_bench.model import build_model
from gmoe_bench.reports.cli import main as report_main
from gmoe_bench.reports.cli import select_main
from gmoe_bench.reports.table import collect
from gmoe_bench.tracking.wandb_logger import WandbLogger
from gmoe_bench.train import SweepJobError, default_threads, train
from gmoe_bench.train import main as train_main
from tests.conftest import REPO, small_molecules
from tests.test_data import dataset_cfg

N = len(small_molecules())


@pytest.fixture
def local_copy(small_mirror: Path, tmp_path: Path) -> Path:
    """A root holding its own copy of the small dataset (no mirror), plus a file of the user's."""
    folder = tmp_path / "root" / "ogbg_molbbbp"
    shutil.copytree(small_mirror / "ogbg_molbbbp", folder)
    (folder / "my_notes.txt").write_text("mine")
    return folder


def edit_rows(path: Path, edit) -> None:
    with gzip.open(path, "rt") as f:
        rows = f.read().splitlines()
    edit(rows)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")


def test_corrupt_raw_file_deletes_nothing(local_copy: Path) -> None:
    raw = local_copy / "raw" / "node-feat.csv.gz"
    data = bytearray(raw.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC
    raw.write_bytes(bytes(data))
    files = sorted(local_copy.rglob("*"))
    with pytest.raises(DataError, match=r"node-feat\.csv\.gz cannot be read .*corrupt"):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert sorted(local_copy.rglob("*")) == files  # the user's folder is as it was


def test_a_corrupt_mirror_file_is_named_and_leaves_no_copy(local_copy: Path,
                                                             tmp_path: Path) -> None:
    """The copy is checked before it takes the dataset's name: a bad mirror file is named as the
    mirror's, and the next run (the mirror repaired) copies afresh instead of reusing a bad copy."""
    mirror = local_copy.parent
    raw = local_copy / "raw" / "node-feat.csv.gz"
    good = raw.read_bytes()
    raw.write_bytes(good[: len(good) // 2])  # truncated
    root = tmp_path / "fresh_root"
    with pytest.raises(DataError, match=rf"^The data mirror's ogbg_molbbbp is unusable, so it was "
                                        rf"not copied: {re.escape(str(raw))} cannot be read"):
        load_dataset(dataset_cfg(root, mirror))
    assert not any(p.name.startswith("ogbg_molbbbp") for p in root.iterdir())
    raw.write_bytes(good)
    assert len(load_dataset(dataset_cfg(root, mirror)).graphs) == N


def test_a_read_only_mirror_gives_a_copy_its_owner_can_process_and_remove(
        local_copy: Path, tmp_path: Path) -> None:
    folders = [local_copy, *(p for p in local_copy.rglob("*") if p.is_dir())]
    for path in [*local_copy.rglob("*"), *folders]:
        path.chmod(path.stat().st_mode & ~0o222)  # read-only, as a shared mirror is
    try:
        data = load_dataset(dataset_cfg(tmp_path / "fresh_root", local_copy.parent))
    finally:
        for path in folders:
            path.chmod(path.stat().st_mode | 0o200)
    copy = data.folder
    assert all(p.stat().st_mode & 0o200 for p in [copy, *copy.rglob("*")])
    assert (copy / "processed").is_dir()


def test_incomplete_folder_that_is_the_mirror_is_left_alone(local_copy: Path) -> None:
    (local_copy / "split" / "scaffold" / "test.csv.gz").unlink()
    files = sorted(local_copy.rglob("*"))
    with pytest.raises(DataError, match=r"lacks split/scaffold/test\.csv\.gz"):
        load_dataset(dataset_cfg(local_copy.parent, local_copy.parent))  # root == mirror
    assert sorted(local_copy.rglob("*")) == files


def test_incomplete_folder_is_moved_aside_not_deleted(local_copy: Path, small_mirror: Path) -> None:
    (local_copy / "RELEASE_v1.txt").unlink()
    data = load_dataset(dataset_cfg(local_copy.parent, small_mirror))
    assert len(data.graphs) == N
    (aside,) = local_copy.parent.glob("ogbg_molbbbp.incomplete-*")
    assert (aside / "my_notes.txt").read_text() == "mine"


def test_incomplete_folder_stays_when_the_mirror_cannot_replace_it(local_copy: Path,
                                                                    tmp_path: Path) -> None:
    (local_copy / "RELEASE_v1.txt").unlink()
    files = sorted(local_copy.rglob("*"))
    empty_mirror = tmp_path / "empty_mirror"
    empty_mirror.mkdir()
    with pytest.raises(DataError, match=r"lacks RELEASE_v1\.txt\), and the data mirror has no "
                                        r"complete 'ogbg_molbbbp' to copy instead"):
        load_dataset(dataset_cfg(local_copy.parent, empty_mirror))
    assert sorted(local_copy.rglob("*")) == files  # not moved aside for nothing
    assert not list(local_copy.parent.glob("ogbg_molbbbp.incomplete-*"))


def test_a_mirror_without_the_dataset_names_the_download(tmp_path: Path) -> None:
    (tmp_path / "empty_mirror").mkdir()
    with pytest.raises(DataError, match=r"has no folder 'ogbg_molbbbp' .* or set "
                                        r"dataset\.mirror=null to let ogb download it"):
        load_dataset(dataset_cfg(tmp_path / "root", tmp_path / "empty_mirror"))


def flip_labels(folder: Path) -> None:
    edit_rows(folder / "raw" / "graph-label.csv.gz",
              lambda rows: rows.__setitem__(slice(None), [str(1 - int(r)) for r in rows]))


def test_processed_cache_follows_its_raw_files(local_copy: Path) -> None:
    first = load_dataset(dataset_cfg(local_copy.parent, None))
    flip_labels(local_copy)
    second = load_dataset(dataset_cfg(local_copy.parent, None))
    assert torch.equal(second.graphs.y, 1 - first.graphs.y)
    assert second.fingerprint != first.fingerprint


def test_legacy_cache_older_than_raw_files_is_rebuilt(local_copy: Path) -> None:
    first = load_dataset(dataset_cfg(local_copy.parent, None))
    (local_copy / "processed" / ogb.FINGERPRINT_FILE).unlink()  # as written before fingerprints
    flip_labels(local_copy)
    cache = local_copy / "processed" / ogb.PROCESSED_FILE
    old = time.time() - 60
    os.utime(cache, (old, old))
    second = load_dataset(dataset_cfg(local_copy.parent, None))
    assert torch.equal(second.graphs.y, 1 - first.graphs.y)


def set_row(path_in_raw: str, row: int, value: str):
    def apply(folder: Path) -> None:
        edit_rows(folder / "raw" / path_in_raw, lambda rows: rows.__setitem__(row, value))
    return apply


def edit_split(part: str, edit):
    def apply(folder: Path) -> None:
        edit_rows(folder / "split" / "scaffold" / f"{part}.csv.gz", edit)
    return apply


def first_train_index(folder: Path) -> str:
    with gzip.open(folder / "split" / "scaffold" / "train.csv.gz", "rt") as f:
        return f.readline().strip()


def leak_into_test(folder: Path) -> None:
    edit_split("test", lambda rows: rows.append(first_train_index(folder)))(folder)


def empty_valid(folder: Path) -> None:
    with gzip.open(folder / "split" / "scaffold" / "valid.csv.gz", "wt"):
        pass


@pytest.mark.parametrize(("edit", "message"), [
    (set_row("graph-label.csv.gz", 5, "abc"), r"graph-label\.csv\.gz line 6 holds 'abc'"),
    (set_row("graph-label.csv.gz", 5, "inf"), r"graph-label\.csv\.gz line 6: an infinite label"),
    (edit_split("train", lambda rows: rows.insert(3, rows[0])),
     r"train\.csv\.gz line 4: a graph index listed twice in this split"),
    (leak_into_test, r"test\.csv\.gz line \d+: a graph index that is also in the train split"),
    (empty_valid, r"valid\.csv\.gz lists no graph; every split needs at least one"),
    (set_row("edge.csv.gz", 3, "0,1,2"), r"edge\.csv\.gz is not a well-formed CSV file"),
    (set_row("node-feat.csv.gz", 4, "999,0,0,0,0,0,0,0,0"),
     r"node-feat\.csv\.gz line 5: a feature outside OGB's vocabulary"),
    (set_row("num-node-list.csv.gz", 2, "50"), r"node-feat\.csv\.gz has \d+ rows where"),
    (set_row("edge.csv.gz", 1, "0,40"), r"edge\.csv\.gz line 2: a node index outside its molecule"),
    (set_row("graph-label.csv.gz", 7, "2"),
     r"graph-label\.csv\.gz line 8: a label other than 0, 1 or empty"),
])
def test_bad_raw_rows_are_one_error_before_processing(local_copy: Path, edit, message: str) -> None:
    edit(local_copy)
    with pytest.raises(DataError, match=message):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert not (local_copy / "processed").exists()  # found before ogb processed anything


def test_read_only_root_with_a_processed_dataset(local_copy: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(dataset_cfg(local_copy.parent, None))

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(FileLock, "acquire", read_only)
    assert len(load_dataset(dataset_cfg(local_copy.parent, None)).graphs) == N
    shutil.rmtree(local_copy / "processed")
    with pytest.raises(DataError, match=r"not processed .* dataset.root is read-only"):
        load_dataset(dataset_cfg(local_copy.parent, None))


def test_full_disk_while_processing_blames_the_disk(local_copy: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DataError, match=r"No space left on the device .*\(the raw files are fine\)"):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert (local_copy / "raw" / "node-feat.csv.gz").is_file()


def test_waiting_for_the_dataset_lock_is_announced(local_copy: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    lock = FileLock(str(local_copy.parent / ".ogbg_molbbbp.lock"))
    lock.acquire()
    result = []
    waiter = threading.Thread(target=lambda: result.append(
        load_dataset(dataset_cfg(local_copy.parent, None))))
    with caplog.at_level(logging.INFO, logger="gmoe_bench.data.ogb"):
        waiter.start()
        deadline = time.time() + 10
        while "another run is preparing" not in caplog.text and time.time() < deadline:
            time.sleep(0.01)
        assert not result  # still waiting
        lock.release()
        waiter.join(timeout=30)
    assert "Waiting for" in caplog.text and str(local_copy.parent) in caplog.text
    assert len(result[0].graphs) == N


# --- runs: identity, output folders, threads, seeds that fail --------------------------------------

def compose_run(tmp_path: Path, root: Path, *overrides: str, mirror: Path | None = None):
    """The composed config of a one-epoch run on the small dataset in ``root``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[
            f"dataset.mirror={mirror}" if mirror else "dataset.mirror=null",
            f"dataset.root={root}", f"trainer.checkpoint_dir={tmp_path / 'ckpt'}",
            "trainer.progress=false", "trainer.cpu_threads=1", "trainer.epochs=1", "seeds=[0]",
            "logger=none", *overrides])


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_another_copy_of_the_data_is_another_run(local_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "ogbg_molbbbp"
    shutil.copytree(local_copy, other)
    flip_labels(other)
    for name, root in (("a", local_copy.parent), ("b", other.parent)):
        (tmp_path / name).mkdir()
        train(compose_run(tmp_path, root), tmp_path / name)
    a, b = summary_of(tmp_path / "a"), summary_of(tmp_path / "b")
    assert a["data"]["fingerprint"] != b["data"]["fingerprint"]
    assert a["seeds"][0]["test"] != b["seeds"][0]["test"]  # b trained, not "already finished"
    results = collect([tmp_path / "a", tmp_path / "b"])
    assert len(results) == 2 and len({r.label for r in results}) == 2  # two rows, not one merged


def test_seeds_from_before_data_fingerprints_are_not_reused_but_named(
        local_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train(compose_run(tmp_path, local_copy.parent), tmp_path)
    (result,) = (tmp_path / "ckpt").rglob("seed_0.json")
    legacy = result.parent.parent  # <dataset>/<config id>/, the folder of older versions
    for path in result.parent.iterdir():
        path.rename(legacy / path.name)
    result.parent.rmdir()
    with caplog.at_level(logging.WARNING):
        train(compose_run(tmp_path, local_copy.parent), tmp_path)
    assert f"{legacy} holds seeds of this config from before" in caplog.text
    assert result.is_file() and (legacy / "seed_0.json").is_file()  # retrained; the old one kept


def test_runs_started_in_the_same_second_get_their_own_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dirs = []
    for _ in range(2):  # as two gmoe-train processes compose the same hydra.run.dir
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True)
        dirs.append(OmegaConf.select(cfg, "hydra.run.dir"))
        assert OmegaConf.select(cfg, "hydra.run.dir") == dirs[-1]  # resolved once, then cached
    assert dirs[0] != dirs[1] and all(Path(d).is_dir() for d in dirs)


SIXTEEN = ["moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2", "moe.loss_weight=0.123456789",
           "moe.noisy_gating=false", "moe.combine=mean", "moe.dispatch=dense", "moe.scale_hidden=false",
           "model=gin", "model.num_layers=3", "model.hidden_dim=64", "model.dropout=0.25",
           "model.pooling=sum", "dataset.drop_node_p=0.1", "trainer.lr=0.000123456789",
           "dataset.name=../../shared/datasets/molecules/ogbg-molbbbp"]


def sweep_subdir(*overrides: str) -> tuple[str, str]:
    """The folder name Hydra gives job 7 of a sweep, and the override string it came from."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=[*overrides, "hydra.job.num=7"])
    return OmegaConf.select(cfg, "hydra.sweep.subdir"), cfg.hydra.job.override_dirname


@pytest.mark.parametrize("overrides", [SIXTEEN[-1:], SIXTEEN])
def test_sweep_folder_names_are_one_valid_component(overrides: list[str]) -> None:
    subdir, override_dirname = sweep_subdir(*overrides)
    assert "/" not in subdir and len(subdir.encode()) <= 255  # '..' cannot move it, nor length
    assert subdir.startswith("7_") and "dataset.name=.._.._shared" in subdir
    if len(overrides) > 1:
        assert len(override_dirname) > 255  # the name Hydra would have used
        other = output_dirs.dir_name(override_dirname.replace("0.25", "0.3"))
        assert subdir != f"7_{other}"  # shortened names still tell configurations apart


def test_execution_keys_stay_out_of_sweep_folder_names() -> None:
    subdir, _ = sweep_subdir("model=gin", "trainer.checkpoint_dir=/tmp/x", "dataset.root=../data",
                             "dataset.mirror=/m", "trainer.cpu_threads=1", "logger=none",
                             "logger.wandb.timeout=3", "trainer.eval_batch_size=64", "seeds=[1]")
    assert subdir == "7_model=gin"
    assert set(EXECUTION_KEYS) <= set(execution_override_keys())


def test_parallel_jobs_split_the_cores() -> None:
    assert default_threads(None, 16) is None  # one job at a time: torch's default
    assert default_threads({"n_jobs": 2}, 2) == 1
    assert default_threads({"n_jobs": 4}, 16) == 4
    assert default_threads({"n_jobs": -1}, 16) == 1
    assert default_threads({"cpus_per_task": 1, "gpus_per_node": 0}, 16) == 1
    assert default_threads({"cpus_per_task": 8}, 4) == 4
    for launcher, threads in (("basic", None), ("parallel", 8), ("slurm_local", 1)):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[f"hydra/launcher={launcher}"])
        assert default_threads(OmegaConf.to_container(cfg.hydra.launcher), 16) == threads


def test_one_graph_last_batch_with_virtual_node_trains(local_copy: Path, tmp_path: Path) -> None:
    train_size = len(load_dataset(dataset_cfg(local_copy.parent, None)).split["train"])
    train(compose_run(tmp_path, local_copy.parent, "model.virtual_node=true",
                      f"trainer.batch_size={train_size - 1}"), tmp_path)
    (epoch,) = summary_of(tmp_path)["seeds"][0]["epochs"]
    assert epoch["skipped_batches"] == 1


@pytest.mark.parametrize("overrides", [
    ["moe.num_experts=4", "moe.num_hop2=2", "moe.top_k=2", "trainer.lr=1e38"],  # NaN in the gate
    ["trainer.lr=1e30", "trainer.batch_size=5000"],  # NaN predictions in evaluation
])
def test_divergence_fails_each_seed_with_a_summary(local_copy: Path, tmp_path: Path,
                                                   overrides: list[str]) -> None:
    with pytest.raises(TrainingError, match=r"seed\(s\) 0, 1 failed"):
        train(compose_run(tmp_path, local_copy.parent, "seeds=[0,1]", *overrides), tmp_path)
    summary = summary_of(tmp_path)
    assert [f["seed"] for f in summary["failed_seeds"]] == [0, 1] and not summary["complete"]
    assert all("diverged in epoch 1" in f["error"] for f in summary["failed_seeds"])


@pytest.mark.parametrize(("override", "message"), [
    ("moe.loss_weight=inf", r"moe.loss_weight=inf must be a finite number \(λ"),
    ("seeds=[-1]", "every seed must be between 0 and 2\\*\\*32 - 1"),
    ("seeds=[4294967296]", "every seed must be between 0 and 2\\*\\*32 - 1"),
    ("trainer.device=cuda:x", "trainer.device='cuda:x' must be auto, cpu, cuda or cuda:N"),
    ("logger.wandb.timeout=0", "logger.wandb.timeout=0.0 must be a positive number"),
])
def test_out_of_range_values_are_config_errors(tmp_path: Path, override: str, message: str) -> None:
    cfg = compose_run(tmp_path, tmp_path / "data", "moe.num_experts=2", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_unwritable_checkpoint_dir_is_refused_before_training(local_copy: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match=r"Cannot write checkpoints to .*ckpt.*trainer\.checkpoint_dir"):
        train(compose_run(tmp_path, local_copy.parent), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert not (local_copy / "processed").exists()  # refused before the data was processed
    train(compose_run(tmp_path, local_copy.parent, f"trainer.checkpoint_dir={tmp_path / 'ok'}"),
          tmp_path)
    assert (local_copy / "processed").is_dir()  # where processing writes, so the check can fail


def test_full_checkpoint_disk_fails_the_seeds_not_the_summary(local_copy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(dataset_cfg(local_copy.parent, None))  # processed before the disk "fills up"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match=r"seed\(s\) 0, 1 failed"):
        train(compose_run(tmp_path, local_copy.parent, "seeds=[0,1]"), tmp_path)
    failed = summary_of(tmp_path)["failed_seeds"]
    assert [f["seed"] for f in failed] == [0, 1]
    assert all(re.search(r"Could not write .*seed_\d\.best\.pt \(No space left on device\)", f["error"])
               for f in failed)


def test_unusable_seed_files_are_set_aside_and_the_seed_reruns(local_copy: Path,
                                                               tmp_path: Path) -> None:
    train(compose_run(tmp_path, local_copy.parent), tmp_path)
    (result,) = (tmp_path / "ckpt").rglob("seed_0.json")
    reference = summary_of(tmp_path)["seeds"][0]["test"]
    for content in ('{"seed": 0, "valid": 0.9', "{}"):  # truncated, foreign
        result.write_text(content)
        train(compose_run(tmp_path, local_copy.parent), tmp_path)
        assert summary_of(tmp_path)["seeds"][0]["test"] == reference  # trained again
    assert sorted(p.read_text() for p in result.parent.glob("seed_0.json.unusable-*")) == [
        '{"seed": 0, "valid": 0.9', "{}"]  # kept, not deleted
    # a checkpoint of another architecture in the folder: set aside, the seed starts over
    result.unlink()
    other = build_model(ModelConfig("gin", 2, 8, 0.5, False, "mean"),
                        MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", True, "top_k"), 1)
    torch.save({"model": other.state_dict(), "optimizer": {}, "rng": {}, "records": [],
                "wall_seconds": 0.0}, result.with_name("seed_0.pt"))
    train(compose_run(tmp_path, local_copy.parent), tmp_path)
    assert summary_of(tmp_path)["seeds"][0]["test"] == reference
    assert list(result.parent.glob("seed_0.pt.unusable-*"))
    # this model's checkpoint whose epochs cannot be restored (another version's records): the
    # same, not a seed failed on every rerun
    result.unlink()
    cfg = validate(compose_run(tmp_path, local_copy.parent))
    model = build_model(cfg.model, cfg.moe, 1)
    shuffle = torch.Generator().manual_seed(0)
    torch.save({"model": model.state_dict(),
                "optimizer": build_optimizer(model, cfg.trainer.lr, False).state_dict(),
                "rng": rng_state(shuffle, None), "records": [{"epoch": 1, "lr": 0.001}],
                "wall_seconds": 0.0}, result.with_name("seed_0.pt"))
    torch.save(model.state_dict(), result.with_name("seed_0.best.pt"))
    train(compose_run(tmp_path, local_copy.parent), tmp_path)
    assert summary_of(tmp_path)["seeds"][0]["test"] == reference
    assert len(list(result.parent.glob("seed_0.pt.unusable-*"))) == 2


# --- W&B never blocks --------------------------------------------------------------------------

class FakeRun:
    def __init__(self) -> None:
        self.summary: dict = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


def online_logger(tmp_path: Path) -> WandbLogger:
    cfg = WandbConfig(mode="online", project="p", entity=None, tags=[], name=None, timeout=3)
    return WandbLogger(cfg, TrainConfig(), "ogbg-molbbbp", "gcn", "rocauc", 1, tmp_path)


def test_wandb_online_without_a_key_goes_offline_without_prompting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("W&B prompted for input"))
    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kw: modes.append(
        (kw["mode"], kw["settings"].init_timeout, kw["settings"].finish_timeout)) or FakeRun())
    logger = online_logger(tmp_path)
    with caplog.at_level(logging.WARNING):
        for seed in (0, 1):
            logger.start_seed(seed)
            logger.end_seed(None)
    assert modes == [("offline", 3, 3), ("offline", 3, 3)]
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "no API key" in warnings[0]


def test_wandb_server_that_does_not_answer_costs_one_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    modes = []

    def init(**kw):
        modes.append(kw["mode"])
        if kw["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 3.0 sec.")
        return FakeRun()

    monkeypatch.setattr(wandb, "login", lambda **kw: True)  # a key is set
    monkeypatch.setattr(wandb, "init", init)
    logger = online_logger(tmp_path)
    with caplog.at_level(logging.WARNING):
        for seed in (0, 1):
            logger.start_seed(seed)
            logger.end_seed(None)
    assert modes == ["online", "offline", "offline"]  # one wait, then offline for the job
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "logger.wandb.timeout=3" in warnings[0] and logger.enabled


# --- reports -----------------------------------------------------------------------------------

def test_reports_skip_unreadable_summaries_and_name_them(
        local_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "runs" / "good"
    run.mkdir(parents=True)
    train(compose_run(tmp_path, local_copy.parent), run)
    good = json.loads((run / "summary.json").read_text())

    def edited(edit) -> str:
        summary = json.loads(json.dumps(good))
        edit(summary, summary["seeds"][0])
        return json.dumps(summary)

    bad = {"truncated": '{"dataset": "ogbg-mol', "foreign": '{"loss": 1}',
           "nan_test": edited(lambda s, seed: seed.update(test=float("nan"))),
           "text_test": edited(lambda s, seed: seed.update(test="abc")),
           "no_epochs": edited(lambda s, seed: seed.update(epochs=[])),
           "best_outside": edited(lambda s, seed: seed.update(best_epoch=99)),
           "not_its_best": edited(lambda s, seed: seed.update(test=0.5)),
           "text_routing": edited(lambda s, seed: seed["epochs"][seed["best_epoch"] - 1].update(
               routing=[["a"]])),
           "unknown_metric": edited(lambda s, seed: s.update(metric="r2"))}
    for name, content in bad.items():
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / "summary.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    for name in bad:
        assert f"Skipping {tmp_path / 'runs' / name / 'summary.json'}" in caplog.text
    report = json.loads((tmp_path / "report" / "digest.json").read_text())
    assert [s["test"] for s in report[0]["seeds"]] == [s["test"] for s in good["seeds"]]
    capsys.readouterr()
    assert len(collect([tmp_path / "runs"])) == 1
    (tmp_path / "taken").write_text("x")
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "taken")]) == 2
    assert f"--out {tmp_path / 'taken'} is a file" in capsys.readouterr().err
    assert select_main([str(tmp_path / "runs"), "--backbone", "gcn"]) == 2  # one config: no choice
    assert "fewer than two GMoE configurations" in capsys.readouterr().err


def test_a_report_over_an_earlier_one_leaves_none_of_its_plots(local_copy: Path,
                                                                 tmp_path: Path) -> None:
    for name, overrides in (("plain", ()), ("gmoe", ("moe.num_experts=2", "moe.top_k=1"))):
        (tmp_path / "runs" / name).mkdir(parents=True)
        train(compose_run(tmp_path, local_copy.parent, "model.hidden_dim=16", *overrides),
              tmp_path / "runs" / name)
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "routing.png").is_file()
    assert report_main([str(tmp_path / "runs" / "plain"), "--out", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "routing.png").exists()
    assert not (tmp_path / "report" / "routing_entropy.png").exists()
    assert len(json.loads((tmp_path / "report" / "digest.json").read_text())) == 1


def test_routing_names_a_corrupt_weights_file(local_copy: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    train(compose_run(tmp_path, local_copy.parent, "moe.num_experts=2", "moe.top_k=1",
                      "model.hidden_dim=16"), tmp_path)
    (best,) = (tmp_path / "ckpt").rglob("seed_0.best.pt")
    best.write_bytes(best.read_bytes()[:200])
    assert routing_main([str(tmp_path), "--out", str(tmp_path / "routing")]) == 2
    err = capsys.readouterr().err
    assert f"{best} cannot be loaded as the weights of seed 0" in err and "Traceback" not in err


# --- the command line --------------------------------------------------------------------------

def run_main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["gmoe-train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    return exit_info.value.code


@pytest.mark.parametrize(("argv", "message"), [
    (["seeds=[0,1"], "Cannot parse the override 'seeds=[0,1': no viable alternative"),
    (["dataset=ogbg-molchembl"], "dataset=ogbg-molchembl is not one of the dataset configs "
     "(ogbg-molbace, ogbg-molbbbp, ogbg-molclintox, ogbg-molesol, ogbg-molfreesolv, ogbg-molhiv, "
     "ogbg-mollipo, ogbg-molmuv, ogbg-molpcba, ogbg-molsider, ogbg-moltox21, ogbg-moltoxcast). For "
     "any other OGB dataset, use dataset.name=ogbg-molchembl."),
    (["dataset=ogbg-molbbp"], "dataset=ogbg-molbbp is not one of the dataset configs (ogbg-molbace, "
     "ogbg-molbbbp, ogbg-molclintox, ogbg-molesol, ogbg-molfreesolv, ogbg-molhiv, ogbg-mollipo, "
     "ogbg-molmuv, ogbg-molpcba, ogbg-molsider, ogbg-moltox21, ogbg-moltoxcast). Did you mean "
     "dataset=ogbg-molbbbp?"),
    (["seeds=0"], "seeds=0 is not a list; give a list of integer seeds, e.g. 'seeds=[0,1,2]'"),
    (["seeds=[0,a]"], "seeds[1]='a' is not an integer; give a list of integer seeds"),
    (["-m", "model=gcn,gat"], "model=gat is not one of the model configs (gcn, gin)."),
    (["+experiment=paper_molbbb"], "experiment=paper_molbbb is not one of the experiment configs"),
])
def test_command_line_errors_are_one_sentence_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str],
        message: str) -> None:
    assert run_main(monkeypatch, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmoe-train: error: ") and message in err and err.count("\n") == 1


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_hydra_main", interrupted)
    assert run_main(monkeypatch, "seeds=[0]") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command" in err and "Traceback" not in err


def test_ctrl_c_without_resume_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    def interrupted(cfg, output_dir: Path) -> float:
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module, "train", interrupted)
    assert run_main(monkeypatch, "trainer.resume=false") == 130
    err = capsys.readouterr().err
    assert "re-run it with trainer.resume=true to resume" in err and err.count("\n") == 1


class _InterruptImport:
    """A meta-path finder that answers a Ctrl-C while ``name`` is being imported."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == self.name:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("command", "module", "prog"), [
    (entry.train, "gmoe_bench.train", "gmoe-train"),
    (entry.report, "gmoe_bench.reports.cli", "gmoe-report"),
    (entry.select, "gmoe_bench.reports.cli", "gmoe-select"),
    (entry.routing, "gmoe_bench.analysis.routing", "gmoe-routing"),
    (entry.heterogeneity, "gmoe_bench.analysis.heterogeneity", "gmoe-heterogeneity"),
    (entry.structure_gain, "gmoe_bench.analysis.structure_gain", "gmoe-structure-gain"),
])
def test_ctrl_c_while_a_command_imports_is_one_line_and_exit_130(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, command, module: str,
        prog: str) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)  # restored after the test
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport(module), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        command()
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: interrupted; ") and err.count("\n") == 1


def test_a_real_sigint_while_torch_imports_is_one_line(tmp_path: Path) -> None:
    """The console script's own path: SIGINT delivered to a fresh process inside ``import torch``."""
    child = """
import os, signal, sys
class SigintAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, SigintAtTorch())
sys.argv = ["gmoe-train", "--help"]
from gmoe_bench.entry import train
train()
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == ("gmoe-train: interrupted; it had not started, so nothing was "
                           "written.\n")


def test_a_failed_sweep_job_is_one_line_not_a_traceback(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra.mode=MULTIRUN", f"hydra.runtime.output_dir={tmp_path}", "moe.num_experts=4",
            "moe.top_k=8"])
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    with pytest.raises(SweepJobError, match=r"^gmoe-train: error: moe\.top_k=8 must be between"):
        train_module._hydra_main.__wrapped__(job)  # what Hydra calls for each job
    # Hydra prints a CompactHydraException as its message alone, runs the other jobs, exits 1
    assert issubclass(SweepJobError, CompactHydraException)
