"""summary.json's aggregate over seeds, and the one line a run ends with."""

from __future__ import annotations

from typing import Any

import numpy as np

from gmoe_bench.records import mean_std_text


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
    test, valid = (mean_std_text(agg[f"{k}_mean"], agg[f"{k}_std"], n, 4) for k in ("test", "valid"))
    return f"{dataset} {model}: test {metric} {test} (valid {valid}), {n} seed{'s' * (n != 1)}"
