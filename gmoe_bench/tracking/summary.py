"""summary.json: the run's config, provenance, per-seed results and mean ± std over seeds."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUMMARY_FILE = "summary.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename: never a truncated file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    """Commit of the gmoe-bench checkout (with '-dirty' for uncommitted changes), if any."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "gmoe_bench", "configs"], check=True, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


# Taken once, when this code is imported: the commit of the code that runs, even if the checkout
# moves on while a long sweep is under way.
CODE_COMMIT = git_commit()


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def provenance(device: torch.device, command: str) -> dict[str, Any]:
    return {
        "command": command,
        "commit": CODE_COMMIT,
        "hardware": hardware(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def aggregate(seed_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (population, ddof=0) std over seeds of the best-validation metrics."""
    out: dict[str, Any] = {"num_seeds": len(seed_results)}
    for key in ("valid", "test"):
        values = np.array([r[key] for r in seed_results], dtype=float)
        out[f"{key}_mean"] = float(values.mean()) if len(values) else None
        out[f"{key}_std"] = float(values.std()) if len(values) else None
    return out


def summary_line(dataset: str, model: str, metric: str, agg: dict[str, Any]) -> str:
    """e.g. 'ogbg-molbbbp gin: test rocauc 0.6823 ± 0.0151 (valid 0.9012 ± 0.0080), 3 seeds'."""
    n = agg["num_seeds"]
    return (f"{dataset} {model}: test {metric} {agg['test_mean']:.4f} ± {agg['test_std']:.4f} "
            f"(valid {agg['valid_mean']:.4f} ± {agg['valid_std']:.4f}), {n} seed{'s' * (n != 1)}")
