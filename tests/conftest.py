"""Shared fixtures: a small OGB-format molecule dataset built with rdkit (no network, no ../shared)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from gmoe_bench import output_dirs

REPO = Path(__file__).resolve().parents[1]
output_dirs.register()  # the resolvers the Hydra configs name, as gmoe-train registers them
# One torch thread in this process and in the runs it starts: the test models are small, and on a
# shared 2-core machine a second thread per process mostly waits for a core (several times slower).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def small_molecules() -> list[str]:
    """72 varied molecules: chains, branches, rings, aromatics, one atom, a salt without bonds."""
    smiles = []
    for n in range(1, 7):
        chain = "C" * n
        smiles += [chain + "O", chain + "N", "c1ccccc1" + chain, "C1CC1" + chain,
                   chain + "C(=O)O", "N" + chain + "c1ccncc1", chain + "Cl", "C1CCNCC1" + chain,
                   "O=C(N)" + chain, "C#C" + chain, "FC(F)(F)" + chain, "c1ccc2ccccc2c1" + chain]
    return [*smiles, "C", "[Na+].[Cl-]"]


def write_small_dataset(folder: Path) -> None:
    """``folder`` becomes an OGB-format 'ogbg-molbbbp' with a learnable label (has nitrogen)."""
    smiles = small_molecules()
    labels = np.array([[float("N" in s or "n" in s)] for s in smiles])
    index = np.arange(len(smiles))
    split = {"train": index[index % 5 >= 2], "valid": index[index % 5 == 0],
             "test": index[index % 5 == 1]}
    # imported here: rdkit (which it needs) is absent from some GPU images, where the rdkit-free
    # tests (test_cuda_graphs.py) must still run
    from gmoe_bench.data.from_smiles import write_ogb_folder

    write_ogb_folder(folder, smiles, labels, split)


@pytest.fixture(scope="session")
def small_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror folder holding a small 'ogbg_molbbbp' dataset."""
    mirror = tmp_path_factory.mktemp("mirror")
    write_small_dataset(mirror / "ogbg_molbbbp")
    return mirror


def seed_record(seed: int, valid: float, test: float) -> dict:
    """A finished seed as summary.json holds it, trained for one epoch."""
    return {"seed": seed, "best_epoch": 1, "valid": valid, "test": test,
            "epochs": [{"epoch": 1, "valid": valid, "test": test, "routing": []}]}


def cli_env(mirror: Path | None, data_root: Path) -> dict[str, str]:
    """The environment of a gmoe-train run in a test: the given mirror (or none) and data root."""
    env = {k: v for k, v in os.environ.items() if k != "GMOE_DATA_MIRROR"}
    if mirror is not None:
        env["GMOE_DATA_MIRROR"] = str(mirror)
    env["GMOE_DATA_ROOT"] = str(data_root)
    env["WANDB_SILENT"] = "true"
    return env


def cli_args(overrides: tuple[str, ...], cwd: Path) -> list[str]:
    """gmoe-train's arguments: Hydra's flags (-m, --help) first, a single run's output in
    ``cwd/run`` (a sweep names its own hydra.sweep.dir: a sweep refuses hydra.run.dir)."""
    flags = [o for o in overrides if o.startswith("-")]
    sweep = "-m" in flags or any(o.startswith(("hydra.sweep.dir=", "hydra.run.dir="))
                                 for o in overrides)
    return [*flags, *([] if sweep else [f"hydra.run.dir={cwd / 'run'}"]), "trainer.progress=false",
            *(o for o in overrides if not o.startswith("-"))]


def run_cli(*overrides: str, cwd: Path, mirror: Path | None,
            data_root: Path) -> subprocess.CompletedProcess[str]:
    """Run gmoe-train's ``main()`` in this process, as the command line would (argv, environment,
    working folder, exit code, stdout and stderr): a subprocess would spend seconds importing torch,
    PyG and Hydra for every run. :func:`run_cli_subprocess` is the real command."""
    from gmoe_bench.train import main

    args = cli_args(overrides, cwd)
    saved_env, saved_argv, saved_threads = dict(os.environ), sys.argv, torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(cli_env(mirror, data_root))
    sys.argv = ["gmoe-train", *args]
    code: int | str | None = 0
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)  # a run's trainer.cpu_threads stays with the run
        GlobalHydra.instance().clear()
    returncode = code if isinstance(code, int) else 0 if code is None else 1
    return subprocess.CompletedProcess(["gmoe-train", *args], returncode, out.getvalue(),
                                       err.getvalue())


def run_cli_subprocess(*overrides: str, cwd: Path, mirror: Path | None, data_root: Path,
                       timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gmoe_bench.train`` with Hydra overrides; output goes to ``cwd/run``."""
    cmd = [sys.executable, "-m", "gmoe_bench.train", *cli_args(overrides, cwd)]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(mirror, data_root), capture_output=True,
                          text=True, timeout=timeout)
