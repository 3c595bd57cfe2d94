"""Bad input, corrupt data, kills and resumes, non-finite losses, atomic files."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from ogb.graphproppred import Evaluator
from torch_geometric.loader import DataLoader

from gmoe_bench.config import CONFIG_DIR, ModelConfig, MoEConfig
from gmoe_bench.data.from_smiles import write_ogb_folder
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine import loop
from gmoe_bench.engine import run as run_module
from gmoe_bench.engine.checkpoint import SeedCheckpoint
from gmoe_bench.engine.loop import evaluate, train_epoch
from gmoe_bench.errors import DataError, TrainingError, UserError
from gmoe_bench.model import build_model
from gmoe_bench.records import write_json_atomic
from gmoe_bench.reports.table import collect
from gmoe_bench.train import train
from tests.conftest import REPO, cli_args, cli_env, run_cli, write_small_dataset
from tests.test_data import dataset_cfg

KEYS = ("seed", "best_epoch", "valid", "test")


def figures(summary: dict) -> list:
    return [[s[k] for k in KEYS] + [[(e["train_loss"], e["valid"], e["test"]) for e in s["epochs"]]]
            for s in summary["seeds"]]


def test_unknown_key_names_the_valid_ones(tmp_path: Path) -> None:
    proc = run_cli("moe.topk=2", cwd=tmp_path, mirror=None, data_root=tmp_path / "data")
    assert proc.returncode == 2
    assert "Unknown config key 'moe.topk'. Did you mean 'moe.top_k'?" in proc.stderr
    assert "Valid keys are:" in proc.stderr and "Traceback" not in proc.stderr


def test_raw_file_with_wrong_columns(small_mirror: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mirror"
    shutil.copytree(small_mirror, broken)
    edge_feat = broken / "ogbg_molbbbp" / "raw" / "edge-feat.csv.gz"
    with gzip.open(edge_feat, "wt") as f:
        f.write("0,1\n1,0\n")
    with pytest.raises(DataError, match=r"edge-feat\.csv\.gz has 2 columns where ogbg-molbbbp needs 3"):
        load_dataset(dataset_cfg(tmp_path / "root", broken))


def test_split_with_one_class_only(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    write_small_dataset(mirror / "ogbg_molbbbp")
    labels = mirror / "ogbg_molbbbp" / "raw" / "graph-label.csv.gz"
    with gzip.open(labels, "rt") as f:
        values = np.array([float(line) for line in f])
    values[np.arange(len(values)) % 5 == 1] = 1.0  # every test graph positive
    with gzip.open(labels, "wt") as f:
        f.write("\n".join(f"{v:g}" for v in values) + "\n")
    with pytest.raises(DataError, match="test split of ogbg-molbbbp has labels of one class"):
        load_dataset(dataset_cfg(tmp_path / "root", mirror))


def test_single_atom_graphs_are_scored_and_one_graph_batches_skipped(small_mirror: Path,
                                                                   tmp_path: Path) -> None:
    data = load_dataset(dataset_cfg(tmp_path, small_mirror))
    single = [i for i in range(len(data.graphs)) if data.graphs[i].num_nodes == 1]
    assert single  # methane
    graphs = data.graphs[torch.tensor([*single, 0, 1, 2])]
    model = build_model(ModelConfig("gin", 2, 16, 0.5, False, "mean"),
                        MoEConfig(4, 2, 2, 1.0, True, "sum", "sparse", True, "top_k"), 1)
    seen = []

    class CountingEvaluator(Evaluator):
        def eval(self, input_dict):
            seen.append(len(input_dict["y_pred"]))
            return {"rocauc": 0.5}

    evaluate([model], DataLoader(graphs, batch_size=1), CountingEvaluator("ogbg-molbbbp"),
             torch.device("cpu"), progress=False)
    assert seen == [len(graphs)]  # every graph scored, one-atom batches included
    optimizer = torch.optim.Adam(model.parameters())
    (stats,) = train_epoch([model], [DataLoader(graphs, batch_size=1)], [optimizer],
                           torch.device("cpu"), "binary classification", 0.0, progress=False,
                           streams=None)
    assert stats.skipped_batches == len(graphs) and stats.graphs == 0  # one graph per batch
    # as OGB: a last training batch of one graph is skipped (BatchNorm over graphs, e.g. the
    # virtual node's, cannot normalise one value), the others train
    virtual = build_model(ModelConfig("gcn", 2, 16, 0.5, True, "mean"),
                         MoEConfig(0, 0, 1, 0.0, True, "sum", "sparse", True, "top_k"), 1)
    (stats,) = train_epoch([virtual], [DataLoader(graphs, batch_size=len(graphs) - 1)],
                           [torch.optim.Adam(virtual.parameters())], torch.device("cpu"),
                           "binary classification", 0.0, progress=False, streams=None)
    assert stats.skipped_batches == 1 and stats.graphs == len(graphs) - 1


def test_summary_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"ok": 2, "broken": object()})  # fails half-way through
    assert json.loads(path.read_text()) == {"ok": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_unreadable_checkpoint_starts_the_seed_over(tmp_path: Path) -> None:
    checkpoint = SeedCheckpoint(tmp_path, seed=0)
    weights = {"w": torch.ones(2)}
    checkpoint.save({"model": weights, "optimizer": {}, "rng": {}, "records": [],
                     "wall_seconds": 0.0})
    assert torch.equal(checkpoint.load(weights)["model"]["w"], torch.ones(2))
    checkpoint.state_path.write_bytes(b"truncated")
    assert checkpoint.load(weights) is None
    assert [p.read_bytes() for p in tmp_path.glob("seed_0.pt.unusable-*")] == [b"truncated"]


def test_a_checkpoint_without_its_best_weights_starts_the_seed_over(tmp_path: Path) -> None:
    checkpoint = SeedCheckpoint(tmp_path, seed=0)
    weights = {"w": torch.ones(2)}
    state = {"model": weights, "optimizer": {}, "rng": {}, "records": [{"epoch": 1}],
             "wall_seconds": 0.0}
    checkpoint.save(state)
    checkpoint.save_best_model(weights)
    assert checkpoint.load(weights) is not None
    checkpoint.best_model_path.write_bytes(b"x")  # the seed's best epoch would be lost
    assert checkpoint.load(weights) is None
    assert [p.read_bytes() for p in tmp_path.glob("seed_0.best.pt.unusable-*")] == [b"x"]
    assert len(list(tmp_path.glob("seed_0.pt.unusable-*"))) == 1
    checkpoint.save(state)  # and a missing one
    assert checkpoint.load(weights) is None
    assert len(list(tmp_path.glob("seed_0.pt.unusable-*"))) == 2


@pytest.mark.parametrize("edit", [
    lambda r: r.update(test=0.5),  # not its best epoch's figure
    lambda r: r.update(test=float("nan")),
    lambda r: r.update(valid="0.9"),
    lambda r: r.update(epochs=[]),
    lambda r: r.update(best_epoch=99),
    lambda r: r.update(seed=True),
])
def test_a_tampered_seed_result_is_set_aside(tmp_path: Path, edit) -> None:
    epochs = [{"epoch": i, "valid": v, "test": t, "routing": []}
              for i, (v, t) in enumerate([(0.7, 0.6), (0.8, 0.65)], 1)]
    record = {"seed": 0, "best_epoch": 2, "valid": 0.8, "test": 0.65, "epochs": epochs}
    checkpoint = SeedCheckpoint(tmp_path, seed=0)
    checkpoint.result_path.write_text(json.dumps(record))
    assert checkpoint.finished_result() == record
    edit(record)
    checkpoint.result_path.write_text(json.dumps(record))
    assert checkpoint.finished_result() is None
    assert len(list(tmp_path.glob("seed_0.json.unusable-*"))) == 1


def compose_cfg(tmp_path: Path, mirror: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[
            f"dataset.mirror={mirror}", f"dataset.root={tmp_path / 'data'}",
            f"trainer.checkpoint_dir={tmp_path / 'ckpt'}", "trainer.progress=false",
            "logger=none", *overrides])


def test_non_finite_loss_fails_that_seed_only(small_mirror: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = loop.task_loss

    def exploding_for_seed_1(logits, y, task_type):
        loss = real_loss(logits, y, task_type)
        return loss * float("nan") if torch.initial_seed() == 1 else loss

    monkeypatch.setattr(loop, "task_loss", exploding_for_seed_1)
    cfg = compose_cfg(tmp_path, small_mirror, "seeds=[0,1,2]", "trainer.epochs=2")
    with pytest.raises(TrainingError, match=r"seed\(s\) 1 failed"):
        train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["seed"] for s in summary["seeds"]] == [0, 2]
    assert summary["failed_seeds"][0]["seed"] == 1
    assert "the training loss became nan" in summary["failed_seeds"][0]["error"]
    assert not summary["complete"] and summary["aggregate"]["num_seeds"] == 2


def test_an_epoch_without_a_training_step_is_an_error(tmp_path: Path) -> None:
    """A training split of one graph gives only skipped batches: an error, not an untrained model
    reported as trained."""
    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCl", "C1CC1"]
    split = {"train": np.array([0]), "valid": np.array([1, 2]), "test": np.array([3, 4, 5])}
    write_ogb_folder(tmp_path / "mirror" / "ogbg_molbbbp", smiles,
                     np.array([[1.0], [0.0], [1.0], [0.0], [1.0], [0.0]]), split)
    cfg = compose_cfg(tmp_path, tmp_path / "mirror", "seeds=[0]", "trainer.epochs=2")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="No training step in epoch 1: every batch of "
                                        "ogbg-molbbbp's training split held a single graph"):
        train(cfg, tmp_path / "run")


def test_a_reused_output_folder_keeps_the_earlier_runs_summary(small_mirror: Path,
                                                                tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    train(compose_cfg(tmp_path, small_mirror, "seeds=[0,1]", "trainer.epochs=1"), tmp_path / "run")
    first = (tmp_path / "run" / "summary.json").read_text()
    # a re-run of the same seeds, or of more seeds, extends it in place
    train(compose_cfg(tmp_path, small_mirror, "seeds=[0,1,2]", "trainer.epochs=1"), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["summary.json"]
    # other seeds, then another model, in the same folder: each earlier summary is kept aside
    train(compose_cfg(tmp_path, small_mirror, "seeds=[3]", "trainer.epochs=1"), tmp_path / "run")
    train(compose_cfg(tmp_path, small_mirror, "seeds=[3]", "trainer.epochs=1", "model=gin"),
          tmp_path / "run")
    # other seeds of the same configuration where gmoe-report merges them; another run's
    # results (the GCN seed 3 under the GIN run) under a name no report reads
    (merged,) = (tmp_path / "run").glob("earlier.replaced-*/summary.json")
    (other,) = (tmp_path / "run").glob("summary.json.replaced-*")
    assert [s["seed"] for s in json.loads(merged.read_text())["seeds"]] == [0, 1, 2]
    assert [s["seed"] for s in json.loads(other.read_text())["seeds"]] == [3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == "gin"
    assert json.loads(first)["seeds"][0] == json.loads(merged.read_text())["seeds"][0]
    rows = {r.config["model"]["backbone"]: sorted(s["seed"] for s in r.seeds)
            for r in collect([tmp_path / "run"])}
    assert rows == {"gcn": [0, 1, 2], "gin": [3]}


def test_finished_seeds_are_skipped_on_rerun(small_mirror: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, small_mirror, "seeds=[0,1]", "trainer.epochs=2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(cfg, tmp_path / "a")
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    # a finished seed keeps its record and best weights; its resumable state is removed
    assert sorted(p.name for p in (tmp_path / "ckpt").rglob("seed_*")) == [
        "seed_0.best.pt", "seed_0.json", "seed_1.best.pt", "seed_1.json"]
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("seed_*")}
    train(cfg, tmp_path / "b")
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert figures(again) == figures(first)
    # skipped, not retrained (on a CPU a retrain gives the same figures): the files are untouched
    # and each seed's wall time is the first run's
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("seed_*")} == written
    assert [s["wall_seconds"] for s in again["seeds"]] == [s["wall_seconds"] for s in first["seeds"]]


def test_resume_false_keeps_the_earlier_result_aside(small_mirror: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh start renames a finished seed's record and best weights instead of overwriting
    them, so an interrupted fresh start never leaves the old record beside new weights."""
    cfg = compose_cfg(tmp_path, small_mirror, "seeds=[0]", "trainer.epochs=2")
    (tmp_path / "a").mkdir()
    train(cfg, tmp_path / "a")
    (folder,) = {p.parent for p in (tmp_path / "ckpt").rglob("seed_0.json")}
    before = {name: (folder / name).read_bytes() for name in ("seed_0.json", "seed_0.best.pt")}

    calls = []

    def interrupted_in_epoch_2(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(run_module, "train_epoch", interrupted_in_epoch_2)
    fresh = compose_cfg(tmp_path, small_mirror, "seeds=[0]", "trainer.epochs=2",
                        "trainer.resume=false")
    (tmp_path / "b").mkdir()
    with pytest.raises(KeyboardInterrupt):
        train(fresh, tmp_path / "b")
    assert not (folder / "seed_0.json").exists()  # a resumed run trains seed 0 again
    for name, content in before.items():
        (aside,) = folder.glob(f"{name}.replaced-*")
        assert aside.read_bytes() == content


# A GMoE run with node dropping, long enough (12 epochs per seed) to be killed in the middle of seed 1.
RESUMABLE = ("logger=none", "seeds=[0,1]", "trainer.epochs=12", "moe.num_experts=4", "moe.num_hop2=2",
             "moe.top_k=2", "moe.loss_weight=1", "dataset.drop_node_p=0.1", "model.hidden_dim=64")


def test_kill_and_resume_reaches_the_uninterrupted_result(small_mirror: Path,
                                                          tmp_path: Path) -> None:
    def run(workdir: str):  # in this process: only the killed run needs a process of its own
        (tmp_path / workdir).mkdir(exist_ok=True)
        return run_cli(*RESUMABLE, f"trainer.checkpoint_dir={tmp_path / workdir / 'ckpt'}",
                       cwd=tmp_path / workdir, mirror=small_mirror, data_root=tmp_path / "data")

    reference = run("reference")
    assert reference.returncode == 0, reference.stderr
    expected = json.loads((tmp_path / "reference" / "run" / "summary.json").read_text())

    ckpt = tmp_path / "killed" / "ckpt"
    (tmp_path / "killed").mkdir()
    victim = subprocess.Popen(
        [sys.executable, "-m", "gmoe_bench.train", *cli_args(RESUMABLE, tmp_path / "killed"),
         f"trainer.checkpoint_dir={ckpt}"], cwd=tmp_path / "killed",
        env={**cli_env(small_mirror, tmp_path / "data"), "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill in the middle of seed 1, after some of its epochs
        states = list(ckpt.rglob("seed_1.pt"))
        if states and torch.load(states[0])["records"].__len__() >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list(ckpt.rglob("seed_0.json")) and list(ckpt.rglob("seed_1.pt"))
    assert not list(ckpt.rglob("seed_1.json"))

    rerun = run("killed")  # the same command again
    assert rerun.returncode == 0, rerun.stderr
    log = (tmp_path / "killed" / "run" / "train.log").read_text()
    assert "seed 0: already finished" in log and "seed 1: resumed after epoch" in log
    resumed = json.loads((tmp_path / "killed" / "run" / "summary.json").read_text())
    assert figures(resumed) == figures(expected)
