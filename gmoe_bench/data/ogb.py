"""OGB molecular datasets through ogb's own loader and split, with an offline mirror.

A *mirror* is a folder of OGB-format dataset folders, laid out as the official zips extract
(``ogbg_molhiv/{RELEASE_v1.txt, raw/, split/}``). When the dataset is missing from ``root``, its
folder is copied from the mirror; with no mirror, ogb downloads it. Nothing here ever waits on
standard input, and ogb 1.3.6's processed file is read with ``torch.load(weights_only=True)`` by
allowlisting the three PyG classes it pickles, rather than turning the safety check off.
"""

from __future__ import annotations

import builtins
import pickle
import shutil
import urllib.error
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock
from ogb.graphproppred import PygGraphPropPredDataset
from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
from torch_geometric.data.storage import GlobalStorage

from gmoe_bench.config import DatasetConfig
from gmoe_bench.errors import DataError

# What ogb 1.3.6 pickles in processed/geometric_data_processed.pt beyond what PyG allowlists itself.
PYG_PICKLED_CLASSES = [DataEdgeAttr, DataTensorAttr, GlobalStorage]
RAW_FILES = ("edge", "node-feat", "edge-feat", "graph-label", "num-node-list", "num-edge-list")
# Columns of each raw file in OGB's molecular format (graph-label: one per task).
RAW_COLUMNS = {"edge": 2, "node-feat": 9, "edge-feat": 3, "num-node-list": 1, "num-edge-list": 1}
MASTER_CSV = Path(PygGraphPropPredDataset.__init__.__code__.co_filename).parent / "master.csv"


@dataclass
class MolDataset:
    """A loaded OGB dataset, its official split and what the engine needs to know about it."""

    name: str
    graphs: PygGraphPropPredDataset
    split: dict[str, torch.Tensor]  # 'train' | 'valid' | 'test' -> graph indices
    num_tasks: int
    task_type: str  # e.g. 'binary classification', 'regression'
    eval_metric: str  # key of OGB's Evaluator result, e.g. 'rocauc', 'rmse'


def ogb_meta(name: str) -> pd.Series:
    """OGB's registry entry for ``name``; a DataError listing the valid names if unknown."""
    master = pd.read_csv(MASTER_CSV, index_col=0, keep_default_na=False)
    known = [c for c in master.columns if c.startswith("ogbg-mol")]
    if name not in known:
        raise DataError(f"Unknown dataset '{name}'. OGB's molecular datasets are: "
                        f"{', '.join(known)}. Choose one with dataset.name=... .")
    return master[name]


def folder_name(name: str) -> str:
    """Folder of a dataset inside a root or mirror: 'ogbg-molhiv' -> 'ogbg_molhiv'."""
    return name.replace("-", "_")


def missing_files(folder: Path, meta: pd.Series) -> list[str]:
    """Files an OGB-format dataset folder needs that ``folder`` lacks."""
    needed = [f"RELEASE_v{meta['version']}.txt"]
    needed += [f"raw/{f}.csv.gz" for f in RAW_FILES]
    needed += [f"split/{meta['split']}/{s}.csv.gz" for s in ("train", "valid", "test")]
    return [f for f in needed if not (folder / f).is_file()]


def check_raw_files(folder: Path, meta: pd.Series) -> None:
    """Column counts of the raw files, read from their first rows (cheap), before ogb parses them."""
    expected = {**RAW_COLUMNS, "graph-label": int(meta["num tasks"])}
    for name, columns in expected.items():
        path = folder / "raw" / f"{name}.csv.gz"
        try:
            first = pd.read_csv(path, header=None, nrows=1)
        except pd.errors.EmptyDataError:
            continue  # no rows (e.g. no bonds at all): nothing to check
        except Exception as err:
            raise DataError(f"{path} cannot be read ({err}). Replace the dataset folder with a "
                            "complete OGB-format copy.") from err
        if first.shape[1] != columns:
            raise DataError(f"{path} has {first.shape[1]} columns where {meta.name} needs "
                            f"{columns}. The file is not in OGB's format: replace the dataset "
                            "folder with a complete OGB-format copy.")


def check_splits(graphs: PygGraphPropPredDataset, split: dict[str, torch.Tensor], name: str,
                 task_type: str) -> None:
    """Every split has labels, and for classification two classes in some task (else no ROC-AUC)."""
    y = graphs.y.view(len(graphs), -1).float()
    for part, index in split.items():
        labels = y[index]
        labelled = ~torch.isnan(labels)
        if index.numel() == 0 or not labelled.any():
            raise DataError(f"The {part} split of {name} has no labelled graph, so it cannot be "
                            "trained or scored. Check the split files under split/.")
        if "classification" in task_type and part != "train":
            positives = torch.where(labelled, labels == 1, False).any(0)
            negatives = torch.where(labelled, labels == 0, False).any(0)
            if not (positives & negatives).any():
                raise DataError(f"Every task of the {part} split of {name} has labels of one class "
                                "only, so ROC-AUC is undefined. Use a split with both classes "
                                "in it (the official scaffold split has them).")


@contextmanager
def _no_prompts() -> Iterator[None]:
    """ogb asks questions with input() (stale versions, big downloads); never wait for an answer."""
    def refuse(prompt: str = "") -> str:
        raise DataError(f"ogb wanted to ask '{prompt.strip()}'. gmoe-bench never waits for input: "
                        "remove the dataset folder under dataset.root, or provide a complete "
                        "OGB-format copy through dataset.mirror / GMOE_DATA_MIRROR.")
    original = builtins.input
    builtins.input = refuse
    try:
        yield
    finally:
        builtins.input = original


def _copy_from_mirror(mirror: Path, name: str, meta: pd.Series, target: Path) -> None:
    source = mirror / folder_name(name)
    if not source.is_dir():
        raise DataError(f"The data mirror {mirror} has no folder '{folder_name(name)}' for {name}. "
                        f"Put the extracted OGB folder there, or point dataset.mirror / "
                        f"GMOE_DATA_MIRROR at a folder that has it.")
    missing = missing_files(source, meta)
    if missing:
        raise DataError(f"The mirror copy {source} is incomplete: it lacks {', '.join(missing)}. "
                        "Replace it with a complete OGB-format folder (as the official zip "
                        "extracts).")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("processed"))
    partial.rename(target)  # atomic: a killed copy never looks like a dataset


def _open(name: str, root: Path) -> PygGraphPropPredDataset:
    with _no_prompts(), torch.serialization.safe_globals(PYG_PICKLED_CLASSES):
        return PygGraphPropPredDataset(name=name, root=str(root))


def _open_or_rebuild(name: str, root: Path, folder: Path) -> PygGraphPropPredDataset:
    """Open the dataset; a truncated or corrupt processed cache is deleted and rebuilt once."""
    try:
        return _open(name, root)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as err:
        processed = folder / "processed"
        if not processed.exists():
            raise DataError(f"Could not process {name} from {folder}: {err}. The raw files may "
                            "be corrupt; delete the folder and copy it again.") from err
        shutil.rmtree(processed)
        try:
            return _open(name, root)
        except Exception as again:
            raise DataError(f"Could not process {name} from {folder}: {again}. The raw files may "
                            "be corrupt; delete the folder and copy it again.") from again


def load_dataset(cfg: DatasetConfig) -> MolDataset:
    """Load ``cfg.name`` into ``cfg.root`` (copying it from ``cfg.mirror`` first if needed)."""
    meta = ogb_meta(cfg.name)
    root = Path(cfg.root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / folder_name(cfg.name)
    # Parallel sweep jobs share the root: one prepares and processes, the others wait.
    with FileLock(str(root / f".{folder.name}.lock")):
        if folder.exists() and missing_files(folder, meta):
            if not cfg.mirror:
                raise DataError(f"The dataset folder {folder} is incomplete (it lacks "
                                f"{', '.join(missing_files(folder, meta))}). Delete it so it is "
                                "downloaded again, or set GMOE_DATA_MIRROR / dataset.mirror to "
                                "a folder with a complete copy.")
            shutil.rmtree(folder)
        if not folder.exists() and cfg.mirror:
            _copy_from_mirror(Path(cfg.mirror).expanduser().resolve(), cfg.name, meta, folder)
        if folder.exists() and not (folder / "processed" / "geometric_data_processed.pt").exists():
            check_raw_files(folder, meta)
        try:
            graphs = _open_or_rebuild(cfg.name, root, folder)
        except (urllib.error.URLError, OSError) as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise DataError(f"{cfg.name} is not in {root} and could not be downloaded ({err}). "
                            "Without network access, give a local mirror: a folder holding "
                            f"'{folder.name}/' as the official OGB zip extracts, through "
                            "GMOE_DATA_MIRROR=/path/to/mirror or dataset.mirror=/path/to/mirror."
                            ) from err
    split = {k: torch.as_tensor(v, dtype=torch.long) for k, v in graphs.get_idx_split().items()}
    check_splits(graphs, split, cfg.name, str(meta["task type"]))
    return MolDataset(
        name=cfg.name,
        graphs=graphs,
        split=split,
        num_tasks=int(meta["num tasks"]),
        task_type=str(meta["task type"]),
        eval_metric=str(meta["eval metric"]),
    )
