"""Hydra callback: a sweep's command line and every job of a grid checked before the first job runs."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gmoe_bench.config import (
    TrainConfig,
    config_groups,
    config_identity,
    ignored_expert_keys,
    validate,
)
from gmoe_bench.data.ogb import check_source
from gmoe_bench.errors import ConfigError, DataError
from gmoe_bench.records import flatten

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def refuse(message: str) -> None:
    """Print the one-sentence error and exit 2: Hydra turns a callback's exceptions into warnings."""
    print(f"gmoe-train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _given(config: DictConfig, key: str) -> str | None:
    """The value of ``key`` given on the command line among the ``hydra.*`` overrides, or None."""
    for override in config.hydra.overrides.hydra:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key:
            return value
    return None


def group_keys(group: str, option: str) -> set[str]:
    """The dotted keys the config ``group/option`` sets, in the package it is placed at."""
    loaded = GlobalHydra.instance().config_loader().repository.load_config(f"{group}/{option}")
    if loaded is None or loaded.config is None:
        return set()
    package = (loaded.header or {}).get("package") or group
    keys = flatten(OmegaConf.to_container(loaded.config, resolve=False))
    return {key if package == "_global_" else f"{package}.{key}" for key in keys}


def search_overrides(config: DictConfig, config_name: str | None) -> None:
    """Refuse a config group chosen on the command line whose every key the sweeper's search
    varies (``experts=n8_hop2`` under ``hparams_search=gmoe_optuna``): each trial would replace
    all it sets, so the choice would silently have no effect. A choice the search only partly
    overrides is named in a warning. A choice the search's own config makes anyway
    (``moe=gmoe``) is fine."""
    params = config.hydra.sweeper.get("params") or {}
    searched = {key for key in params if "." in key}
    if not searched:
        return
    loader = GlobalHydra.instance().config_loader()
    task = list(config.hydra.overrides.task)
    groups = set(config_groups())
    for override in task:
        group, _, option = override.lstrip("+").partition("=")
        if group not in groups or "," in option or not option or option == "null":
            continue
        keys = group_keys(group, option)
        overlap = sorted(keys & searched)
        if not overlap:
            continue
        rest = [o for o in task if o != override]
        without = loader.load_configuration(config_name=config_name, overrides=rest,
                                            run_mode=config.hydra.mode)
        if without.hydra.runtime.choices.get(group) == option:
            continue  # the search's config chooses it too
        fixed = " ".join(f"{key}={OmegaConf.select(config, key)}" for key in overlap)
        if keys <= searched:
            refuse(f"{group}={option} sets {', '.join(overlap)}, which the search "
                   "(hydra.sweeper.params) varies in every trial, so it would have no effect; drop "
                   f"it, or keep those values fixed by giving them as keys ({fixed}), which the "
                   "search then leaves out.")
        log.warning("%s=%s sets %s, which the search varies in every trial; give %s to keep "
                    "%s fixed.", group, option, ", ".join(overlap), fixed,
                    "it" if len(overlap) == 1 else "them")


def _job_text(job: tuple[str, ...], common: set[str]) -> str:
    """A job named by its own sweep values (the overrides not shared by every job)."""
    return " ".join(o for o in job if o not in common) or " ".join(job) or "(no overrides)"


def same_computation(jobs: list[tuple[tuple[str, ...], TrainConfig]], common: set[str]) -> None:
    """Refuse two jobs that train the same configuration on the same data and seeds: they would
    share one checkpoint folder (at once, under a parallel launcher) and report one row twice."""
    earlier_jobs: dict[tuple[str, ...], list[int]] = {}
    for num, (job, typed) in enumerate(jobs):
        where = (typed.dataset.name, str(Path(typed.dataset.root).expanduser().resolve()),
                 str(Path(typed.trainer.checkpoint_dir).expanduser().resolve()),
                 config_identity(typed))
        for first in earlier_jobs.get(where, []):
            earlier = jobs[first][1]
            shared = sorted(set(earlier.seeds) & set(typed.seeds))
            if not shared:  # seeds spread over jobs: each trains its own
                continue
            ignored = ignored_expert_keys(typed) or ignored_expert_keys(earlier)
            why = (f" ({', '.join(ignored)} has no effect on the plain backbone, "
                   "moe.num_experts=0: add moe=gmoe to sweep GMoE)" if ignored else "")
            refuse(f"the sweep jobs #{first} '{_job_text(jobs[first][0], common)}' and #{num} "
                   f"'{_job_text(job, common)}' train the same configuration on seeds "
                   f"{shared}{why}; drop the repeated value, or give the jobs different seeds. No "
                   "job was run.")
        earlier_jobs.setdefault(where, []).append(num)


class CheckSweepJobs(Callback):
    """Hydra callback (configs/hydra/default.yaml). Before a sweep's first job runs: the output
    folder key of the other mode is refused (``hydra.run.dir`` in a sweep, ``hydra.sweep.dir`` in a
    single run: Hydra would ignore it), and so is a config group choice a search would override
    in full. For a grid (Hydra's basic sweeper) every job's config is then composed as its
    launcher will compose it and checked (:func:`validate`, its dataset's presence in the root or
    mirror, no two jobs computing the same run), so a bad value in the last job fails the sweep at
    once, not after the others trained. Sweepers that choose the next job from the last (Optuna)
    are not gridded in advance: their jobs check themselves."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (folder := _given(config, "hydra.sweep.dir")) is not None:
            refuse(f"hydra.sweep.dir={folder} is only read by sweeps, and this is a single run; "
                   f"give hydra.run.dir={folder} instead, or add -m to sweep.")

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None,
                          **kwargs: Any) -> None:
        if (str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher")
                and shutil.which("srun") is None):
            refuse("hydra/launcher=slurm submits to SLURM, but this machine has no srun; start the "
                   "sweep on the cluster's login node, or try it here with "
                   "hydra/launcher=slurm_local.")
        if (folder := _given(config, "hydra.run.dir")) is not None:
            refuse(f"hydra.run.dir={folder} is ignored by a sweep (-m, or an experiment or search "
                   f"that always sweeps); give hydra.sweep.dir={folder} instead (each job writes a "
                   "subfolder of it; hydra.sweep.subdir=. puts a single job's files in it).")
        if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
            self._check_grid(config)
            return
        # a choice that does not compose: Hydra's own check before the launch says which
        with contextlib.suppress(HydraException, OmegaConfBaseException):
            search_overrides(config, config_name)

    def _check_grid(self, config: DictConfig) -> None:
        # unresolved, as the sweeper reads them (a value may name ${hydra:job.num})
        grid = config.hydra.sweeper.params
        params = OmegaConf.to_container(grid, resolve=False) if grid else {}
        arguments = [f"{key}={value}" for key, value in params.items()] + OmegaConf.to_container(
            config.hydra.overrides.task, resolve=False)
        loader = GlobalHydra.instance().config_loader()
        hydra_config = HydraConfig.instance()
        earlier = hydra_config.cfg
        checked: list[tuple[tuple[str, ...], TrainConfig]] = []
        try:
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
            jobs = [tuple(job) for batch in BasicSweeper.split_arguments(overrides, None)
                    for job in batch]
            common = set(jobs[0]).intersection(*jobs) if jobs else set()
            for num, job in enumerate(jobs):
                composed = loader.load_sweep_config(master_config=config, sweep_overrides=list(job))
                with open_dict(composed):  # as the launcher sets them: ${hydra:job.num} resolves
                    composed.hydra.job.id = composed.hydra.job.num = num
                hydra_config.set_config(composed)
                task = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
                try:
                    typed = validate(task)
                    check_source(typed.dataset)
                except (ConfigError, DataError) as err:
                    refuse(f"in the sweep job '{_job_text(job, common)}': {err} No job was run.")
                checked.append((job, typed))
        except (HydraException, OmegaConfBaseException):
            return  # a job that does not compose: Hydra's own check before the launch says which
        finally:
            hydra_config.cfg = earlier
        same_computation(checked, common)
