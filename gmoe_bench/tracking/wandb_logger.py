"""Weights & Biases: one run per (config, seed), grouped by config, plus one summary run per group.

W&B is a report, not a dependency of the results, and it never blocks: online mode without an API
key, or with a server that does not answer within ``logger.wandb.timeout`` seconds, is warned about
once and the job logs offline instead (``wandb sync`` uploads it later); W&B never prompts, and a
run's end waits at most as long for its upload.
Any other failure (a full disk, a broken install) is warned about once, W&B is switched off for the
rest of the job, and training and summary.json go on untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gmoe_bench.config import TrainConfig, WandbConfig, as_dict, config_identity
from gmoe_bench.errors import describe_error
from gmoe_bench.records import EpochRecord, SeedResult

log = logging.getLogger(__name__)

def epoch_metrics(record: EpochRecord, metric: str) -> dict[str, float]:
    out = {"epoch": record.epoch, "train/loss": record.train_loss, "train/aux_loss": record.aux_loss,
           f"valid/{metric}": record.valid, f"test/{metric}": record.test,
           "time/epoch_s": record.train_seconds, "time/graphs_per_s": record.graphs_per_second}
    for layer, shares in enumerate(record.routing):
        for expert, share in enumerate(shares):
            out[f"routing/layer{layer}/expert{expert}"] = share
    return out


class WandbLogger:
    """Logs a job's seeds to W&B; every method is safe to call after a failure (it does nothing)."""

    def __init__(self, cfg: WandbConfig, run_config: TrainConfig, dataset: str, model: str,
                 metric: str, num_hop1: int, output_dir: Path) -> None:
        self.cfg = cfg
        self.run_config = as_dict(run_config)
        self.metric = metric
        self.num_hop1 = num_hop1
        self.output_dir = output_dir
        self.group = f"{dataset} {model} [{config_identity(run_config)}]"
        self.base_name = cfg.name or f"{dataset} {model}"
        self.enabled = cfg.mode != "disabled"
        self.mode = cfg.mode  # online falls back to offline for the rest of the job
        self._run: Any = None

    def _go_offline(self, reason: str) -> None:
        self.mode = "offline"
        log.warning("W&B cannot log online: %s. This job logs offline instead; upload it later with "
                    "`wandb sync %s/wandb/offline-run-*`.", reason, self.output_dir)

    def _guard(self, action: str, fn: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            fn()
        except Exception as err:  # W&B must never stop training
            self.enabled = False
            self._run = None
            log.warning("W&B failed while %s (%s: %s); W&B is off for the rest of this job, "
                        "results still go to summary.json.", action, type(err).__name__, err)

    def _init(self, name: str, job_type: str, config: dict[str, Any]) -> None:
        import wandb

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "online":
            # silent: wandb's "logged in as" message asks the server who we are, a 5 s wait
            # (twice per run) without network; the run's address is logged below instead.
            wandb.setup(settings=wandb.Settings(silent=True))
            # prompt=False: without a key (env, settings or .netrc) wandb would wait on stdin.
            if not wandb.login(prompt=False, verify=False):
                self._go_offline("no API key is set (WANDB_API_KEY, or run `wandb login` once)")

        def start() -> Any:
            return wandb.init(
                mode=self.mode, project=self.cfg.project, entity=self.cfg.entity,
                group=self.group, name=name, job_type=job_type, tags=list(self.cfg.tags),
                config=config, dir=str(self.output_dir), reinit="finish_previous",
                settings=wandb.Settings(init_timeout=self.cfg.timeout,
                                        finish_timeout=self.cfg.timeout, console="off"),
            )
        try:
            self._run = start()
        except Exception as err:
            if self.mode != "online":
                raise
            self._go_offline(f"the server did not answer within logger.wandb.timeout="
                             f"{self.cfg.timeout:g} s ({describe_error(err)})")
            self._run = start()
        if self.mode == "online":
            log.info("W&B run %s: %s", name, self._run.url)

    def start_seed(self, seed: int) -> None:
        self._guard("starting a run", lambda: self._init(
            f"{self.base_name} seed={seed}", "train", {**self.run_config, "seed": seed}))

    def log_epoch(self, record: EpochRecord) -> None:
        def log_it() -> None:
            metrics = epoch_metrics(record, self.metric)
            if record.routing:
                metrics["routing/hop2_share"] = sum(sum(layer[self.num_hop1:])
                                                    for layer in record.routing) / len(record.routing)
            self._run.log(metrics, step=record.epoch)
        self._guard("logging an epoch", log_it)

    def end_seed(self, result: SeedResult | None) -> None:
        """Close the seed's run; ``None`` marks a seed that failed."""
        def finish() -> None:
            if result is None:
                self._run.finish(exit_code=1)
                self._run = None
                return
            self._run.summary.update({"best/epoch": result.best_epoch,
                                      f"best/valid_{self.metric}": result.valid,
                                      f"best/test_{self.metric}": result.test,
                                      "wall_seconds": result.wall_seconds,
                                      "num_parameters": result.num_parameters})
            self._run.finish()
            self._run = None
        self._guard("finishing a run", finish)

    def log_aggregate(self, seeds: list[dict[str, Any]], aggregate: dict[str, Any]) -> None:
        """A summary run of the group: mean ± std over seeds and a table of the seeds."""
        def summarize() -> None:
            import wandb

            self._init(f"{self.base_name} mean over {len(seeds)} seeds", "summary", self.run_config)
            table = wandb.Table(columns=["seed", "best_epoch", f"valid_{self.metric}",
                                         f"test_{self.metric}"],
                                data=[[s["seed"], s["best_epoch"], s["valid"], s["test"]]
                                      for s in seeds])
            self._run.log({"seeds": table})
            self._run.summary.update({f"{k}": v for k, v in aggregate.items()})
            self._run.finish()
            self._run = None
        self._guard("writing the summary run", summarize)
