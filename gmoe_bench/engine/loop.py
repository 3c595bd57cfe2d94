"""One training epoch and one evaluation pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from ogb.graphproppred import Evaluator
from torch import Tensor
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader
from tqdm import tqdm

from gmoe_bench.data.augment import drop_nodes
from gmoe_bench.errors import TrainingError
from gmoe_bench.model import ModelOutput, MolGNN


@dataclass
class EpochStats:
    task_loss: float  # mean over steps
    aux_loss: float  # mean over steps (already weighted by λ)
    seconds: float
    graphs: int
    skipped_batches: int  # one-atom or one-graph batches, which BatchNorm cannot normalise in training
    expert_counts: np.ndarray | None  # [L, n] nodes routed to each expert over the epoch


def task_loss(logits: Tensor, y: Tensor, task_type: str) -> Tensor:
    """BCE-with-logits (classification) or MSE (regression) over the labelled entries only."""
    y = y.view(logits.shape).to(logits.dtype)
    labelled = ~torch.isnan(y)
    logits, y = logits[labelled], y[labelled]
    if "classification" in task_type:
        total = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    else:
        total = F.mse_loss(logits, y, reduction="sum")
    return total / labelled.sum().clamp(min=1)  # no host sync; a batch with no labels gives 0


def train_step(model: MolGNN, optimizer: torch.optim.Optimizer, batch: Batch, task_type: str,
               drop_node_p: float) -> tuple[Tensor, ModelOutput]:
    """One optimisation step on ``batch`` (already on the model's device): node dropping, forward,
    task loss plus the weighted auxiliary loss, backward, optimizer step. Returns the task loss and
    the model's output as device tensors: reading them is the caller's (one host sync per epoch).
    The benchmark (scripts/bench.py) times this same step."""
    x, edge_index, edge_attr, node_graph = batch.x, batch.edge_index, batch.edge_attr, batch.batch
    if drop_node_p > 0:
        x, edge_index, edge_attr, node_graph = drop_nodes(
            x, edge_index, edge_attr, node_graph, batch.num_graphs, drop_node_p)
    out = model(x, edge_index, edge_attr, node_graph, batch.num_graphs)
    loss = task_loss(out.logits, batch.y, task_type)
    optimizer.zero_grad(set_to_none=True)
    (loss + out.aux_loss).backward()
    optimizer.step()
    return loss, out


def train_epoch(model: MolGNN, loader: DataLoader, optimizer: torch.optim.Optimizer,
                device: torch.device, task_type: str, drop_node_p: float,
                progress: bool) -> EpochStats:
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    counts: Tensor | None = None
    steps = graphs = skipped = 0
    for batch in tqdm(loader, desc="train", leave=False, disable=None if progress else True):
        if batch.num_nodes < 2 or batch.num_graphs < 2:  # as OGB: BatchNorm needs two values
            skipped += 1
            continue
        batch = batch.to(device, non_blocking=True)
        loss, out = train_step(model, optimizer, batch, task_type, drop_node_p)
        loss_sum += loss.detach()
        aux_sum += out.aux_loss.detach()
        if out.expert_counts is not None:
            counts = out.expert_counts if counts is None else counts + out.expert_counts
        steps += 1
        graphs += batch.num_graphs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(
        task_loss=loss_sum.item() / max(steps, 1),
        aux_loss=aux_sum.item() / max(steps, 1),
        seconds=time.perf_counter() - start,
        graphs=graphs,
        skipped_batches=skipped,
        expert_counts=None if counts is None else counts.cpu().numpy(),
    )


@torch.no_grad()
def evaluate(model: MolGNN, loader: DataLoader, evaluator: Evaluator, device: torch.device,
             progress: bool) -> float:
    """OGB's metric (``evaluator.eval_metric``) over every graph of ``loader``."""
    model.eval()
    y_true, y_pred = [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        batch = batch.to(device, non_blocking=True)
        out = model(batch.x, batch.edge_index, batch.edge_attr, batch.batch, batch.num_graphs)
        y_true.append(batch.y.view(out.logits.shape).cpu())
        y_pred.append(out.logits.cpu())
    predictions = torch.cat(y_pred).float()
    if not predictions.isfinite().all():
        raise TrainingError("the model's predictions are not finite")
    result = evaluator.eval({"y_true": torch.cat(y_true).numpy(), "y_pred": predictions.numpy()})
    return float(result[evaluator.eval_metric])
