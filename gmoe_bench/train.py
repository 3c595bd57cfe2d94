"""gmoe-train: multi-seed training and evaluation, configured by Hydra (see gmoe_bench/configs/train.yaml)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gmoe_bench import output_dirs
from gmoe_bench.config import (
    CONFIG_DIR,
    TrainConfig,
    as_dict,
    check_paths,
    config_error,
    config_identity,
    describe,
    ignored_expert_keys,
    validate,
)
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.engine.checkpoint import SeedCheckpoint, check_writable, checkpoint_directory
from gmoe_bench.engine.run import resolve_device, run_seeds
from gmoe_bench.errors import TrainingError, UserError, describe_error
from gmoe_bench.output_dirs import aside_name
from gmoe_bench.records import (
    SUMMARY_FILE,
    EpochRecord,
    SeedResult,
    higher_is_better,
    provenance,
    write_json_atomic,
)
from gmoe_bench.tracking.summary import aggregate, summary_line
from gmoe_bench.tracking.wandb_logger import WandbLogger

log = logging.getLogger("gmoe_bench")

output_dirs.register()  # before Hydra resolves hydra.run.dir (configs/hydra/default.yaml)


def default_threads(launcher: Mapping[str, Any] | None, cores: int) -> int | None:
    """torch threads for a job when trainer.cpu_threads=0: its share of the ``cores`` it may use,
    or None (torch's default) when it runs alone.

    ``launcher`` is the Hydra launcher config of a sweep (None for a single run): joblib runs
    ``n_jobs`` jobs at once on this machine (-1: one per core), submitit gives each job
    ``cpus_per_task`` cores; Hydra's basic launcher runs one job at a time."""
    if launcher is None:
        return None
    if "n_jobs" in launcher:
        jobs = launcher["n_jobs"]
        return max(1, cores // (cores if jobs is None or jobs < 0 else max(jobs, 1)))
    if launcher.get("cpus_per_task"):
        return max(1, min(cores, int(launcher["cpus_per_task"])))
    return None


def set_threads(requested: int) -> None:
    """Use ``trainer.cpu_threads`` torch threads, or for 0 this job's share (default_threads)."""
    launcher = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = OmegaConf.to_container(HydraConfig.get().launcher)
    threads = requested or default_threads(launcher, len(os.sched_getaffinity(0)))
    if threads:
        torch.set_num_threads(threads)


def job_command() -> str:
    """The command that re-runs this job alone: ``gmoe-train`` and the job's overrides (in a sweep,
    its own values; the process's argv would be a launcher's, e.g. submitit's ``_submit.py``)."""
    if HydraConfig.initialized():
        return " ".join(["gmoe-train", *map(shlex.quote, HydraConfig.get().overrides.task)])
    return " ".join(map(shlex.quote, [Path(sys.argv[0]).name, *sys.argv[1:]]))


def keep_earlier_summary(path: Path, typed: TrainConfig, fingerprint: str) -> None:
    """Keep an earlier summary.json in this output folder that this run does not re-run (the same
    computation on the same data, its seeds among ours). One of the same computation on other seeds
    moves to ``earlier.replaced-<time>/summary.json``, where gmoe-report still merges its seeds;
    another run's becomes ``summary.json.replaced-<time>``, which no report reads.

    A reused ``hydra.run.dir`` or sweep job folder (job folders are named without the seeds, so a
    sweep of new seeds into an earlier sweep's folder reuses them) would otherwise lose it."""
    if not path.is_file():
        return
    try:
        earlier = json.loads(path.read_text())
        seeds = {entry["seed"] for entry in earlier["seeds"] + earlier["failed_seeds"]}
        same = (config_identity(earlier["config"]) == config_identity(typed)
                and earlier["data"]["fingerprint"] == fingerprint)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, UserError):
        same, seeds = False, set()  # not a summary we can read: kept all the same
    if same and seeds <= set(typed.seeds):
        return  # this run re-runs it
    if same:
        folder = aside_name(path.parent / "earlier", "replaced")
        folder.mkdir()
        aside = folder / path.name
        why = "other seeds of this configuration; gmoe-report merges them from there"
    else:
        aside = aside_name(path, "replaced")
        why = "another run's results: another config or data"
    path.rename(aside)
    log.warning("%s held %s; moved to %s.", path, why, aside)


def save_summary(summary: dict[str, Any], path: Path, start: float, seeds: list[int]) -> None:
    """Write summary.json, its seeds in the config's order (finished ones are found first)."""
    summary["seeds"].sort(key=lambda result: seeds.index(result["seed"]))
    if summary["seeds"]:
        summary["aggregate"] = aggregate(summary["seeds"])
    summary["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(path, summary)


class EpochLog:
    """A group's epoch records to W&B (one run per seed): one seed's live, several seeds' seed
    by seed once the group ends (W&B holds one run at a time)."""

    def __init__(self, wandb: WandbLogger, group: list[int]) -> None:
        self.wandb = wandb
        self.live = len(group) == 1
        self.records: dict[int, list[EpochRecord]] = {seed: [] for seed in group}
        if self.live:
            wandb.start_seed(group[0])

    def log(self, seed: int, record: EpochRecord) -> None:
        if self.live:
            self.wandb.log_epoch(record)
        else:
            self.records[seed].append(record)

    def replay(self, seed: int) -> None:
        """Start the seed's W&B run and log its epochs (a group's seeds; one seed's are live)."""
        if not self.live:
            self.wandb.start_seed(seed)
            for record in self.records[seed]:
                self.wandb.log_epoch(record)


def train(cfg: DictConfig, output_dir: Path) -> float:
    """Run every seed of ``cfg``; write summary.json; return the validation score to maximise
    (hparams_search): the mean validation metric, negated for errors such as RMSE.

    Seeds already finished under ``trainer.checkpoint_dir`` are taken as they are, an interrupted
    seed resumes from its last epoch. A seed whose loss stops being finite is recorded as failed,
    the others go on, and TrainingError is raised at the end.
    """
    typed = validate(cfg)
    check_paths(typed)
    ignored = ignored_expert_keys(typed)
    if ignored:
        log.warning("%s: no effect with moe.num_experts=0 (the plain backbone); this is the "
                    "backbone's run, and its finished seeds are reused.", ", ".join(ignored))
    set_threads(typed.trainer.cpu_threads)
    device = resolve_device(typed.trainer.device, typed.trainer.cuda_graphs)
    # before the data is copied and processed (minutes for the larger datasets)
    check_writable(checkpoint_directory(typed, typed.dataset.name, None))
    data = load_dataset(typed.dataset)
    model_name = describe(typed)
    checkpoints = checkpoint_directory(typed, data.name, data.fingerprint)
    check_writable(checkpoints)
    legacy = checkpoints.parent
    if list(legacy.glob("seed_*.json")) and not list(checkpoints.glob("seed_*")):
        log.warning("%s holds seeds of this config from before checkpoints were keyed by the data's "
                    "content; they are not reused (their data is unknown). If they were trained on "
                    "%s, move their seed_* files into %s.", legacy, data.folder, checkpoints)
    log.info("%s %s on %s (%d threads): %d train / %d valid / %d test graphs, seeds %s, "
             "checkpoints in %s", data.name, model_name, device, torch.get_num_threads(),
             len(data.split["train"]), len(data.split["valid"]), len(data.split["test"]),
             typed.seeds, checkpoints)

    summary: dict[str, Any] = {
        "dataset": data.name,
        "model": model_name,
        "metric": data.eval_metric,
        "config": as_dict(typed),
        # what the numbers were computed from: the folder read and its content hash
        "data": {"folder": str(data.folder), "fingerprint": data.fingerprint},
        "provenance": provenance(device, job_command()),
        "seeds": [],
        "failed_seeds": [],
        "complete": False,
    }
    path = output_dir / SUMMARY_FILE
    keep_earlier_summary(path, typed, data.fingerprint)
    wandb = WandbLogger(typed.logger.wandb, typed, data.name, model_name, data.eval_metric,
                        typed.moe.num_experts - typed.moe.num_hop2, output_dir)
    start = time.perf_counter()
    pending = []
    for seed in typed.seeds:
        checkpoint = SeedCheckpoint(checkpoints, seed)
        if not typed.trainer.resume:
            checkpoint.set_aside_previous()
        finished = checkpoint.finished_result()
        if finished is None:
            pending.append(seed)
        else:
            log.info("seed %d: already finished (%s), skipped", seed, checkpoint.result_path)
            summary["seeds"].append(finished)
    size = typed.trainer.seeds_per_group
    for group in [pending[i : i + size] for i in range(0, len(pending), size)]:
        epochs = EpochLog(wandb, group)
        seed_checkpoints = {seed: SeedCheckpoint(checkpoints, seed) for seed in group}
        results: dict[int, SeedResult | Exception]
        try:
            results = dict(run_seeds(typed, data, group, device, epochs.log, seed_checkpoints))
        except UserError:
            raise  # bad input fails every seed alike: exit 2 now
        except Exception as err:  # one group's failure, whatever it is, never stops the others
            results = dict.fromkeys(group, err)
        for seed in group:
            result = results[seed]
            epochs.replay(seed)
            if isinstance(result, Exception):
                error = str(result) if isinstance(result, TrainingError) else (
                    f"seed {seed} failed: {describe_error(result)}")
                log.error("%s", error)
                summary["failed_seeds"].append({"seed": seed, "error": error})
                wandb.end_seed(None)
                continue
            wandb.end_seed(result)
            summary["seeds"].append(result.to_dict())
            log.info("seed %d: best epoch %d, valid %.4f, test %.4f", seed, result.best_epoch,
                     result.valid, result.test)
            try:
                seed_checkpoints[seed].finish(result.to_dict())
            except TrainingError as err:  # the result is in summary.json all the same
                log.warning("%s", err)
        # after every group: finished seeds are never lost
        save_summary(summary, path, start, typed.seeds)
    summary["complete"] = not summary["failed_seeds"]
    save_summary(summary, path, start, typed.seeds)
    if summary["seeds"]:
        wandb.log_aggregate(summary["seeds"], summary["aggregate"])
        line = summary_line(data.name, model_name, data.eval_metric, summary["aggregate"])
        log.info("%s", line)
        print(line, flush=True)
    if summary["failed_seeds"]:
        failed = ", ".join(str(f["seed"]) for f in summary["failed_seeds"])
        raise TrainingError(f"seed(s) {failed} failed (see {path}); the other seeds' results are "
                            "in it.")
    valid = summary["aggregate"]["valid_mean"]
    return valid if higher_is_better(data.eval_metric) else -valid


class SweepJobError(CompactHydraException):
    """A sweep job that failed: Hydra runs the other jobs, then prints this one line (no
    traceback, as for every CompactHydraException) and exits non-zero."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, and whether re-running the same command resumes it."""

    def __init__(self, resumes: bool) -> None:
        super().__init__()
        self.resumes = resumes


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        return train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except KeyboardInterrupt:
        raise Interrupted(resumes=cfg.trainer.resume is not False) from None
    except (UserError, TrainingError) as err:
        print(f"gmoe-train: error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise SweepJobError(f"gmoe-train: error: {err}") from None
        raise SystemExit(2 if isinstance(err, UserError) else 3) from None


def output_folder_error(err: OSError) -> str | None:
    """The one-sentence error for an output folder Hydra could not create (a file in the way, a
    name too long, a read-only place), or None for any other OSError."""
    if err.filename is None:
        return None
    failed = Path(os.path.abspath(str(err.filename)))
    # the folders given on the command line, and the defaults' roots (configs/hydra/default.yaml)
    folders = [arg.split("=", 1)[1] for arg in sys.argv[1:]
               if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir="))] + ["outputs", "multirun"]
    if not any(Path(os.path.abspath(folder)).is_relative_to(failed) for folder in folders):
        return None
    return (f"cannot create the output folder {err.filename} ({err.strerror}); set hydra.run.dir "
            "(hydra.sweep.dir for a sweep) to a folder that can be created.")


def raised_by_hydra(err: BaseException) -> bool:
    """Whether ``err`` comes from Hydra's own code (its config loading), not from training."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}hydra{os.sep}" in frames[-1].filename


def hydra_value_error(err: ValueError) -> str:
    """One sentence for a ValueError from Hydra's code; a config group given no option ('trainer=null'
    says 'Config group override must be a string or a list. Got NoneType') is told how to name one."""
    message = str(err).rstrip(".") + "."
    if message.startswith("Config group override"):
        message += (" A config group (model=, trainer=, ...) takes one of its options; gmoe-train "
                    "--help lists them.")
    return message


def main() -> None:
    """Console entry point (``gmoe-train``)."""
    # Hydra composes the config onto the schema (gmoe_bench/config.py) and rejects what does not
    # fit it; with HYDRA_FULL_ERROR its errors reach this function, which says them in one sentence.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except SweepJobError as err:  # already said by the job; Hydra ran the other jobs
        print(err, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except (HydraException, OmegaConfBaseException) as err:
        print(f"gmoe-train: error: {config_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as err:
        if (message := output_folder_error(err)) is None:
            raise
        print(f"gmoe-train: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ValueError as err:  # Hydra's: 'trainer=null' (a config group given no option), '-m --cfg job'
        if not raised_by_hydra(err):
            raise
        print(f"gmoe-train: error: {hydra_value_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        how = ("re-run the same command to resume" if getattr(err, "resumes", True) else
               "re-run it with trainer.resume=true to resume (with trainer.resume=false it would "
               "start over)")
        print("gmoe-train: interrupted. Finished seeds are in summary.json and the checkpoints; "
              f"{how}.", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
