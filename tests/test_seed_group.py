"""Seeds trained together (trainer.seeds_per_group): each seed of a group follows its solo run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from gmoe_bench.config import ModelConfig, MoEConfig, validate
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine import loop
from gmoe_bench.engine.checkpoint import SeedCheckpoint
from gmoe_bench.engine.loop import join, train_step
from gmoe_bench.engine.run import build_optimizer, start_seed
from gmoe_bench.errors import TrainingError
from gmoe_bench.model import MolGNN, build_model
from gmoe_bench.model.seed_group import group_forward
from gmoe_bench.train import train
from tests.conftest import small_molecules
from tests.test_hop2 import graph
from tests.test_robustness import compose_cfg


def labelled(smiles: str) -> Batch:
    g = graph(smiles)
    g.y = torch.tensor([[float("N" in smiles or "n" in smiles)]])
    return g


GRAPHS = [labelled(s) for s in small_molecules()]
TASK = "binary classification"

# backbone, experts n, hop-2 experts, k, dispatch, gate, virtual node, combine
SETTINGS = {
    "gcn": ("gcn", 0, 0, 1, "sparse", "top_k", False, "sum"),
    "gin-virtual": ("gin", 0, 0, 1, "sparse", "top_k", True, "sum"),
    "gmoe-gcn-hop2-virtual": ("gcn", 4, 2, 2, "sparse", "top_k", True, "sum"),
    "gmoe-gin-hop2-virtual": ("gin", 4, 2, 2, "sparse", "top_k", True, "mean"),
    "gmoe-gcn-all-sources": ("gcn", 4, 1, 3, "sparse", "top_k", False, "sum"),
    "gmoe-gcn-dense-dispatch": ("gcn", 4, 2, 2, "dense", "top_k", True, "mean"),
    "gmoe-gin-expert-choice": ("gin", 4, 2, 2, "sparse", "expert_choice", False, "sum"),
    "gmoe-gcn-dense-gate": ("gcn", 4, 2, 2, "sparse", "dense", False, "sum"),
    "gmoe-gcn-random-gate": ("gcn", 4, 2, 2, "sparse", "random", False, "sum"),
}


def build(setting: str, seed: int, dropout: float = 0.0, noisy: bool = False,
          loss_weight: float = 1.0) -> MolGNN:
    backbone, n, m, k, dispatch, gate, virtual, combine = SETTINGS[setting]
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(backbone=backbone, num_layers=3, hidden_dim=24, dropout=dropout,
                    virtual_node=virtual, pooling="mean"),
        MoEConfig(num_experts=n, num_hop2=m, top_k=k, loss_weight=loss_weight, noisy_gating=noisy,
                  combine=combine, dispatch=dispatch, scale_hidden=True, gate=gate), 1)
    for module in model.modules():  # gates start at zero: give them an opinion
        if hasattr(module, "w_gate"):
            nn.init.normal_(module.w_gate, std=0.5)
    return model


def batches(num_seeds: int, step: int = 0) -> list[Batch]:
    """A different batch for each seed (sizes differ too, so the padding is exercised)."""
    out = []
    for s in range(num_seeds):
        order = torch.randperm(len(GRAPHS), generator=torch.Generator().manual_seed(100 * step + s))
        out.append(Batch.from_data_list([GRAPHS[i] for i in order[: 6 + 2 * s]]))
    return out


def joined(parts: list[Batch]) -> loop.JoinedBatch:
    return join([(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs) for b in parts])


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_group_forward_equals_each_seed_alone(setting: str, training: bool) -> None:
    """Outputs, balance losses, expert counts and gradients of a group of 3 seeds equal each
    seed's own forward (dropout 0 and no gate noise: nothing random)."""
    models = [build(setting, seed).train(training) for seed in range(3)]
    parts = batches(3)
    solo = [m(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs) for m, b in
            zip(models, parts, strict=True)]
    sum(o.logits.square().sum() + o.aux_loss for o in solo).backward()
    solo_grads = [grads(m) for m in models]
    for m in models:
        m.zero_grad(set_to_none=True)

    out = group_forward(models, *joined(parts), None)
    torch.testing.assert_close(out.logits, torch.cat([o.logits for o in solo]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, torch.stack([o.aux_loss for o in solo]), rtol=1e-4,
                               atol=1e-6)
    if solo[0].expert_counts is not None:
        assert torch.equal(out.expert_counts, torch.stack([o.expert_counts for o in solo]))
    (out.logits.square().sum() + out.aux_loss.sum()).backward()
    for m, expected in zip(models, solo_grads, strict=True):
        for (name, p), g in zip(m.named_parameters(), expected, strict=True):
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, g, rtol=1e-3, atol=1e-4,
                                       msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("setting", ["gcn", "gin-virtual", "gmoe-gcn-hop2-virtual",
                                     "gmoe-gin-hop2-virtual"])
def test_each_seed_follows_its_solo_curve(setting: str) -> None:
    """Four optimisation steps of three seeds together: every seed's losses, and its predictions
    after them, stay those of the same seed trained alone on the same batches. (Not every weight:
    a bias before a BatchNorm has a zero gradient up to rounding, which Adam turns into steps.)"""
    steps = 4
    probe = batches(1, step=99)[0]

    def predictions(model: MolGNN) -> torch.Tensor:
        """Training-mode and evaluation-mode outputs (the latter read the running statistics)."""
        with torch.no_grad():
            out = [model.train(mode)(probe.x, probe.edge_index, probe.edge_attr, probe.batch,
                                     probe.num_graphs).logits for mode in (False, True)]
        return torch.cat(out)

    alone, alone_predictions = [], []
    for seed in range(3):
        model = build(setting, seed)
        optimizer = build_optimizer(model, 1e-3)
        alone.append([train_step([model], [optimizer], [batches(3, step)[seed]], TASK, 0.0, None)
                      [0].item() for step in range(steps)])
        alone_predictions.append(predictions(model))
    models = [build(setting, seed) for seed in range(3)]
    optimizers = [build_optimizer(m, 1e-3) for m in models]
    together = [train_step(models, optimizers, batches(3, step), TASK, 0.0, None)[0].tolist()
                for step in range(steps)]
    for seed in range(3):
        assert [row[seed] for row in together] == pytest.approx(alone[seed], rel=1e-4, abs=1e-6)
        assert len(set(alone[seed])) == steps  # the weights did move
        # rounding-level gradients of biases before BatchNorm, which Adam turns into steps, move
        # the running means a little (≤ 3e-3 here); another seed's statistics move them by ~0.1
        torch.testing.assert_close(predictions(models[seed]), alone_predictions[seed], rtol=2e-2,
                                   atol=5e-3)


def test_a_seed_draws_the_same_random_numbers_alone_and_in_a_group(
        small_mirror: Path, tmp_path: Path) -> None:
    """Dropout, gate noise and node dropping on: seed 1's first steps are the same trained alone
    (torch's global random state) and among seeds 0 and 2 (its own stream), data order included."""
    cfg = validate(compose_cfg(tmp_path, small_mirror, "moe=gmoe", "experts=n4_half",
                               "moe.top_k=2", "model.hidden_dim=16", "dataset.drop_node_p=0.3",
                               "trainer.batch_size=8"))
    data = load_dataset(cfg.dataset)

    def first_losses(seeds: list[int], own_streams: bool) -> list[list[float]]:
        runs = [start_seed(cfg, data, seed, torch.device("cpu"),
                           SeedCheckpoint(tmp_path / "none", seed), own_streams, resume=False)
                for seed in seeds]
        streams = [r.stream for r in runs] if own_streams else None
        losses = []
        for step, parts in enumerate(zip(*(r.loader for r in runs), strict=True)):
            if step == 3:
                break
            for r in runs:
                r.model.train()
            out, _ = train_step([r.model for r in runs], [r.optimizer for r in runs], list(parts),
                                data.task_type, cfg.dataset.drop_node_p, streams)
            losses.append(out.tolist())
        return losses

    alone = [row[0] for row in first_losses([1], own_streams=False)]
    grouped = [row[1] for row in first_losses([0, 1, 2], own_streams=True)]
    assert grouped == pytest.approx(alone, rel=1e-4)
    assert len(set(alone)) == 3  # the steps differ: the check compares real training


def summary_of(tmp_path: Path, mirror: Path, name: str, *overrides: str,
               seeds: str = "[0,1,2]") -> dict:
    """Train 3 epochs into ``tmp_path/name`` (its own checkpoints); the summary."""
    cfg = compose_cfg(tmp_path / name, mirror, "model.hidden_dim=16", "trainer.epochs=3",
                      f"seeds={seeds}", *overrides)
    (tmp_path / name).mkdir(exist_ok=True)
    train(cfg, tmp_path / name)
    return json.loads((tmp_path / name / "summary.json").read_text())


def curves(summary: dict) -> dict[int, list[float]]:
    """Each seed's training loss, validation and test metric per epoch (the last two read the
    BatchNorm running statistics: a seed given another's would show)."""
    return {s["seed"]: [v for e in s["epochs"] for v in (e["train_loss"], e["valid"], e["test"])]
            for s in summary["seeds"]}


def test_grouped_run_matches_solo_run_and_resumes_exactly(
        small_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gmoe-train with seeds_per_group=2 (a group of seeds 0 and 1, then seed 2 alone) gives each
    seed its solo curve (dropout on: the seeds' streams) and the summary's form; killed after
    its first epoch's checkpoints, the grouped run resumes to exactly its uninterrupted curves."""
    solo = summary_of(tmp_path, small_mirror, "solo")
    grouped = summary_of(tmp_path, small_mirror, "grouped", "trainer.seeds_per_group=2")
    assert set(grouped) == set(solo) and grouped["complete"]
    assert [s["seed"] for s in grouped["seeds"]] == [0, 1, 2]
    for seed, curve in curves(solo).items():
        assert curves(grouped)[seed] == pytest.approx(curve, rel=1e-3)

    saves = []
    real_save = SeedCheckpoint.save

    def killed_after_two_saves(self: SeedCheckpoint, state: dict) -> None:
        if len(saves) == 2:
            raise KeyboardInterrupt
        saves.append(self.seed)
        real_save(self, state)

    monkeypatch.setattr(SeedCheckpoint, "save", killed_after_two_saves)
    with pytest.raises(KeyboardInterrupt):
        summary_of(tmp_path, small_mirror, "killed", "trainer.seeds_per_group=2")
    assert saves == [0, 1]
    monkeypatch.setattr(SeedCheckpoint, "save", real_save)
    resumed = summary_of(tmp_path, small_mirror, "killed", "trainer.seeds_per_group=2")
    uninterrupted = summary_of(tmp_path, small_mirror, "again", "trainer.seeds_per_group=2")
    assert curves(resumed) == curves(uninterrupted)


def test_a_diverged_seed_leaves_its_group(small_mirror: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 1's loss turns NaN in its group's first step: seed 1 fails with the solo message,
    seeds 0 and 2 finish with the curves they have without it."""
    real_loss = loop.task_loss
    calls = []

    def nan_for_the_second_seed_once(logits, y, task_type):
        calls.append(1)
        loss = real_loss(logits, y, task_type)
        return loss * float("nan") if len(calls) == 2 else loss

    reference = summary_of(tmp_path, small_mirror, "reference", "trainer.seeds_per_group=2",
                           seeds="[0,2]")
    monkeypatch.setattr(loop, "task_loss", nan_for_the_second_seed_once)
    with pytest.raises(TrainingError, match=r"seed\(s\) 1 failed"):
        summary_of(tmp_path, small_mirror, "diverged", "trainer.seeds_per_group=3")
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert "seed 1 diverged in epoch 1" in summary["failed_seeds"][0]["error"]
    assert [s["seed"] for s in summary["seeds"]] == [0, 2]
    for seed, curve in curves(reference).items():
        assert curves(summary)[seed] == pytest.approx(curve, rel=1e-4)


@pytest.mark.parametrize("setting", ["gmoe-gcn-hop2-virtual", "gmoe-gin-hop2-virtual"])
def test_balance_loss_is_scaled_by_lambda(setting: str) -> None:
    """moe.loss_weight (λ) multiplies the balance loss, alone and in a group of seeds."""
    parts = batches(2)

    def balance(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        models = [build(setting, seed, loss_weight=weight).eval() for seed in range(2)]
        with torch.no_grad():
            solo = models[0](parts[0].x, parts[0].edge_index, parts[0].edge_attr, parts[0].batch,
                             parts[0].num_graphs).aux_loss
            return solo, group_forward(models, *joined(parts), None).aux_loss

    (solo_full, group_full), (solo_tenth, group_tenth) = balance(1.0), balance(0.1)
    assert solo_full > 0 and (group_full > 0).all()
    torch.testing.assert_close(solo_tenth, 0.1 * solo_full)
    torch.testing.assert_close(group_tenth, 0.1 * group_full)
