"""gmoe-train: multi-seed training and evaluation, configured by Hydra (see configs/train.yaml)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gmoe_bench.config import describe, validate
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine.run import resolve_device, run_seed
from gmoe_bench.errors import UserError
from gmoe_bench.tracking.summary import (
    SUMMARY_FILE,
    aggregate,
    provenance,
    summary_line,
    write_json_atomic,
)
from gmoe_bench.tracking.wandb_logger import WandbLogger

log = logging.getLogger("gmoe_bench")

# The configs live beside the package in the checkout (installs are editable: `make install`).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def train(cfg: DictConfig, output_dir: Path) -> float:
    """Run every seed of ``cfg``; write summary.json; return the mean validation metric."""
    typed = validate(cfg)
    if typed.trainer.cpu_threads:
        torch.set_num_threads(typed.trainer.cpu_threads)
    device = resolve_device(typed.trainer.device)
    data = load_dataset(typed.dataset)
    model_name = describe(typed)
    log.info("%s %s on %s: %d train / %d valid / %d test graphs, seeds %s", data.name,
             model_name, device, len(data.split["train"]), len(data.split["valid"]),
             len(data.split["test"]), typed.seeds)

    summary: dict[str, Any] = {
        "dataset": data.name,
        "model": model_name,
        "metric": data.eval_metric,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(device),
        "seeds": [],
        "complete": False,
    }
    path = output_dir / SUMMARY_FILE
    wandb = WandbLogger(typed.logger.wandb, summary["config"], data.name, model_name,
                        data.eval_metric, typed.moe.num_experts - typed.moe.num_hop2, output_dir)
    start = time.perf_counter()
    for seed in typed.seeds:
        wandb.start_seed(seed)
        result = run_seed(typed, data, seed, device, on_epoch=wandb.log_epoch)
        wandb.end_seed(result)
        summary["seeds"].append(result.to_dict())
        summary["aggregate"] = aggregate(summary["seeds"])
        summary["wall_seconds"] = time.perf_counter() - start
        write_json_atomic(path, summary)  # after every seed: finished seeds are never lost
        log.info("seed %d: best epoch %d, valid %.4f, test %.4f", seed, result.best_epoch,
                 result.valid, result.test)
    summary["complete"] = True
    write_json_atomic(path, summary)
    wandb.log_aggregate(summary["seeds"], summary["aggregate"])
    line = summary_line(data.name, model_name, data.eval_metric, summary["aggregate"])
    log.info("%s", line)
    print(line, flush=True)
    return summary["aggregate"]["valid_mean"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        return train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        print(f"gmoe-train: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main() -> None:
    """Console entry point (``gmoe-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
