"""Per-seed checkpoints, so a killed or preempted job resumes where it stopped.

Checkpoints live in ``trainer.checkpoint_dir/<dataset>/<config id>/``, keyed by what the config
computes (not by the timestamped output folder), so re-running the same command finds them:

- ``seed_<s>.pt``: after every epoch, model, optimizer, every RNG state, the curves so far;
- ``seed_<s>.best.pt``: the model weights of the best validation epoch so far (kept after the
  seed finishes, for analyses such as ``gmoe-routing``);
- ``seed_<s>.json``: the seed's final result, once it has finished (the seed is then skipped).

Every file is written to a temporary name and renamed, so a kill never leaves a torn file, and
everything in them is plain tensors and Python values, readable with ``torch.load``'s safe default
``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmoe_bench.config import config_identity
from gmoe_bench.tracking.summary import write_json_atomic

log = logging.getLogger(__name__)


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    """Every random state training depends on, as safe-to-load values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], shuffle: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_directory(config: dict[str, Any], dataset: str) -> Path:
    """Where the seeds of ``config`` (the resolved config tree) on ``dataset`` keep their files."""
    root = Path(config["trainer"]["checkpoint_dir"]).expanduser().resolve()
    return root / dataset / config_identity(config)


class SeedCheckpoint:
    """The checkpoint and final-result files of one seed of one configuration."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.state_path = directory / f"seed_{seed}.pt"
        self.result_path = directory / f"seed_{seed}.json"
        self.best_model_path = directory / f"seed_{seed}.best.pt"

    def finished_result(self) -> dict[str, Any] | None:
        if not self.result_path.is_file():
            return None
        return json.loads(self.result_path.read_text())

    def load(self) -> dict[str, Any] | None:
        """The last epoch's state, or None (no checkpoint, or an unreadable one: start over)."""
        if not self.state_path.is_file():
            return None
        try:
            return torch.load(self.state_path, map_location="cpu")
        except Exception as err:  # a checkpoint we cannot read only costs the epochs it held
            log.warning("Ignoring unreadable checkpoint %s (%s); this seed starts over.",
                        self.state_path, err)
            return None

    def save(self, state: dict[str, Any]) -> None:
        _save_atomic(state, self.state_path)

    def save_best_model(self, weights: dict[str, torch.Tensor]) -> None:
        _save_atomic(weights, self.best_model_path)

    def finish(self, result: dict[str, Any]) -> None:
        """Record the seed's result and drop its (now useless) training state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.result_path, result)
        self.state_path.unlink(missing_ok=True)


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
