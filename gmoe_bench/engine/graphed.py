"""Training steps replayed from CUDA graphs: one capture per padded batch shape, then one launch per
step instead of thousands.

A batch-32 molecular step is bound by the host on a GPU: its kernels are tiny and each costs a
launch (results/bench: an H200 spends 3 of a plain GCN step's 22 ms in kernels, 7 of a GMoE step's
134). A CUDA graph records every kernel of a step once and replays them with a single launch. It
needs fixed shapes and no host syncs, hence padded batches (:mod:`gmoe_bench.data.padding`), masked
statistics in the model and dense dispatch for GMoE layers. Each seed of a group steps on its own
CUDA stream inside one graph, so the seeds' small kernels run side by side on the device.

Every seed keeps what it has alone: its weights, optimizer state, BatchNorm statistics and batch;
its dropout and gate noise come from torch's CUDA generator (offsets fixed at capture). The first
``warmup`` steps run eagerly (CUDA graphs need lazily created state, e.g. the optimizer's, to
exist before capture); with ``capture=False`` every step does, which is how the CPU tests check
this step against the unpadded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gmoe_bench.data.padding import PaddedBatch
from gmoe_bench.engine.loss import task_loss
from gmoe_bench.errors import ConfigError, describe_error
from gmoe_bench.model import MolGNN
from gmoe_bench.model.gate import ExpertChoiceGate
from gmoe_bench.model.moe import GMoELayer


class StepOutput(NamedTuple):
    """A step's outputs. From a replay they live in the graphs' shared memory pool, so the next
    step of any shape may overwrite them: read or copy them before."""

    losses: Tensor  # [S] each seed's task loss
    aux_losses: Tensor  # [S] each seed's weighted balance loss
    expert_counts: Tensor | None  # [S, L, n] real atoms routed to each expert


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: list[PaddedBatch]  # the graph reads these tensors; each step copies its batch in
    output: StepOutput


def check_graphable(model: MolGNN) -> None:
    """Raises ValueError, in one sentence with its fix, when ``model`` cannot run on padded
    batches (sparse dispatch and the expert-choice gate have shapes that follow the data)."""
    for layer in model.layers:
        if not isinstance(layer, GMoELayer):
            continue
        if layer.dispatch == "sparse":
            raise ValueError("trainer.cuda_graphs=true needs moe.dispatch=dense: sparse "
                             "dispatch's shapes follow the routing, so no graph can hold them")
        if isinstance(layer.gate, ExpertChoiceGate):
            raise ValueError("trainer.cuda_graphs=true cannot run moe.gate=expert_choice (its "
                             "capacity follows each batch's atom count): use top_k or dense")


def _seed_step(model: MolGNN, optimizer: torch.optim.Optimizer, b: PaddedBatch,
               task_type: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """One seed's step on its padded batch. Gradients are zeroed in place, not freed: a captured
    graph keeps writing the same tensors."""
    hop2 = (b.hop2_index, b.hop2_attr) if model.needs_hop2 else None
    out = model(b.x, b.edge_index, b.edge_attr, b.batch, b.num_graphs, b.node_mask, hop2)
    loss = task_loss(out.logits, b.y, task_type)
    optimizer.zero_grad(set_to_none=False)
    (loss + out.aux_loss).backward()
    optimizer.step()
    return loss.detach(), out.aux_loss.detach(), out.expert_counts


def _stack(per_seed: list[tuple[Tensor, Tensor, Tensor | None]]) -> StepOutput:
    losses, auxes, counts = zip(*per_seed, strict=True)
    return StepOutput(torch.stack(losses), torch.stack(auxes),
                      None if counts[0] is None else torch.stack(counts))


class GraphedTrainStep:
    """``step(batches)``: one training step of each seed on its own padded batch (all of one
    shape, :func:`~gmoe_bench.data.padding.pad_together`). The optimizers must be built with
    ``capturable=True`` when ``capture``."""

    def __init__(self, models: Sequence[MolGNN], optimizers: Sequence[torch.optim.Optimizer],
                 task_type: str, capture: bool, warmup: int = 3) -> None:
        for model in models:
            check_graphable(model)
        self.models, self.optimizers = list(models), list(optimizers)
        self.task_type = task_type
        self.capture, self.warmup = capture, warmup
        self.steps = 0
        self._graphs: dict[tuple[int, ...], _Captured] = {}
        self._pool: tuple[int, int] | None = None  # one memory pool for every shape's graph
        self._streams = ([torch.cuda.Stream() for _ in models] if capture else [])

    @property
    def num_graphs(self) -> int:
        """Shapes captured so far."""
        return len(self._graphs)

    def __call__(self, batches: Sequence[PaddedBatch]) -> StepOutput:
        """The step; its outputs are valid until the next call (:class:`StepOutput`)."""
        if len({b.shape for b in batches}) != 1:
            raise ValueError("the seeds' batches must be padded to one shape (pad_together)")
        self.steps += 1
        if not self.capture:
            return self._eager(batches)
        if self.steps <= self.warmup:  # on a side stream, as CUDA graphs require
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(batches)
            torch.cuda.current_stream().wait_stream(side)
            return out
        captured = self._graphs.get(batches[0].shape)
        if captured is None:
            try:
                captured = self._graphs[batches[0].shape] = self._capture(batches)
            except RuntimeError as err:  # an operation a CUDA graph cannot hold
                raise ConfigError(
                    f"a training step could not be captured as a CUDA graph ({describe_error(err)}); "
                    "train without them: trainer.cuda_graphs=false.") from err
        for static, b in zip(captured.inputs, batches, strict=True):
            for target, source in zip(static[:-1], b[:-1], strict=True):  # tensors, not the count
                target.copy_(source, non_blocking=True)
        captured.graph.replay()
        return captured.output

    def _eager(self, batches: Sequence[PaddedBatch]) -> StepOutput:
        return _stack([_seed_step(m, o, b, self.task_type)
                       for m, o, b in zip(self.models, self.optimizers, batches, strict=True)])

    def _capture(self, batches: Sequence[PaddedBatch]) -> _Captured:
        """Records one step of every seed, each on its own stream, joined at the end. Recording
        runs nothing: the caller's replay does the step."""
        # Parameters the warm-up gave no gradient (an unused noise weight, say) get none here
        # either, so Adam skips them as in an eager step: no state is created inside a graph.
        inputs = [PaddedBatch(*(t.clone() for t in b)) for b in batches]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            main = torch.cuda.current_stream()
            per_seed = []
            for stream, model, optimizer, b in zip(self._streams, self.models, self.optimizers,
                                                   inputs, strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    per_seed.append(_seed_step(model, optimizer, b, self.task_type))
            for stream in self._streams:
                main.wait_stream(stream)
            output = _stack(per_seed)
        self._pool = graph.pool()
        return _Captured(graph, inputs, output)
