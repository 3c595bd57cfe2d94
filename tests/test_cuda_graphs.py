"""CUDA-graph replay on a GPU (skipped elsewhere). Needs no rdkit: the batches are random molecules
in OGB's feature ranges, so it runs on a bare GPU image with torch, PyG and ogb."""

from __future__ import annotations

import pytest
import torch
from ogb.utils.features import get_atom_feature_dims, get_bond_feature_dims
from torch import nn
from torch_geometric.data import Batch, Data

from gmoe_bench.config import ModelConfig, MoEConfig
from gmoe_bench.data.padding import pad_together
from gmoe_bench.engine.graphed import GraphedTrainStep
from gmoe_bench.engine.run import build_optimizer
from gmoe_bench.model import MolGNN, build_model

TASK = "binary classification"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def random_molecule(generator: torch.Generator) -> Data:
    """A random chain with a few rings closed, its atom and bond features in OGB's ranges."""
    num_atoms = int(torch.randint(3, 30, (1,), generator=generator))
    bonds = [(i, i + 1) for i in range(num_atoms - 1)]
    bonds += [(i, i + 5) for i in range(0, num_atoms - 5, 7)]
    src, dst = zip(*bonds, strict=True)
    edge_index = torch.tensor([src + dst, dst + src])
    x = torch.stack([torch.randint(0, d, (num_atoms,), generator=generator)
                     for d in get_atom_feature_dims()], 1)
    attr = torch.stack([torch.randint(0, d, (len(bonds),), generator=generator)
                        for d in get_bond_feature_dims()], 1)
    y = torch.randint(0, 2, (1, 1), generator=generator).float()
    return Data(x=x, edge_index=edge_index, edge_attr=torch.cat([attr, attr]), y=y)


def random_batches(step: int, num_seeds: int, size: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(step)
    return [Batch.from_data_list([random_molecule(generator) for _ in range(size)])
            for _ in range(num_seeds)]


def gmoe(seed: int) -> MolGNN:
    torch.manual_seed(seed)
    model = build_model(ModelConfig("gcn", 3, 24, 0.0, False, "mean"),
                        MoEConfig(4, 2, 2, 1.0, False, "sum", "dense", True, "top_k"), 1)
    for module in model.modules():  # gates start at zero: give them an opinion
        if hasattr(module, "w_gate"):
            nn.init.normal_(module.w_gate, std=0.5)
    return model


def test_replayed_steps_equal_eager_steps_on_a_gpu() -> None:
    """Two seeds' steps captured and replayed over alternating shapes compute each step's own
    batch (learning rate 0, so that unordered atomic sums cannot grow through Adam): losses, the
    last step's gradients and Adam's step count. Stale inputs, a wrong buffer, a broken stream or a
    skipped update would show."""
    device = torch.device("cuda")
    losses, grads, adam_steps = [], [], []
    for capture in (True, False):
        models = [gmoe(seed).to(device) for seed in (0, 1)]
        optimizers = [build_optimizer(m, 0.0, capturable=capture) for m in models]
        step = GraphedTrainStep(models, optimizers, TASK, capture=capture, warmup=1)
        run = []
        for t in range(8):
            parts = [b.to(device) for b in random_batches(t % 3, 2, 8 + 4 * (t % 2))]
            run.append(step(pad_together(parts, True)).losses.clone())
        losses.append(torch.stack(run))
        grads.append([p.grad.clone() for m in models for p in m.parameters() if p.grad is not None])
        adam_steps.append([float(state["step"]) for o in optimizers for state in o.state.values()])
        if capture:
            assert step.num_graphs >= 2
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)  # the last step's
    assert adam_steps[0] == adam_steps[1] and set(adam_steps[0]) == {8.0}  # every update ran
