"""Unique, valid folder and file names: Hydra resolvers for output folders, and names to set aside.

``gmoe_bench/configs/hydra/default.yaml`` uses them: ``${gmoe.unique_dir:outputs/DATE/TIME}`` claims the
folder with an exclusive ``mkdir`` (a second run in the same second gets ``TIME_2``), and
``${gmoe.dir_name:${hydra.job.override_dirname}}`` turns a sweep job's overrides into one path
component (no ``/``, so ``dataset.root=../data`` cannot move the folder; at most 200 bytes).
Both are cached by OmegaConf, so the jobs of a sweep, pickled to other processes, agree on them.
``${gmoe.execution_keys:}`` lists the execution-only keys (paths, threads, logging), which never
enter a job folder's name.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from omegaconf import OmegaConf

from gmoe_bench.config import execution_override_keys

MAX_NAME_BYTES = 200  # below the usual 255-byte limit, leaving room for Hydra's job number


def unique_dir(base: str) -> str:
    """``base``, or ``base_2``, ``base_3``, ...: the first that this call could create."""
    path = Path(base)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}_{n}")


def aside_name(path: Path, why: str) -> Path:
    """A free name beside ``path`` to move it to: ``<name>.<why>-<time>``, numbered if taken."""
    base = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


def dir_name(name: str) -> str:
    """``name`` as one folder name: separators replaced, shortened with a hash when too long."""
    safe = name.replace("/", "_").replace("\\", "_")
    if len(safe.encode()) <= MAX_NAME_BYTES:
        return safe
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    head = safe.encode()[:MAX_NAME_BYTES - 12].decode(errors="ignore")
    return f"{head}_{digest}"


def register() -> None:
    OmegaConf.register_new_resolver("gmoe.unique_dir", unique_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("gmoe.dir_name", dir_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("gmoe.execution_keys", execution_override_keys, replace=True)
