"""What a run records and how its numbers are read: the leaf every layer imports, importing none.

Epoch and seed records, the direction and display scale of OGB's metrics, the atomic file writer,
the run's provenance (commit, hardware) and the dotted view of a config tree. Only the standard
library at import time: ``gmoe-report`` reads records without loading torch, and without running
git (the commit is looked up on first use).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUMMARY_FILE = "summary.json"

# OGB's error metrics; every other metric (rocauc, ap, acc, ...) is a score.
LOWER_IS_BETTER = frozenset({"rmse", "mae"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) in ``metric``'s direction."""
    if best is None:
        return True
    return value > best if higher_is_better(metric) else value < best


def display_scale(metric: str) -> float:
    """Scores (ROC-AUC, AP, ...) are shown × 100, as in the paper; errors in their own units."""
    return 100.0 if higher_is_better(metric) else 1.0


def mean_std_text(mean: float, std: float, count: int, digits: int = 2,
                  plus_minus: str = "±") -> str:
    """'80.63 ± 2.28' over ``count`` seeds; one seed has no spread to show, so its value alone
    (a std of 0.00 would read as perfectly repeatable)."""
    if count == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} {plus_minus} {std:.{digits}f}"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    aux_loss: float
    valid: float
    test: float
    train_seconds: float
    graphs_per_second: float
    skipped_batches: int  # one-atom or one-graph training batches (BatchNorm needs two values)
    # [L][n] share of (node, expert) assignments that went to each expert; empty without experts
    routing: list[list[float]] = field(default_factory=list)


@dataclass
class SeedResult:
    seed: int
    best_epoch: int
    valid: float
    test: float
    wall_seconds: float
    num_parameters: int
    commit: str | None  # of the code that finished the seed (a resumed seed may have begun earlier)
    epochs: list[EpochRecord]

    def to_dict(self) -> dict:
        return asdict(self)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def seed_record_problem(record: Any) -> str | None:
    """Why a stored seed result (``seed_S.json``, a summary's seed, a digest's seed rebuilt) cannot
    be reported, or None: it needs an integer seed, finite valid and test figures, and epoch records
    with finite figures, a best epoch among them whose valid and test figures are the seed's (to 4
    decimals, as a digest's curves keep them)."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    missing = [k for k in ("seed", "valid", "test", "best_epoch", "epochs") if k not in record]
    if missing:
        return f"it lacks {', '.join(missing)}"
    seed = record["seed"]
    if not _is_integer(seed):
        return f"its seed {seed!r} is not an integer"
    for split in ("valid", "test"):
        if not _is_number(record[split]):
            return f"its {split} figure {record[split]!r} is not a finite number"
    best, epochs = record["best_epoch"], record["epochs"]
    if not isinstance(epochs, list) or not epochs or not all(
            isinstance(e, dict) and _is_number(e.get("valid")) and _is_number(e.get("test"))
            for e in epochs):
        return "its epoch records are missing or hold non-numbers"
    if not _is_integer(best) or not 1 <= best <= len(epochs):
        return f"its best epoch {best!r} is not one of its {len(epochs)} epochs"
    routing = epochs[best - 1].get("routing", [])
    if not isinstance(routing, list) or not all(
            isinstance(layer, list) and all(map(_is_number, layer)) for layer in routing):
        return "its routing shares are not lists of numbers"
    for split in ("valid", "test"):
        if abs(record[split] - epochs[best - 1][split]) > 1e-4:
            return (f"its {split} figure {record[split]} is not its best epoch's "
                    f"({epochs[best - 1][split]})")
    return None


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``: a crash
    never leaves a truncated file. The parent folder must exist."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    # serialised first: an unserialisable value fails before the file is touched
    text = json.dumps(payload, indent=1, allow_nan=True).encode()
    write_atomic(path, lambda f: f.write(text))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, e.g. {'moe': {'top_k': 4}} -> {'moe.top_k': 4}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.cache
def code_commit() -> str | None:
    """Commit of the gmoe-bench checkout (with '-dirty' for uncommitted changes to the package),
    or None outside a checkout (an installed wheel). Cached: a job's first call fixes it, so a long
    sweep records the code it started with even if the checkout moves on."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "gmoe_bench"], check=True, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count."""
    if device.type == "cuda":
        import torch  # only training code has a CUDA device to name

        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def provenance(device: torch.device, command: str) -> dict[str, Any]:
    """What produced a result: the command, the code's commit, the machine and the versions."""
    import torch

    return {
        "command": command,
        "commit": code_commit(),
        "hardware": hardware(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
