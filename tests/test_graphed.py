"""Padded batches and the CUDA-graph training step (trainer.cuda_graphs): on the CPU the step runs
eagerly on the padded batches, which must train each seed exactly as the unpadded step does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

from gmoe_bench.config import ModelConfig, MoEConfig, validate
from gmoe_bench.data.hop2 import two_hop_edges
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.data.padding import (
    EDGE_MULTIPLE,
    NODE_MULTIPLE,
    pad_batch,
    pad_together,
    padded_shape,
    two_hop_edges_each,
)
from gmoe_bench.engine.checkpoint import SeedCheckpoint
from gmoe_bench.engine.graphed import GraphedTrainStep, check_graphable
from gmoe_bench.engine.loop import train_epoch, train_step
from gmoe_bench.engine.loss import task_loss
from gmoe_bench.engine.run import build_optimizer, resolve_device, start_seed
from gmoe_bench.errors import ConfigError
from gmoe_bench.model import MolGNN, build_model
from gmoe_bench.model.gnn import hop_graphs
from gmoe_bench.model.norm import batch_norm
from tests.test_hop2 import graph
from tests.test_robustness import compose_cfg
from tests.test_seed_group import TASK, batches, build

GRAPHABLE = ["gcn", "gin-virtual", "gmoe-gcn-dense-dispatch"]
GMOE_GIN_DENSE = ("gin", 4, 2, 2, "dense", "top_k", True, "sum")


@pytest.fixture(autouse=True)
def _gin_dense_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import test_seed_group
    monkeypatch.setitem(test_seed_group.SETTINGS, "gmoe-gin-dense-dispatch", GMOE_GIN_DENSE)


def test_masked_batch_norm_equals_batch_norm_of_the_real_rows() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    mask = torch.tensor([1.0] * 7 + [0.0] * 3)
    padded_norm = nn.BatchNorm1d(4)
    with torch.no_grad():
        padded_norm.weight.uniform_(0.5, 2)
        padded_norm.bias.uniform_(-1, 1)
    norm = copy.deepcopy(padded_norm)
    x_real = x[:7].clone().requires_grad_()
    x_pad = torch.cat([x_real, torch.tensor([[1e30] * 4, [float("inf")] * 4, [-1e38] * 4])])
    out = batch_norm(x_pad, padded_norm, mask)
    expected = norm(x_real)
    torch.testing.assert_close(out[:7], expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(padded_norm, name), getattr(norm, name))
    grad_padded, = torch.autograd.grad((out[:7] ** 3).sum(), x_real)
    grad_plain, = torch.autograd.grad((expected ** 3).sum(), x_real)
    torch.testing.assert_close(grad_padded, grad_plain)


def test_padded_shapes_round_up_and_join_seeds() -> None:
    parts = batches(3)
    padded = pad_together(parts, needs_hop2=True, batch_size=10)
    assert len({p.shape for p in padded}) == 1
    num_nodes, num_edges, num_hop2, num_graphs = padded[0].shape
    assert num_nodes % NODE_MULTIPLE == 0 and num_nodes > max(b.num_nodes for b in parts)
    assert num_edges % EDGE_MULTIPLE == 0
    assert num_graphs == 11  # the batch size and the padding atoms' graph
    for b, p in zip(parts, padded, strict=True):
        assert p.node_mask.sum() == b.num_nodes and not torch.isnan(p.y[: b.num_graphs]).any()
        assert torch.isnan(p.y[b.num_graphs:]).all()
        assert (p.batch[b.num_nodes:] == num_graphs - 1).all()
        pad_edges = p.edge_index[:, b.edge_index.size(1):]
        assert (pad_edges >= b.num_nodes).all()  # no padding bond touches a real atom
        assert p.hop2_index.size(1) == num_hop2 >= two_hop_edges(
            b.edge_index, b.edge_attr, b.num_nodes)[0].size(1)
    with pytest.raises(ValueError, match="smaller"):
        pad_batch(parts[0], None, (parts[0].num_nodes, 10**4, 0, 9))
    hop2 = two_hop_edges(parts[0].edge_index, parts[0].edge_attr, parts[0].num_nodes)
    with pytest.raises(ValueError, match="smaller"):
        pad_batch(parts[0], hop2, (10**4, 10**4, hop2[0].size(1) - 1, 99))


def test_padding_stays_bounded_in_a_deep_gin_with_a_virtual_node() -> None:
    """GIN sums its messages unnormalised, so padding atoms (joined by self-loops) would grow
    without bound over layers and, once infinite, poison the statistics: they are reset to 0
    after every layer, and the real graphs get the unpadded logits."""
    model = build_model(ModelConfig("gin", 12, 300, 0.0, True, "mean"),
                        MoEConfig(0, 0, 1, 0.0, False, "sum", "dense", True, "top_k"), 1).train()
    b = batches(1)[0]
    p = pad_together([b], needs_hop2=False, batch_size=8)[0]
    padded = copy.deepcopy(model)(p.x, p.edge_index, p.edge_attr, p.batch, p.num_graphs,
                                  p.node_mask)
    plain = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
    assert padded.logits.isfinite().all()
    # twelve BatchNorm layers amplify the different summation order to ~3e-3 relative
    torch.testing.assert_close(padded.logits[: b.num_graphs], plain.logits, rtol=1e-2, atol=1e-3)


def test_two_hop_paths_of_a_group_in_one_call_equal_each_batch_alone() -> None:
    parts = [*batches(3), batches(1, step=7)[0]]
    parts.append(Batch.from_data_list([graph("C"), graph("[Na+].[Cl-]")]))  # no paths at all
    for b, (index, attr) in zip(parts, two_hop_edges_each(parts), strict=True):
        expected_index, expected_attr = two_hop_edges(b.edge_index, b.edge_attr, b.num_nodes)
        assert torch.equal(index, expected_index) and torch.equal(attr, expected_attr)


@pytest.mark.parametrize("setting", [*GRAPHABLE, "gmoe-gin-dense-dispatch"])
def test_padded_forward_equals_unpadded(setting: str) -> None:
    """Logits of the real graphs, balance loss and expert counts, in training (BatchNorm over the
    batch) and in evaluation."""
    model = build(setting, 0)
    b = batches(1)[0]
    p = pad_together([b], needs_hop2=model.needs_hop2, batch_size=8)[0]
    for training in (True, False):
        model.train(training)
        padded_model = copy.deepcopy(model)
        plain = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs)
        out = padded_model(p.x, p.edge_index, p.edge_attr, p.batch, p.num_graphs, p.node_mask,
                           (p.hop2_index, p.hop2_attr) if model.needs_hop2 else None)
        torch.testing.assert_close(out.logits[: b.num_graphs], plain.logits)
        torch.testing.assert_close(out.aux_loss, plain.aux_loss)
        if plain.expert_counts is not None:
            assert torch.equal(out.expert_counts, plain.expert_counts)


@pytest.mark.parametrize("setting", [*GRAPHABLE, "gmoe-gin-dense-dispatch"])
def test_graphed_step_trains_each_seed_as_the_unpadded_step(setting: str) -> None:
    """Four steps of two seeds on padded batches (run eagerly, as on the CPU) follow each seed's
    unpadded solo steps: losses, and predictions after them in training and evaluation mode
    (the latter read the running statistics). Not every weight: a bias before a BatchNorm has a
    zero gradient up to rounding, which Adam turns into steps."""
    probe = batches(1, step=99)[0]

    def predictions(model: MolGNN) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.train(mode)(probe.x, probe.edge_index, probe.edge_attr,
                                                probe.batch, probe.num_graphs).logits
                              for mode in (False, True)])

    models = [build(setting, seed) for seed in (0, 1)]
    references = copy.deepcopy(models)
    optimizers = [build_optimizer(m, 1e-3) for m in models]
    reference_optimizers = [build_optimizer(m, 1e-3) for m in references]
    step = GraphedTrainStep(models, optimizers, TASK, capture=False)
    for t in range(4):
        parts = batches(2, step=t)
        out = step(pad_together(parts, models[0].needs_hop2, batch_size=8))
        for i, (ref, opt, b) in enumerate(zip(references, reference_optimizers, parts, strict=True)):
            losses, ref_out = train_step([ref.train()], [opt], [b], TASK, 0.0, None)
            assert out.losses[i].item() == pytest.approx(losses[0].item(), rel=1e-4, abs=1e-6)
            assert out.aux_losses[i].item() == pytest.approx(ref_out.aux_loss[0].item(),
                                                             rel=1e-4, abs=1e-6)
    for model, ref in zip(models, references, strict=True):
        torch.testing.assert_close(predictions(model), predictions(ref), rtol=2e-2, atol=5e-3)
    assert step.steps == 4 and step.num_graphs == 0  # eager: nothing captured


def test_sparse_dispatch_and_expert_choice_are_refused_in_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"moe\.dispatch=dense"):
        check_graphable(build("gmoe-gcn-hop2-virtual", 0))
    from tests import test_seed_group
    dense_expert_choice = ("gin", 4, 2, 2, "dense", "expert_choice", False, "sum")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(test_seed_group.SETTINGS, "ec", dense_expert_choice)
        with pytest.raises(ValueError, match="expert_choice"):
            check_graphable(build("ec", 0))
    check_graphable(build("gmoe-gcn-dense-dispatch", 0))  # accepted


def test_padded_shape_has_room_for_the_padding_graph() -> None:
    b = batches(1)[0]
    num_nodes, _, num_hop2, num_graphs = padded_shape(b, None, 32)
    assert num_nodes > b.num_nodes and num_hop2 == 0 and num_graphs == 33


def test_an_epoch_through_the_graphed_step_equals_the_plain_epoch(small_mirror: Path,
                                                                    tmp_path: Path) -> None:
    """train_epoch with trainer.cuda_graphs' step (eager here: no GPU) gives each seed of a group
    the losses and expert counts of the plain lockstep epoch; the last, smaller batch included."""
    cfg = validate(compose_cfg(tmp_path, small_mirror, "moe=gmoe", "experts=n4_half",
                               "moe.top_k=2", "moe.dispatch=dense", "moe.noisy_gating=false",
                               "model.hidden_dim=16", "model.dropout=0", "trainer.batch_size=7"))
    data = load_dataset(cfg.dataset)
    cpu = torch.device("cpu")
    stats = []
    for graphs in (False, True):
        runs = [start_seed(cfg, data, seed, cpu, SeedCheckpoint(tmp_path / "none", seed), False,
                           resume=False) for seed in (0, 1)]
        models, optimizers = [r.model for r in runs], [r.optimizer for r in runs]
        graphed = GraphedTrainStep(models, optimizers, data.task_type, capture=False)
        stats.append(train_epoch(models, [r.loader for r in runs], optimizers, cpu,
                                 data.task_type, 0.0, False, None, graphed if graphs else None))
        if graphs:
            assert graphed.steps == len(runs[0].loader)  # every step went through it
    for plain, graphed_stats in zip(*stats, strict=True):
        assert graphed_stats.task_loss == pytest.approx(plain.task_loss, rel=1e-4)
        assert graphed_stats.aux_loss == pytest.approx(plain.aux_loss, rel=1e-4)
        assert (graphed_stats.expert_counts == plain.expert_counts).all()


def test_cuda_graphs_without_a_gpu_is_one_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="needs a GPU, but this machine has none"):
        resolve_device("auto", cuda_graphs=True)


@pytest.mark.parametrize("setting", ["gmoe-gcn-dense-dispatch", "gmoe-gin-dense-dispatch"])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_dense_experts_equal_one_expert_at_a_time(setting: str, padded: bool) -> None:
    """Dense dispatch runs its experts as one grouped computation; it must equal the official
    formulation, one expert at a time: outputs, input gradients and running statistics, in
    training and evaluation, on a padded batch too."""
    layer = build(setting, 0).layers[0]
    b = batches(1)[0]
    if padded:
        p = pad_together([b], True, 8)[0]
        x_index, graph, mask = p.x, (p.edge_index, p.edge_attr, (p.hop2_index, p.hop2_attr)), p.node_mask
    else:
        x_index, graph, mask = b.x, (b.edge_index, b.edge_attr, None), None
    num_nodes, real = x_index.size(0), b.num_nodes
    hop1, hop2 = hop_graphs(graph[0], graph[1], num_nodes, True, graph[2])
    torch.manual_seed(1)
    x = torch.randn(num_nodes, layer.norms[0].num_features)
    for training in (True, False):
        grouped, reference = copy.deepcopy(layer).train(training), copy.deepcopy(layer).train(training)
        with torch.no_grad():
            routing = grouped.gate(x, mask)
        outputs, grads = [], []
        for run in (grouped.dense_grouped, reference.dense_reference):
            x_in = x.clone().requires_grad_()
            out = run(x_in, routing, hop1, hop2, mask)[:real]
            (out ** 2).sum().backward()
            outputs.append(out)
            grads.append(x_in.grad[:real])
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
        for a, r in zip(grouped.norms, reference.norms, strict=True):
            torch.testing.assert_close(a.running_mean, r.running_mean)
            torch.testing.assert_close(a.running_var, r.running_var)


def test_task_loss_averages_over_labelled_entries_only() -> None:
    """OGB's loss: the mean over the labelled (graph, task) entries; a missing label adds nothing
    and is not counted; a batch without labels gives 0 (not NaN)."""
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = torch.stack([F.binary_cross_entropy_with_logits(logits[i, j], y[i, j])
                            for i, j in ((0, 0), (1, 0), (1, 1))]).mean()
    torch.testing.assert_close(task_loss(logits, y, "binary classification"), expected)
    regression = task_loss(logits, torch.tensor([[1.0, float("nan")], [3.0, 0.0]]), "regression")
    torch.testing.assert_close(regression, torch.tensor((1.0 + 4.0 + 1.0) / 3))
    none = task_loss(logits, torch.full((2, 2), float("nan")), "binary classification")
    assert none.item() == 0.0
