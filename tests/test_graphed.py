"""Padded batches and the CUDA-graph training step (trainer.cuda_graphs): on the CPU the step runs
eagerly on the padded batches, which must train each seed exactly as the unpadded step does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gmoe_bench.data.hop2 import two_hop_edges
from gmoe_bench.data.padding import EDGE_MULTIPLE, NODE_MULTIPLE, pad_batch, pad_together, padded_shape
from gmoe_bench.engine.graphed import GraphedTrainStep, check_graphable
from gmoe_bench.engine.loop import train_step
from gmoe_bench.engine.run import build_optimizer
from gmoe_bench.model import MolGNN
from gmoe_bench.model.norm import batch_norm
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
    x_pad = torch.cat([x_real, x[7:] * 100])  # padding with wild values changes nothing
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
        assert p.node_mask.sum() == b.num_nodes and p.num_real_graphs == b.num_graphs
        assert torch.isnan(p.y[b.num_graphs:]).all()
        assert (p.batch[b.num_nodes:] == num_graphs - 1).all()
        pad_edges = p.edge_index[:, b.edge_index.size(1):]
        assert (pad_edges >= b.num_nodes).all()  # no padding bond touches a real atom
        assert p.hop2_index.size(1) == num_hop2 >= two_hop_edges(
            b.edge_index, b.edge_attr, b.num_nodes)[0].size(1)
    with pytest.raises(ValueError, match="smaller"):
        pad_batch(parts[0], None, (parts[0].num_nodes, 10**4, 0, 9))


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
