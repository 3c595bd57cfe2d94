"""Hydra callback: every job of a grid sweep composed and checked before the first one runs."""

from __future__ import annotations

import sys
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gmoe_bench.config import validate
from gmoe_bench.errors import ConfigError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class CheckSweepJobs(Callback):
    """Hydra callback (configs/hydra/default.yaml): before a grid sweep's first job runs, every
    job's config is composed as its launcher will compose it and checked (:func:`validate`), so a
    bad value in the last job fails the sweep at once, not after the others trained. Sweepers that
    choose the next job from the last (Optuna) are not gridded in advance: their jobs check
    themselves."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return
        # unresolved, as the sweeper reads them (a value may name ${hydra:job.num})
        grid = config.hydra.sweeper.params
        params = OmegaConf.to_container(grid, resolve=False) if grid else {}
        arguments = [f"{key}={value}" for key, value in params.items()] + OmegaConf.to_container(
            config.hydra.overrides.task, resolve=False)
        loader = GlobalHydra.instance().config_loader()
        hydra_config = HydraConfig.instance()
        earlier = hydra_config.cfg
        try:
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
            jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
            for num, job in enumerate(jobs):
                composed = loader.load_sweep_config(master_config=config, sweep_overrides=list(job))
                with open_dict(composed):  # as the launcher sets them: ${hydra:job.num} resolves
                    composed.hydra.job.id = composed.hydra.job.num = num
                hydra_config.set_config(composed)
                task = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
                try:
                    validate(task)
                except ConfigError as err:
                    # Hydra turns a callback's exceptions into warnings: exit here
                    print(f"gmoe-train: error: in the sweep job '{' '.join(job)}': {err} No job "
                          "was run.", file=sys.stderr, flush=True)
                    raise SystemExit(2) from None
        except (HydraException, OmegaConfBaseException):
            return  # a job that does not compose: Hydra's own check before the launch says which
        finally:
            hydra_config.cfg = earlier
