"""Per-seed checkpoints, so a killed or preempted job resumes where it stopped.

Checkpoints live in ``trainer.checkpoint_dir/<dataset>/<config id>/data-<fingerprint>/``, keyed by
what the config computes and by the content of the data it trains on (not by the timestamped output
folder, nor by where the data lies), so re-running the same command finds them:

- ``seed_<s>.pt``: after every epoch, model, optimizer, every RNG state, the curves so far;
- ``seed_<s>.best.pt``: the model weights of the best validation epoch so far (kept after the
  seed finishes, for analyses such as ``gmoe-routing``);
- ``seed_<s>.json``: the seed's final result, once it has finished (the seed is then skipped).

Every file is written to a temporary name and renamed, so a kill never leaves a torn file, and
everything in them is plain tensors and Python values, readable with ``torch.load``'s safe default
``weights_only=True``. A file that cannot be used (truncated, foreign, of another architecture) is
renamed to ``<name>.unusable-<time>`` with a warning, never deleted, and the seed starts over.
With ``trainer.resume=false`` a seed's earlier files are renamed to ``<name>.replaced-<time>``.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmoe_bench.config import TrainConfig, config_identity
from gmoe_bench.errors import ConfigError, TrainingError
from gmoe_bench.output_dirs import aside_name
from gmoe_bench.records import seed_record_problem, write_atomic, write_json_atomic

log = logging.getLogger(__name__)


def rng_state(shuffle: torch.Generator, stream: torch.Generator | None) -> dict[str, Any]:
    """Every random state training depends on, as safe-to-load values. A seed's own ``stream``
    (trained in a group) is stored where a solo run stores torch's global state on its device,
    so a checkpoint resumes alone or in a group alike."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if stream is not None:
        if stream.device.type == "cuda":
            # a group replayed from CUDA graphs draws from the global CUDA state, not the
            # streams: engine/run.py restores it when the group starts (other seeds' set-up
            # reseeds it). A solo run's is "cuda" itself.
            state["cuda_global"] = list(state["cuda"])
            state["cuda"][stream.device.index or 0] = stream.get_state()
        else:
            state["torch"] = stream.get_state()
    return state


def restore_rng_state(state: dict[str, Any], shuffle: torch.Generator,
                      stream: torch.Generator | None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    shuffle.set_state(state["shuffle"])
    if stream is None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    elif stream.device.type == "cuda":
        # a checkpoint written without this GPU (e.g. on a CPU machine) leaves the fresh stream,
        # as a solo run keeps torch's fresh CUDA state
        saved = state.get("cuda", [])
        if (stream.device.index or 0) < len(saved):
            stream.set_state(saved[stream.device.index or 0])
    else:
        stream.set_state(state["torch"])


def checkpoint_directory(config: TrainConfig, dataset: str, fingerprint: str | None) -> Path:
    """Where the seeds of ``config`` on ``dataset`` keep their files.

    ``fingerprint`` is the data's content hash (MolDataset.fingerprint); None gives the folder of
    runs made before it was part of the key (their summary.json has no 'data' entry)."""
    root = Path(config.trainer.checkpoint_dir).expanduser().resolve()
    folder = root / dataset / config_identity(config)
    return folder if fingerprint is None else folder / f"data-{fingerprint}"


def check_writable(directory: Path) -> None:
    """A ConfigError, before any training, when checkpoints cannot be written to ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(f"Cannot write checkpoints to {directory} ({err.strerror or err}). Set "
                          "trainer.checkpoint_dir (or GMOE_CHECKPOINT_DIR) to a writable folder."
                          ) from err


def set_aside(path: Path, reason: str) -> None:
    """Rename an unusable file out of the way (never delete it) and say so."""
    aside = aside_name(path, "unusable")
    path.rename(aside)
    log.warning("%s cannot be used (%s); moved to %s, the seed starts over.", path, reason, aside)


STATE_KEYS = ("model", "optimizer", "rng", "records", "wall_seconds")


class SeedCheckpoint:
    """The checkpoint and final-result files of one seed of one configuration."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        self.state_path = directory / f"seed_{seed}.pt"
        self.result_path = directory / f"seed_{seed}.json"
        self.best_model_path = directory / f"seed_{seed}.best.pt"

    def finished_result(self) -> dict[str, Any] | None:
        """The seed's recorded result, or None (none yet, or an unusable one, set aside)."""
        if not self.result_path.is_file():
            return None
        try:
            result = json.loads(self.result_path.read_text())
            if problem := seed_record_problem(result):
                raise ValueError(f"not a usable result: {problem}")
            if result["seed"] != self.seed:
                raise ValueError(f"it is seed {result['seed']}'s result")
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            set_aside(self.result_path, str(err))
            return None
        return result

    def set_aside_previous(self) -> None:
        """Rename the seed's earlier files out of the way (a fresh start, ``trainer.resume=false``):
        kept, never deleted, and never paired with the new run's weights or result."""
        for path in (self.result_path, self.best_model_path, self.state_path):
            if path.is_file():
                aside = aside_name(path, "replaced")
                path.rename(aside)
                log.info("seed %d trains from scratch (trainer.resume=false); its earlier %s is "
                         "kept as %s", self.seed, path.name, aside)

    def load(self, expected: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """The last epoch's state, or None (no checkpoint, or an unusable one: start over).

        ``expected`` is the state dict of the model to restore: a checkpoint whose weights do not
        have its names and shapes (another architecture) is set aside, and so is one whose best
        epoch's weights (``seed_S.best.pt``, rewritten only when validation improves) cannot be
        loaded: the finished seed would lack them."""
        if not self.state_path.is_file():
            return None
        shapes = _shapes(expected)
        try:
            state = torch.load(self.state_path, map_location="cpu")
            missing = [k for k in STATE_KEYS if k not in state]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            if _shapes(state["model"]) != shapes:
                raise ValueError("its weights are those of another architecture")
        except Exception as err:  # a checkpoint we cannot use only costs the epochs it held
            set_aside(self.state_path, str(err))
            return None
        if state["records"]:
            try:
                best = torch.load(self.best_model_path, map_location="cpu")
                if _shapes(best) != shapes:
                    raise ValueError("its weights are those of another architecture")
            except Exception as err:
                if self.best_model_path.is_file():
                    set_aside(self.best_model_path, str(err))
                set_aside(self.state_path, f"its best epoch's weights cannot be loaded ({err})")
                return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        _save_atomic(state, self.state_path)

    def save_best_model(self, weights: dict[str, torch.Tensor]) -> None:
        _save_atomic(weights, self.best_model_path)

    def finish(self, result: dict[str, Any]) -> None:
        """Record the seed's result and drop its (now useless) training state."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.result_path, result)
        except OSError as err:
            raise _write_error(self.result_path, err) from err
        self.state_path.unlink(missing_ok=True)


def _shapes(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def _write_error(path: Path, err: OSError) -> TrainingError:
    return TrainingError(f"Could not write {path} ({err.strerror or err}). Free space or set "
                         "trainer.checkpoint_dir to a writable folder; re-running the same command "
                         "resumes from the last checkpoint.")


def _save_atomic(obj: Any, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(obj, f))
    except OSError as err:
        raise _write_error(path, err) from err
