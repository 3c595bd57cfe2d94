"""OGB molecular datasets through ogb's own loader and split, with an offline mirror.

A *mirror* is a folder of OGB-format dataset folders, laid out as the official zips extract
(``ogbg_molhiv/{RELEASE_v1.txt, raw/, split/}``). When the dataset is missing from ``root``, its
folder is copied from the mirror; with no mirror, ogb downloads it. Nothing here ever waits on
standard input, and ogb 1.3.6's processed file is read with ``torch.load(weights_only=True)`` by
allowlisting the three PyG classes it pickles, rather than turning the safety check off.

Raw files are checked in full before ogb processes them; the processed cache records the content
hash of the raw files it was built from (a mismatch rebuilds it), and that hash is part of a run's
identity. Nothing in ``root`` that a call did not create is deleted, except ogb's derived cache.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import logging
import os
import pickle
import shutil
import stat
import urllib.error
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from ogb.graphproppred import PygGraphPropPredDataset
from ogb.utils.features import get_atom_feature_dims, get_bond_feature_dims
from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
from torch_geometric.data.storage import GlobalStorage

from gmoe_bench.config import OGB_MASTER_CSV, DatasetConfig, unknown_dataset_error
from gmoe_bench.errors import DataError
from gmoe_bench.output_dirs import aside_name

# What ogb 1.3.6 pickles in processed/geometric_data_processed.pt beyond what PyG allowlists itself.
PYG_PICKLED_CLASSES = [DataEdgeAttr, DataTensorAttr, GlobalStorage]
RAW_FILES = ("edge", "node-feat", "edge-feat", "graph-label", "num-node-list", "num-edge-list")
# Columns of each raw file in OGB's molecular format (graph-label: one per task).
RAW_COLUMNS = {"edge": 2, "node-feat": 9, "edge-feat": 3, "num-node-list": 1, "num-edge-list": 1}
PROCESSED_FILE = "geometric_data_processed.pt"
# Beside the processed file: the fingerprint of the raw files it was built from.
FINGERPRINT_FILE = "gmoe_raw_fingerprint.txt"

log = logging.getLogger(__name__)


@dataclass
class MolDataset:
    """A loaded OGB dataset, its official split and what the engine needs to know about it."""

    name: str
    graphs: PygGraphPropPredDataset
    split: dict[str, torch.Tensor]  # 'train' | 'valid' | 'test' -> graph indices
    num_tasks: int
    task_type: str  # e.g. 'binary classification', 'regression'
    eval_metric: str  # key of OGB's Evaluator result, e.g. 'rocauc', 'rmse'
    folder: Path  # the dataset folder the graphs were read from
    fingerprint: str  # content hash of its raw and split files (data_fingerprint)


def ogb_meta(name: str) -> pd.Series:
    """OGB's registry entry for ``name``; a DataError listing the valid names if unknown."""
    if problem := unknown_dataset_error(name):
        raise DataError(problem)
    return pd.read_csv(OGB_MASTER_CSV, index_col=0, keep_default_na=False)[name]


def folder_name(name: str) -> str:
    """Folder of a dataset inside a root or mirror: 'ogbg-molhiv' -> 'ogbg_molhiv'."""
    return name.replace("-", "_")


def needed_files(meta: pd.Series) -> list[str]:
    """The files of an OGB-format dataset folder, relative to it."""
    needed = [f"RELEASE_v{meta['version']}.txt"]
    needed += [f"raw/{f}.csv.gz" for f in RAW_FILES]
    needed += [f"split/{meta['split']}/{s}.csv.gz" for s in ("train", "valid", "test")]
    return needed


def missing_files(folder: Path, meta: pd.Series) -> list[str]:
    """Files an OGB-format dataset folder needs that ``folder`` lacks."""
    return [f for f in needed_files(meta) if not (folder / f).is_file()]


def _not_integers(values: np.ndarray) -> np.ndarray:
    return ~np.isfinite(values) | (np.nan_to_num(values) % 1 != 0)


def _read_table(path: Path, columns: int, numbers: str, dataset: str) -> np.ndarray:
    """Every row of one raw file as a float array, or a DataError naming the file and first bad row.

    ``numbers`` is 'int' (indices, counts, features) or 'label' (numbers, empty for missing).
    """
    def bad(problem: str) -> DataError:
        return DataError(f"{path} {problem}. Replace the dataset folder with a complete OGB-format "
                         "copy (the official zip as it extracts).")
    try:
        frame = pd.read_csv(path, header=None)
    except pd.errors.EmptyDataError:
        return np.zeros((0, columns))  # no rows (e.g. no bonds at all)
    except pd.errors.ParserError as err:  # e.g. a row with an extra column
        raise bad(f"is not a well-formed CSV file ({str(err).strip()})") from err
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:  # gzip CRC or truncation
        raise bad(f"cannot be read ({err}); the file is corrupt") from err
    if frame.shape[1] != columns:
        raise bad(f"has {frame.shape[1]} columns where {dataset} needs {columns}")
    if all(pd.api.types.is_numeric_dtype(t) for t in frame.dtypes):
        values = frame.to_numpy(dtype=float)
        if numbers == "label" or not _not_integers(values).any():
            return values
    # Something is not a number: read the file again as text to name the first such line.
    text = pd.read_csv(path, header=None, dtype=str, keep_default_na=False).to_numpy()
    values = pd.DataFrame(text).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    invalid = np.isnan(values) & (text != "") if numbers == "label" else _not_integers(values)
    if not invalid.any():
        return values
    row = int(np.argwhere(invalid)[0][0])
    kind = "numbers" if numbers == "label" else "integers"
    raise bad(f"line {row + 1} holds {','.join(text[row])!r}, where OGB's format has {kind}")


def _first_bad(path: Path, rows: np.ndarray, problem: str) -> DataError:
    row = int(np.flatnonzero(rows)[0])
    return DataError(f"{path} line {row + 1}: {problem}. Replace the dataset folder with a complete "
                     "OGB-format copy (the official zip as it extracts).")


def check_raw_files(folder: Path, meta: pd.Series) -> None:
    """Read every raw and split file in full and check it against OGB's molecular format, so a bad
    row is one DataError naming the file and line before ogb processes (or training trips on) it."""
    raw = folder / "raw"

    def read(name: str, columns: int, numbers: str = "int") -> np.ndarray:
        return _read_table(raw / f"{name}.csv.gz", columns, numbers, str(meta.name))

    num_tasks = int(meta["num tasks"])
    nodes, edges = read("num-node-list", 1)[:, 0], read("num-edge-list", 1)[:, 0]
    node_feat, edge_feat = read("node-feat", RAW_COLUMNS["node-feat"]), read("edge-feat", 3)
    edge, labels = read("edge", 2), read("graph-label", num_tasks, "label")
    counts = {"num-node-list": nodes, "num-edge-list": edges}
    for name, values in counts.items():
        if (values < 0).any():
            raise _first_bad(raw / f"{name}.csv.gz", values < 0, "a negative count")
    for name, rows, expected in (("num-edge-list", len(edges), len(nodes)),
                                 ("graph-label", len(labels), len(nodes)),
                                 ("node-feat", len(node_feat), nodes.sum()),
                                 ("edge", len(edge), edges.sum()),
                                 ("edge-feat", len(edge_feat), edges.sum())):
        if rows != expected:
            raise DataError(f"{raw / (name + '.csv.gz')} has {rows} rows where num-node-list and "
                            f"num-edge-list imply {int(expected)}. Replace the dataset folder with "
                            "a complete OGB-format copy (the official zip as it extracts).")
    for name, feat, dims in (("node-feat", node_feat, get_atom_feature_dims()),
                             ("edge-feat", edge_feat, get_bond_feature_dims())):
        outside = ((feat < 0) | (feat >= np.array(dims))).any(axis=1)
        if outside.any():
            raise _first_bad(raw / f"{name}.csv.gz", outside,
                             f"a feature outside OGB's vocabulary (sizes {dims})")
    graph_nodes = np.repeat(nodes, edges.astype(int))  # node count of each edge's graph
    outside = ((edge < 0) | (edge >= graph_nodes[:, None])).any(axis=1)
    if outside.any():
        raise _first_bad(raw / "edge.csv.gz", outside, "a node index outside its molecule")
    infinite = np.isinf(labels).any(axis=1)
    if infinite.any():
        raise _first_bad(raw / "graph-label.csv.gz", infinite,
                         "an infinite label (a missing label is an empty field)")
    if "classification" in str(meta["task type"]):
        not_binary = ~(np.isnan(labels) | (labels == 0) | (labels == 1)).all(axis=1)
        if not_binary.any():
            raise _first_bad(raw / "graph-label.csv.gz", not_binary,
                             "a label other than 0, 1 or empty in a binary classification task")
    split_of = np.full(len(nodes), "", dtype=object)  # the split each graph is in so far
    for part in ("train", "valid", "test"):
        path = folder / "split" / str(meta["split"]) / f"{part}.csv.gz"
        index = _read_table(path, 1, "int", str(meta.name))[:, 0]
        if not len(index):
            raise DataError(f"{path} lists no graph; every split needs at least one. Replace the "
                            "dataset folder with a complete OGB-format copy (the official zip as "
                            "it extracts).")
        outside = (index < 0) | (index >= len(nodes))
        if outside.any():
            raise _first_bad(path, outside, f"a graph index outside 0..{len(nodes) - 1}")
        index = index.astype(int)
        first_time = np.zeros(len(index), dtype=bool)
        first_time[np.unique(index, return_index=True)[1]] = True
        if not first_time.all():
            raise _first_bad(path, ~first_time, "a graph index listed twice in this split")
        earlier = split_of[index] != ""
        if earlier.any():
            other = split_of[index[earlier][0]]
            raise _first_bad(path, earlier, f"a graph index that is also in the {other} split "
                             "(the splits must not share graphs)")
        split_of[index] = part


def data_fingerprint(folder: Path, meta: pd.Series) -> str:
    """Content hash of the files a dataset's numbers come from (raw files, split and release)."""
    digest = hashlib.sha256()
    for name in sorted(needed_files(meta)):
        digest.update(name.encode())
        digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def check_splits(graphs: PygGraphPropPredDataset, split: dict[str, torch.Tensor], name: str,
                 task_type: str) -> None:
    """Every split has labels, and for classification two classes in some task (else no ROC-AUC)."""
    y = graphs.y.view(len(graphs), -1).float()
    for part, index in split.items():
        if index.numel() and (index.min() < 0 or index.max() >= len(graphs)):
            raise DataError(f"The {part} split of {name} holds graph indices outside 0..{len(graphs) - 1}"
                            ". Check the split files under split/.")
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


def _copy_from_mirror(source: Path, meta: pd.Series, target: Path) -> None:
    missing = missing_files(source, meta)
    if missing:
        raise DataError(f"The mirror copy {source} is incomplete: it lacks {', '.join(missing)}. "
                        "Replace it with a complete OGB-format folder (as the official zip "
                        "extracts).")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # ours alone: we may remove it
    try:
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("processed"))
        # copytree keeps the mirror's modes: a read-only mirror would give a copy that ogb cannot
        # add processed/ to, and that its owner cannot remove
        for path in (partial, *partial.rglob("*")):
            path.chmod(path.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if path.is_dir() else 0))
        check_raw_files(partial, meta)  # a bad mirror file must not become a copy that looks whole
        partial.rename(target)  # atomic: a killed copy never looks like a dataset
    except DataError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"The data mirror's {source.name} is unusable, so it was not copied: "
                        f"{str(err).replace(str(partial), str(source))}") from err
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"Could not copy {source} to {target} ({err}). Free space or make "
                        "dataset.root a writable folder.") from err


def _set_aside(folder: Path, why: str) -> Path:
    """Rename ``folder`` out of the way (never delete what the user may have put there)."""
    aside = aside_name(folder, why)
    folder.rename(aside)
    return aside


@contextmanager
def _dataset_lock(root: Path, name: str) -> Iterator[bool]:
    """Hold the root's lock for ``name``; yields False (no lock) when the root is read-only.

    Parallel sweep jobs share the root: one prepares and processes, the others wait (and say so).
    A read-only root cannot change under us, so it is read without the lock.
    """
    lock = FileLock(str(root / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for %s: another run is preparing %s in %s.", lock.lock_file, name, root)
        lock.acquire()
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise DataError(f"Cannot create the lock file {lock.lock_file} ({err}).") from err
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _cache_matches(folder: Path, fingerprint: str) -> bool:
    """Whether processed/ was built from the raw files as they are now.

    A cache from before fingerprints were written counts only if it is newer than every raw file."""
    processed = folder / "processed"
    if not (processed / PROCESSED_FILE).is_file():
        return False
    stamp = processed / FINGERPRINT_FILE
    if stamp.is_file():
        return stamp.read_text().strip() == fingerprint
    sources = [p for p in folder.rglob("*.csv.gz") if "processed" not in p.parts]
    return (processed / PROCESSED_FILE).stat().st_mtime >= max(p.stat().st_mtime for p in sources)


def _drop_cache(folder: Path) -> None:
    """Remove ogb's processed/ folder (derived from raw/ by ogb; it is rebuilt from there)."""
    shutil.rmtree(folder / "processed", ignore_errors=True)


def _open(name: str, root: Path) -> PygGraphPropPredDataset:
    with _no_prompts(), torch.serialization.safe_globals(PYG_PICKLED_CLASSES):
        return PygGraphPropPredDataset(name=name, root=str(root))


def _processing_error(name: str, folder: Path, err: Exception) -> DataError:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return DataError(f"No space left on the device while processing {name} into "
                         f"{folder / 'processed'}. Free some space (the raw files are fine) or "
                         "set dataset.root to a folder on another disk.")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DataError(f"Cannot write {folder / 'processed'} ({err.strerror}). Make "
                         "dataset.root writable, or set dataset.root to a writable folder and "
                         f"dataset.mirror={folder.parent} to copy the dataset from here.")
    return DataError(f"Could not process {name} from {folder} ({type(err).__name__}: {err}). "
                     "Replace the dataset folder with a complete OGB-format copy.")


def _open_or_rebuild(name: str, root: Path, folder: Path) -> PygGraphPropPredDataset:
    """Open the dataset; a truncated or corrupt processed cache is rebuilt once."""
    try:
        return _open(name, root)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as err:
        if not (folder / "processed").exists():
            raise _processing_error(name, folder, err) from err
        log.warning("The processed cache of %s is unreadable (%s); rebuilding it.", name, err)
        _drop_cache(folder)
        return _open(name, root)


def _download(cfg: DatasetConfig, meta: pd.Series, root: Path,
              folder: Path) -> PygGraphPropPredDataset:
    """Let ogb download ``cfg.name`` into ``root``; on failure remove only what it created."""
    made = [p for p in (folder, root / Path(str(meta["url"])).name) if not p.exists()]
    try:
        return _open(cfg.name, root)
    except (urllib.error.URLError, OSError) as err:
        for path in made:  # the dataset folder and zip of this attempt, if it got that far
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        raise DataError(f"{cfg.name} is not in {root} and could not be downloaded ({err}). "
                        "Without network access, give a local mirror: a folder holding "
                        f"'{folder.name}/' as the official OGB zip extracts, through "
                        "GMOE_DATA_MIRROR=/path/to/mirror or dataset.mirror=/path/to/mirror."
                        ) from err


def _prepare(cfg: DatasetConfig, meta: pd.Series, root: Path, folder: Path,
             writable: bool) -> tuple[PygGraphPropPredDataset, str]:
    """Copy, check and process the dataset folder as needed; return it opened and its fingerprint."""
    mirror = Path(cfg.mirror).expanduser().resolve() / folder.name if cfg.mirror else None
    missing = missing_files(folder, meta) if folder.exists() else []
    copied = False
    if missing:
        problem = f"The dataset folder {folder} is incomplete (it lacks {', '.join(missing)})"
        if mirror is None or mirror == folder or not writable:
            raise DataError(f"{problem}. Restore those files, or move the folder away and set "
                            "GMOE_DATA_MIRROR / dataset.mirror to a folder with a complete copy.")
        if not mirror.is_dir() or missing_files(mirror, meta):  # nothing to replace it with
            raise DataError(f"{problem}, and the data mirror has no complete '{folder.name}' to "
                            f"copy instead ({mirror}). Restore those files, or put a complete "
                            "OGB-format folder in the mirror.")
        log.warning("%s; moved it to %s and copying %s instead.", problem,
                    _set_aside(folder, "incomplete"), mirror)
    if not folder.exists():
        if not writable:
            raise DataError(f"{cfg.name} is not in the read-only dataset.root {root}. Set "
                            "dataset.root to a writable folder.")
        if mirror is None:
            graphs = _download(cfg, meta, root, folder)
            return graphs, data_fingerprint(folder, meta)
        check_source(cfg)
        _copy_from_mirror(mirror, meta, folder)  # checks the raw files of its copy
        copied = True
    fingerprint = data_fingerprint(folder, meta)
    if not _cache_matches(folder, fingerprint):
        if not copied:
            check_raw_files(folder, meta)  # in full, once, before ogb parses them
        if not writable:
            raise DataError(f"{folder} is not processed (or its processed/ cache is older than its "
                            "raw files) and dataset.root is read-only. Set dataset.root to a writable "
                            f"folder and dataset.mirror={root} to copy the dataset from here.")
        if (folder / "processed").exists():
            log.info("The processed cache of %s does not match its raw files; rebuilding it.",
                     cfg.name)
            _drop_cache(folder)
    try:
        graphs = _open_or_rebuild(cfg.name, root, folder)
        if writable and not (folder / "processed" / FINGERPRINT_FILE).is_file():
            (folder / "processed" / FINGERPRINT_FILE).write_text(fingerprint + "\n")
    except DataError:
        raise
    except Exception as err:
        raise _processing_error(cfg.name, folder, err) from err
    return graphs, fingerprint


def check_source(cfg: DatasetConfig) -> None:
    """A DataError, reading no data, when ``cfg.name`` is neither in ``cfg.root`` nor in the mirror
    it names (with no mirror, ogb downloads it): a sweep checks every job's dataset before any trains."""
    folder = Path(cfg.root).expanduser().resolve() / folder_name(cfg.name)
    if folder.exists() or not cfg.mirror:
        return
    mirror = Path(cfg.mirror).expanduser().resolve()
    if not (mirror / folder.name).is_dir():
        raise DataError(f"The data mirror {mirror} has no folder '{folder.name}' for {cfg.name}. "
                        "Put the extracted OGB folder there, point dataset.mirror / "
                        "GMOE_DATA_MIRROR at a folder that has it, or set dataset.mirror=null to "
                        "let ogb download it.")


def load_dataset(cfg: DatasetConfig) -> MolDataset:
    """Load ``cfg.name`` from ``cfg.root`` (copying it from ``cfg.mirror`` first if needed).

    Nothing in the root that this call did not create is ever deleted (an incomplete folder is
    moved aside; only ogb's derived processed/ cache is rebuilt)."""
    meta = ogb_meta(cfg.name)
    root = Path(cfg.root).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"dataset.root={root} cannot be created ({err.strerror}). Set "
                        "dataset.root to a writable folder.") from err
    folder = root / folder_name(cfg.name)
    with _dataset_lock(root, folder.name) as writable:
        graphs, fingerprint = _prepare(cfg, meta, root, folder, writable)
    split = {k: torch.as_tensor(v, dtype=torch.long) for k, v in graphs.get_idx_split().items()}
    check_splits(graphs, split, cfg.name, str(meta["task type"]))
    return MolDataset(
        name=cfg.name,
        graphs=graphs,
        split=split,
        num_tasks=int(meta["num tasks"]),
        task_type=str(meta["task type"]),
        eval_metric=str(meta["eval metric"]),
        folder=folder,
        fingerprint=fingerprint,
    )
