"""Train and evaluate seeds under OGB's protocol (test at the best validation epoch), one at a time or
several in lockstep."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from ogb.graphproppred import Evaluator
from torch_geometric.loader import DataLoader

from gmoe_bench.config import TrainConfig
from gmoe_bench.data.ogb import MolDataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, restore_rng_state, rng_state, set_aside
from gmoe_bench.engine.graphed import GraphedTrainStep
from gmoe_bench.engine.loop import EpochStats, NonFinitePredictions, evaluate, train_epoch
from gmoe_bench.errors import ConfigError, TrainingError, UserError, describe_error
from gmoe_bench.model import MolGNN, build_model
from gmoe_bench.records import EpochRecord, SeedResult, code_commit, is_better

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, lr: float,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """Adam, fused: one kernel over all parameters (GMoE has hundreds of small ones; 4.6× faster
    than the per-parameter loop on CPU). ``capturable``: its step may be recorded in a CUDA graph
    (engine/graphed.py)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, cuda_graphs: bool = False) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one, or for CUDA
    graphs (``cuda_graphs``) on a CPU, is a ConfigError."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cuda_graphs and device.type != "cuda":
            raise ConfigError("trainer.cuda_graphs=true needs a GPU, but this machine has none "
                              f"visible (torch {torch.__version__}); use trainer.cuda_graphs=false.")
        return device
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"trainer.device={name} but this machine has "
                          f"{torch.cuda.device_count()} visible CUDA device(s) (torch "
                          f"{torch.__version__}). Use trainer.device=cpu or auto, or install a "
                          "CUDA build of torch (make install TORCH_SPEC=...).")
    if device.type == "cuda":  # streams and CUDA graphs are made on the current device
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def routing_shares(stats: EpochStats) -> list[list[float]]:
    if stats.expert_counts is None:
        return []
    counts = stats.expert_counts.astype(float)
    return (counts / counts.sum(axis=1, keepdims=True).clip(min=1)).round(6).tolist()


def seed_stream(device: torch.device) -> torch.Generator:
    """A seed's own random stream, in the state a solo run's global stream has right after the
    seed's model was built (call it then): the same dropout masks, gate noise and node drops."""
    if device.type == "cuda":  # the model is built on the CPU: the CUDA stream is still fresh
        return torch.Generator(device).manual_seed(torch.initial_seed())
    stream = torch.Generator()
    stream.set_state(torch.get_rng_state())
    return stream


@dataclass
class SeedRun:
    """One seed's training state."""

    seed: int
    model: MolGNN
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator  # the order of its training graphs
    stream: torch.Generator | None  # its random numbers; None: torch's global state (solo)
    loader: DataLoader
    checkpoint: SeedCheckpoint
    records: list[EpochRecord] = field(default_factory=list)
    cuda_rng: list[torch.Tensor] | None = None  # the group's global CUDA state (cuda_graphs)
    best: EpochRecord | None = None
    elapsed: float = 0.0  # training seconds before this process


def start_seed(cfg: TrainConfig, data: MolDataset, seed: int, device: torch.device,
               checkpoint: SeedCheckpoint, own_stream: bool, resume: bool) -> SeedRun:
    """Build seed ``seed``'s model, optimizer and random streams, restored from ``checkpoint``
    when ``resume`` and it holds epochs."""
    seed_everything(seed)
    model = build_model(cfg.model, cfg.moe, data.num_tasks).to(device)
    stream = seed_stream(device) if own_stream else None
    shuffle = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.graphs[data.split["train"]], batch_size=cfg.trainer.batch_size,
                        shuffle=True, generator=shuffle, num_workers=cfg.trainer.num_workers)
    capturable = cfg.trainer.cuda_graphs and device.type == "cuda"
    run = SeedRun(seed, model, build_optimizer(model, cfg.trainer.lr, capturable), shuffle, stream,
                  loader, checkpoint)
    state = checkpoint.load(model.state_dict()) if resume else None
    if state is not None:
        try:
            _restore(run, state, capturable, data.eval_metric)
        except Exception as err:  # e.g. another version's records: it only costs its epochs
            set_aside(checkpoint.state_path, f"it cannot be restored ({type(err).__name__}: {err})")
            return start_seed(cfg, data, seed, device, checkpoint, own_stream, resume=False)
        log.info("seed %d: resumed after epoch %d from %s", seed, len(run.records),
                 checkpoint.state_path)
    return run


def _restore(run: SeedRun, state: dict[str, Any], capturable: bool, metric: str) -> None:
    """Put a checkpoint's weights, optimizer, random streams and epochs into ``run``."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the saved setting is the earlier run's
        group["capturable"] = capturable
    restore_rng_state(state["rng"], run.shuffle, run.stream)
    run.cuda_rng = state["rng"].get("cuda_global")
    run.records = [EpochRecord(**r) for r in state["records"]]
    run.elapsed = state["wall_seconds"]
    for record in run.records:
        if is_better(metric, record.valid, run.best.valid if run.best else None):
            run.best = record


def run_seeds(cfg: TrainConfig, data: MolDataset, seeds: list[int], device: torch.device,
              on_epoch: Callable[[int, EpochRecord], None],
              checkpoints: dict[int, SeedCheckpoint]) -> dict[int, SeedResult | Exception]:
    """Train ``cfg`` on ``data`` for each of ``seeds`` together, in lockstep (one seed: alone, on
    torch's global random state, as it always has), resuming from their checkpoints.

    Calls ``on_epoch(seed, record)`` after every epoch (also for the epochs restored from a
    checkpoint) and saves the seed's checkpoint after it. Seeds resumed at different epochs train
    in separate groups. A seed whose loss or weights stop being finite gets a TrainingError; the
    others go on. Any other failure of a group is given to that group's seeds (a UserError is
    raised: bad input fails every seed alike).
    """
    runs = [start_seed(cfg, data, seed, device, checkpoints[seed], len(seeds) > 1,
                       cfg.trainer.resume) for seed in seeds]
    for run in runs:
        for record in run.records:
            on_epoch(run.seed, record)
    results: dict[int, SeedResult | Exception] = {}
    for epochs_done in sorted({len(run.records) for run in runs}):
        group = [run for run in runs if len(run.records) == epochs_done]
        try:
            _train_group(cfg, data, group, device, on_epoch, results)
        except UserError:
            raise
        except Exception as err:  # fails this group's seeds only, not those already finished
            results.update((run.seed, err) for run in group if run.seed not in results)
    return results


def _train_group(cfg: TrainConfig, data: MolDataset, runs: list[SeedRun], device: torch.device,
                 on_epoch: Callable[[int, EpochRecord], None],
                 results: dict[int, SeedResult | Exception]) -> None:
    """Train ``runs`` (all at the same epoch) to the last epoch; put each seed's result (or
    TrainingError) in ``results``."""
    t = cfg.trainer
    # Their own generator: a loader without one draws its base seed from torch's global stream
    # at every pass, which would shift a solo seed's dropout masks away from its grouped run's.
    valid_loader, test_loader = (
        DataLoader(data.graphs[data.split[split]], batch_size=t.eval_batch_size,
                   num_workers=t.num_workers, generator=torch.Generator())
        for split in ("valid", "test"))
    evaluator = Evaluator(data.name)
    metric = data.eval_metric
    saved: set[int] = set()  # seeds whose checkpoint this process wrote
    start = time.perf_counter()
    epoch = len(runs[0].records)
    graphed: GraphedTrainStep | None = None  # its captures serve every epoch of these models
    saved_rng = runs[0].cuda_rng
    if t.cuda_graphs and saved_rng is not None and len(saved_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved_rng)  # a resumed group draws on where it stopped
    while runs and epoch < t.epochs:
        epoch += 1
        models = [run.model for run in runs]
        streams = None if runs[0].stream is None else [run.stream for run in runs]
        if t.cuda_graphs and (graphed is None or graphed.models != models):
            graphed = GraphedTrainStep(models, [run.optimizer for run in runs], data.task_type,
                                       capture=device.type == "cuda")
        try:
            stats = train_epoch(models, [run.loader for run in runs],
                                [run.optimizer for run in runs], device, data.task_type,
                                cfg.dataset.drop_node_p, t.progress, streams, graphed)
            if stats[0].graphs == 0:  # the same batches for every seed
                raise UserError(
                    f"No training step in epoch {epoch}: every batch of {data.name}'s training "
                    "split held a single graph or a single atom, which BatchNorm cannot train on; "
                    "use more training graphs or a larger trainer.batch_size.")
            diverged = {i: f"the training loss became {s.task_loss} (auxiliary {s.aux_loss})"
                        for i, s in enumerate(stats)
                        if not (math.isfinite(s.task_loss) and math.isfinite(s.aux_loss))}
            if not diverged:
                valid = evaluate(models, valid_loader, evaluator, device, t.progress)
                test = evaluate(models, test_loader, evaluator, device, t.progress)
        except (TrainingError, ValueError, RuntimeError) as err:
            # A diverged model fails anywhere (NaN in the metric, in an index from NaN logits, ...).
            broken = [i for i, m in enumerate(models)
                      if not all(p.isfinite().all() for p in m.parameters())]
            if isinstance(err, NonFinitePredictions):
                broken = sorted(set(broken) | set(err.seeds))
            if not broken:
                raise
            # describe_error: the first line only, the rest can be a tensor of NaN
            reason = (f"its weights are no longer finite ({describe_error(err)})"
                      if not isinstance(err, TrainingError) else str(err))
            diverged = dict.fromkeys(broken, reason)
        if diverged:
            for i, reason in diverged.items():
                run = runs[i]
                results[run.seed] = TrainingError(
                    f"seed {run.seed} diverged in epoch {epoch}: {reason}. Lower trainer.lr or "
                    "moe.loss_weight; the other seeds and finished results are kept.")
                log.error("%s", results[run.seed])
            # the others restart the epoch from their last checkpoint (or from scratch)
            runs = [start_seed(cfg, data, run.seed, device, run.checkpoint, run.stream is not None,
                               run.seed in saved or t.resume)
                    for i, run in enumerate(runs) if i not in diverged]
            epoch -= 1
            start = time.perf_counter()
            continue
        for run, s, v, te in zip(runs, stats, valid, test, strict=True):
            record = EpochRecord(
                epoch=epoch, train_loss=s.task_loss, aux_loss=s.aux_loss, valid=v, test=te,
                train_seconds=s.seconds, graphs_per_second=s.graphs / max(s.seconds, 1e-9),
                skipped_batches=s.skipped_batches, routing=routing_shares(s))
            run.records.append(record)
            if is_better(metric, record.valid, run.best.valid if run.best else None):
                run.best = record
                # before the checkpoint: a resumed run repeats an epoch whose best weights may be
                # missing
                run.checkpoint.save_best_model(run.model.state_dict())
            log.info("seed %d epoch %d/%d: loss %.4f aux %.4f valid %s %.4f test %.4f (%.1fs)",
                     run.seed, epoch, t.epochs, record.train_loss, record.aux_loss, metric,
                     record.valid, record.test, record.train_seconds)
            on_epoch(run.seed, record)
            run.checkpoint.save({"model": run.model.state_dict(),
                                 "optimizer": run.optimizer.state_dict(),
                                 "rng": rng_state(run.shuffle, run.stream),
                                 "records": [asdict(r) for r in run.records],
                                 "wall_seconds": run.elapsed + time.perf_counter() - start})
            saved.add(run.seed)
    for run in runs:
        assert run.best is not None
        results[run.seed] = SeedResult(
            seed=run.seed, best_epoch=run.best.epoch, valid=run.best.valid, test=run.best.test,
            wall_seconds=run.elapsed + time.perf_counter() - start,
            num_parameters=sum(p.numel() for p in run.model.parameters()),
            commit=code_commit(), epochs=run.records)
