"""One training epoch and one evaluation pass, of one seed or of several seeds in lockstep."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from ogb.graphproppred import Evaluator
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from gmoe_bench.data.augment import drop_nodes
from gmoe_bench.data.padding import Graphs, pad_together
from gmoe_bench.engine.graphed import GraphedTrainStep, StepOutput
from gmoe_bench.engine.loss import task_loss
from gmoe_bench.errors import TrainingError
from gmoe_bench.model import MolGNN
from gmoe_bench.model.seed_group import GroupOutput, group_forward


@dataclass
class EpochStats:
    task_loss: float  # mean over steps
    aux_loss: float  # mean over steps (already weighted by λ)
    seconds: float
    graphs: int
    skipped_batches: int  # one-atom or one-graph batches, which BatchNorm cannot normalise in training
    expert_counts: np.ndarray | None  # [L, n] nodes routed to each expert over the epoch


class JoinedBatch(NamedTuple):
    """The batches of a group's seeds as one disjoint graph, seed after seed."""

    x: Tensor  # [N, 9]
    edge_index: Tensor  # [2, E]
    edge_attr: Tensor  # [E, 3]
    batch: Tensor  # [N] graph of each atom, numbered across seeds
    node_sizes: list[int]  # atoms per seed
    graph_sizes: list[int]  # graphs per seed


def join(graphs: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, int]]) -> JoinedBatch:
    """One disjoint graph from each seed's ``(x, edge_index, edge_attr, batch, num_graphs)``."""
    node_sizes = [part[0].size(0) for part in graphs]
    graph_sizes = [part[4] for part in graphs]
    if len(graphs) == 1:
        x, edge_index, edge_attr, batch, _ = graphs[0]
        return JoinedBatch(x, edge_index, edge_attr, batch, node_sizes, graph_sizes)
    node_offsets = np.cumsum([0, *node_sizes[:-1]]).tolist()
    graph_offsets = np.cumsum([0, *graph_sizes[:-1]]).tolist()
    return JoinedBatch(
        torch.cat([part[0] for part in graphs]),
        torch.cat([part[1] + offset for part, offset in zip(graphs, node_offsets, strict=True)], 1),
        torch.cat([part[2] for part in graphs]),
        torch.cat([part[3] + offset for part, offset in zip(graphs, graph_offsets, strict=True)]),
        node_sizes, graph_sizes)


def with_nodes_dropped(batches: Sequence[Batch], drop_node_p: float,
                       streams: Sequence[torch.Generator] | None) -> list[Graphs]:
    """Each seed's batch, with each atom dropped with probability ``drop_node_p`` (from the
    seed's own stream; None: torch's global one)."""
    out = []
    for i, b in enumerate(batches):
        x, edge_index, edge_attr, node_graph = b.x, b.edge_index, b.edge_attr, b.batch
        if drop_node_p > 0:
            x, edge_index, edge_attr, node_graph = drop_nodes(
                x, edge_index, edge_attr, node_graph, b.num_graphs, drop_node_p,
                None if streams is None else streams[i])
        out.append(Graphs(x, edge_index, edge_attr, node_graph, b.y, b.num_graphs))
    return out


def train_step(models: Sequence[MolGNN], optimizers: Sequence[torch.optim.Optimizer],
               batches: Sequence[Batch], task_type: str, drop_node_p: float,
               streams: Sequence[torch.Generator] | None,
               free_grads: bool = True) -> tuple[Tensor, GroupOutput]:
    """One optimisation step of each seed of a group on its own batch (already on the device):
    node dropping, one forward of the joined batches, each seed's task loss plus its weighted
    auxiliary loss, one backward (the seeds share no weight, so each gets its own gradients), each
    seed's optimizer step. ``streams`` are the seeds' random streams (None: one seed on torch's
    global random state, as a solo run). Returns the task losses ``[S]`` and the output as device
    tensors: reading them is the caller's (one host sync per epoch). The benchmarks
    (scripts/bench*.py) time this same step. ``free_grads=False`` zeroes the gradients in place
    instead of freeing them: CUDA graphs captured over these models keep writing them."""
    joined = join([(g.x, g.edge_index, g.edge_attr, g.batch, g.num_graphs)
                   for g in with_nodes_dropped(batches, drop_node_p, streams)])
    out = group_forward(models, *joined, streams)
    logits = out.logits.split(joined.graph_sizes)
    losses = torch.stack([task_loss(seed_logits, b.y, task_type)
                          for seed_logits, b in zip(logits, batches, strict=True)])
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=free_grads)
    (losses + out.aux_loss).sum().backward()
    for optimizer in optimizers:
        optimizer.step()
    return losses, out


def graphed_step(graphed: GraphedTrainStep, batches: Sequence[Batch], drop_node_p: float,
                 streams: Sequence[torch.Generator] | None) -> StepOutput:
    """:func:`train_step` of every seed through ``graphed``: node dropping (eager, from each
    seed's stream), padding to one shape, the captured step. The losses are valid until the next
    step (the caller adds them up at once, in stream order); the counts are copied out."""
    parts = with_nodes_dropped(batches, drop_node_p, streams)
    out = graphed(pad_together(parts, graphed.models[0].needs_hop2))
    counts = None if out.expert_counts is None else out.expert_counts.clone()
    return out._replace(expert_counts=counts)


def trainable(batch: Batch) -> bool:
    """As OGB, a batch of one atom or one graph is skipped: BatchNorm needs two values."""
    return batch.num_nodes >= 2 and batch.num_graphs >= 2


def train_epoch(models: Sequence[MolGNN], loaders: Sequence[DataLoader],
                optimizers: Sequence[torch.optim.Optimizer], device: torch.device, task_type: str,
                drop_node_p: float, progress: bool,
                streams: Sequence[torch.Generator] | None,
                graphed: GraphedTrainStep | None = None) -> list[EpochStats]:
    """One epoch of each seed of a group, in lockstep: step ``t`` trains every seed on its own
    ``t``-th batch (the loaders hold the same graphs, each in its seed's order). Times are the
    group's. With ``graphed`` (``trainer.cuda_graphs``, built over ``models``), a step in which
    every seed trains runs there, on the batches padded to one shape."""
    for model in models:
        model.train()
    num_seeds = len(models)
    start = time.perf_counter()
    loss_sum = torch.zeros(num_seeds, device=device)
    aux_sum = torch.zeros(num_seeds, device=device)
    counts: list[Tensor | None] = [None] * num_seeds
    steps, graphs, skipped = [0] * num_seeds, [0] * num_seeds, [0] * num_seeds
    for batches in tqdm(zip(*loaders, strict=True), total=len(loaders[0]), desc="train",
                        leave=False, disable=None if progress else True):
        active = [i for i, b in enumerate(batches) if trainable(b)]
        for i in set(range(num_seeds)) - set(active):
            skipped[i] += 1
        if not active:
            continue
        moved = [batches[i].to(device, non_blocking=True) for i in active]
        if graphed is not None and len(active) == num_seeds:
            losses, aux, step_counts = graphed_step(graphed, moved, drop_node_p, streams)
        else:
            losses, out = train_step([models[i] for i in active], [optimizers[i] for i in active],
                                     moved, task_type, drop_node_p,
                                     None if streams is None else [streams[i] for i in active],
                                     free_grads=graphed is None)
            aux, step_counts = out.aux_loss, out.expert_counts
        index = torch.tensor(active, device=device)
        loss_sum.index_add_(0, index, losses.detach())
        aux_sum.index_add_(0, index, aux.detach())
        for j, i in enumerate(active):
            if step_counts is not None:
                counts[i] = step_counts[j] if counts[i] is None else counts[i] + step_counts[j]
            steps[i] += 1
            graphs[i] += moved[j].num_graphs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses, auxes = loss_sum.tolist(), aux_sum.tolist()
    return [EpochStats(task_loss=losses[i] / max(steps[i], 1), aux_loss=auxes[i] / max(steps[i], 1),
                       seconds=seconds, graphs=graphs[i], skipped_batches=skipped[i],
                       expert_counts=None if counts[i] is None else counts[i].cpu().numpy())
            for i in range(num_seeds)]


@torch.no_grad()
def evaluate(models: Sequence[MolGNN], loader: DataLoader, evaluator: Evaluator,
             device: torch.device, progress: bool) -> list[float]:
    """OGB's metric (``evaluator.eval_metric``) of each seed's model over every graph of
    ``loader``, all seeds on the same batches. Raises TrainingError naming the seeds (their
    positions in ``models``) whose predictions are not finite."""
    for model in models:
        model.eval()
    num_seeds = len(models)
    y_true, y_pred = [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        batch = batch.to(device, non_blocking=True)
        graph = (batch.x, batch.edge_index, batch.edge_attr, batch.batch, batch.num_graphs)
        out = group_forward(models, *join([graph] * num_seeds), None)
        y_true.append(batch.y.view(-1, out.logits.size(1)).cpu())
        y_pred.append(out.logits.view(num_seeds, batch.num_graphs, -1).cpu())
    predictions = torch.cat(y_pred, dim=1).float()  # [S, G, T]
    broken = [i for i in range(num_seeds) if not predictions[i].isfinite().all()]
    if broken:
        raise NonFinitePredictions(broken)
    truth = torch.cat(y_true).numpy()
    return [float(evaluator.eval({"y_true": truth, "y_pred": p.numpy()})[evaluator.eval_metric])
            for p in predictions]


class NonFinitePredictions(TrainingError):
    """Some seeds' predictions are not finite (their positions in the group: ``seeds``)."""

    def __init__(self, seeds: list[int]) -> None:
        super().__init__("the model's predictions are not finite")
        self.seeds = seeds
