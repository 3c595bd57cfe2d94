"""Train and evaluate one seed under OGB's protocol: test at the best validation epoch."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
from ogb.graphproppred import Evaluator
from torch_geometric.loader import DataLoader

from gmoe_bench.config import TrainConfig
from gmoe_bench.data.ogb import MolDataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, restore_rng_state, rng_state
from gmoe_bench.engine.loop import EpochStats, evaluate, train_epoch
from gmoe_bench.errors import ConfigError, TrainingError, describe_error
from gmoe_bench.model import build_model
from gmoe_bench.records import EpochRecord, SeedResult, code_commit, is_better

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, fused: one kernel over all parameters (GMoE has hundreds of small ones; 4.6× faster
    than the per-parameter loop on CPU)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"trainer.device={name} but this machine has "
                          f"{torch.cuda.device_count()} visible CUDA device(s) (torch "
                          f"{torch.__version__}). Use trainer.device=cpu or auto, or install a "
                          "CUDA build of torch (make install TORCH_SPEC=...).")
    return device


def routing_shares(stats: EpochStats) -> list[list[float]]:
    if stats.expert_counts is None:
        return []
    counts = stats.expert_counts.astype(float)
    return (counts / counts.sum(axis=1, keepdims=True).clip(min=1)).round(6).tolist()


def run_seed(cfg: TrainConfig, data: MolDataset, seed: int, device: torch.device,
             on_epoch: Callable[[EpochRecord], None], checkpoint: SeedCheckpoint) -> SeedResult:
    """Train ``cfg`` on ``data`` with ``seed``, resuming from ``checkpoint`` if it holds epochs.

    Calls ``on_epoch`` after every epoch (also for the epochs restored from the checkpoint) and
    saves the checkpoint after it. Raises TrainingError when the training loss is not finite.
    """
    seed_everything(seed)
    model = build_model(cfg.model, cfg.moe, data.num_tasks).to(device)
    optimizer = build_optimizer(model, cfg.trainer.lr)
    t = cfg.trainer
    shuffle = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(data.graphs[data.split["train"]], batch_size=t.batch_size,
                              shuffle=True, generator=shuffle, num_workers=t.num_workers)
    valid_loader = DataLoader(data.graphs[data.split["valid"]], batch_size=t.eval_batch_size,
                              num_workers=t.num_workers)
    test_loader = DataLoader(data.graphs[data.split["test"]], batch_size=t.eval_batch_size,
                             num_workers=t.num_workers)
    evaluator = Evaluator(data.name)
    metric = data.eval_metric

    records: list[EpochRecord] = []
    best: EpochRecord | None = None
    elapsed = 0.0
    state = checkpoint.load(model.state_dict()) if cfg.trainer.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], shuffle)
        records = [EpochRecord(**r) for r in state["records"]]
        elapsed = state["wall_seconds"]
        for record in records:
            if is_better(metric, record.valid, best.valid if best else None):
                best = record
            on_epoch(record)
        log.info("seed %d: resumed after epoch %d from %s", seed, len(records),
                 checkpoint.state_path)

    start = time.perf_counter() - elapsed
    for epoch in range(len(records) + 1, t.epochs + 1):
        try:
            stats = train_epoch(model, train_loader, optimizer, device, data.task_type,
                                cfg.dataset.drop_node_p, t.progress)
            if not (math.isfinite(stats.task_loss) and math.isfinite(stats.aux_loss)):
                raise TrainingError(f"the training loss became {stats.task_loss} (auxiliary "
                                    f"{stats.aux_loss})")
            valid = evaluate(model, valid_loader, evaluator, device, t.progress)
            test = evaluate(model, test_loader, evaluator, device, t.progress)
        except (TrainingError, ValueError, RuntimeError) as err:
            # A diverged model fails anywhere (NaN in the gate's Normal, in the metric, ...).
            if isinstance(err, TrainingError):
                reason = str(err)
            elif all(p.isfinite().all() for p in model.parameters()):
                raise
            else:  # describe_error: the first line only, the rest can be a tensor of NaN
                reason = f"its weights are no longer finite ({describe_error(err)})"
            raise TrainingError(f"seed {seed} diverged in epoch {epoch}: {reason}. Lower trainer.lr "
                                "or moe.loss_weight; the other seeds and finished results are kept."
                                ) from err
        record = EpochRecord(
            epoch=epoch,
            train_loss=stats.task_loss,
            aux_loss=stats.aux_loss,
            valid=valid,
            test=test,
            train_seconds=stats.seconds,
            graphs_per_second=stats.graphs / max(stats.seconds, 1e-9),
            skipped_batches=stats.skipped_batches,
            routing=routing_shares(stats),
        )
        records.append(record)
        if is_better(metric, record.valid, best.valid if best else None):
            best = record
            # before the checkpoint: a resumed run repeats an epoch whose best weights may be missing
            checkpoint.save_best_model(model.state_dict())
        log.info("seed %d epoch %d/%d: loss %.4f aux %.4f valid %s %.4f test %.4f (%.1fs)",
                 seed, epoch, t.epochs, record.train_loss, record.aux_loss, metric,
                 record.valid, record.test, record.train_seconds)
        on_epoch(record)
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": rng_state(shuffle), "records": [asdict(r) for r in records],
                         "wall_seconds": time.perf_counter() - start})
    assert best is not None
    return SeedResult(seed=seed, best_epoch=best.epoch, valid=best.valid, test=best.test,
                      wall_seconds=time.perf_counter() - start,
                      num_parameters=sum(p.numel() for p in model.parameters()),
                      commit=code_commit(), epochs=records)
