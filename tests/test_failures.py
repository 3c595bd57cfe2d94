"""Hostile inputs and environments (issue 18): nothing is lost, nothing is silently wrong, nothing
hangs, and every failure is one sentence naming the path it concerns."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from gmoe_bench.data import ogb
from gmoe_bench.data.ogb import load_dataset
from gmoe_bench.errors import DataError
from tests.conftest import small_molecules
from tests.test_data import dataset_cfg

N = len(small_molecules())


@pytest.fixture
def local_copy(small_mirror: Path, tmp_path: Path) -> Path:
    """A root holding its own copy of the small dataset (no mirror), plus a file of the user's."""
    folder = tmp_path / "root" / "ogbg_molbbbp"
    shutil.copytree(small_mirror / "ogbg_molbbbp", folder)
    (folder / "my_notes.txt").write_text("mine")
    return folder


def edit_rows(path: Path, edit) -> None:
    with gzip.open(path, "rt") as f:
        rows = f.read().splitlines()
    edit(rows)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")


def test_corrupt_raw_file_deletes_nothing(local_copy: Path) -> None:
    raw = local_copy / "raw" / "node-feat.csv.gz"
    data = bytearray(raw.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC
    raw.write_bytes(bytes(data))
    files = sorted(local_copy.rglob("*"))
    with pytest.raises(DataError, match=r"node-feat\.csv\.gz cannot be read .*corrupt"):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert sorted(local_copy.rglob("*")) == files  # the user's folder is as it was


def test_incomplete_folder_that_is_the_mirror_is_left_alone(local_copy: Path) -> None:
    (local_copy / "split" / "scaffold" / "test.csv.gz").unlink()
    files = sorted(local_copy.rglob("*"))
    with pytest.raises(DataError, match=r"lacks split/scaffold/test\.csv\.gz"):
        load_dataset(dataset_cfg(local_copy.parent, local_copy.parent))  # root == mirror
    assert sorted(local_copy.rglob("*")) == files


def test_incomplete_folder_is_moved_aside_not_deleted(local_copy: Path, small_mirror: Path) -> None:
    (local_copy / "RELEASE_v1.txt").unlink()
    data = load_dataset(dataset_cfg(local_copy.parent, small_mirror))
    assert len(data.graphs) == N
    (aside,) = local_copy.parent.glob("ogbg_molbbbp.incomplete-*")
    assert (aside / "my_notes.txt").read_text() == "mine"


def flip_labels(folder: Path) -> None:
    edit_rows(folder / "raw" / "graph-label.csv.gz",
              lambda rows: rows.__setitem__(slice(None), [str(1 - int(r)) for r in rows]))


def test_processed_cache_follows_its_raw_files(local_copy: Path) -> None:
    first = load_dataset(dataset_cfg(local_copy.parent, None))
    flip_labels(local_copy)
    second = load_dataset(dataset_cfg(local_copy.parent, None))
    assert torch.equal(second.graphs.y, 1 - first.graphs.y)
    assert second.fingerprint != first.fingerprint


def test_legacy_cache_older_than_raw_files_is_rebuilt(local_copy: Path) -> None:
    first = load_dataset(dataset_cfg(local_copy.parent, None))
    (local_copy / "processed" / ogb.FINGERPRINT_FILE).unlink()  # as written before fingerprints
    flip_labels(local_copy)
    cache = local_copy / "processed" / ogb.PROCESSED_FILE
    old = time.time() - 60
    os.utime(cache, (old, old))
    second = load_dataset(dataset_cfg(local_copy.parent, None))
    assert torch.equal(second.graphs.y, 1 - first.graphs.y)


def set_row(path_in_raw: str, row: int, value: str):
    def apply(folder: Path) -> None:
        edit_rows(folder / "raw" / path_in_raw, lambda rows: rows.__setitem__(row, value))
    return apply


@pytest.mark.parametrize(("edit", "message"), [
    (set_row("graph-label.csv.gz", 5, "abc"), r"graph-label\.csv\.gz line 6 holds 'abc'"),
    (set_row("edge.csv.gz", 3, "0,1,2"), r"edge\.csv\.gz is not a well-formed CSV file"),
    (set_row("node-feat.csv.gz", 4, "999,0,0,0,0,0,0,0,0"),
     r"node-feat\.csv\.gz line 5: a feature outside OGB's vocabulary"),
    (set_row("num-node-list.csv.gz", 2, "50"), r"node-feat\.csv\.gz has \d+ rows where"),
    (set_row("edge.csv.gz", 1, "0,40"), r"edge\.csv\.gz line 2: a node index outside its molecule"),
    (set_row("graph-label.csv.gz", 7, "2"),
     r"graph-label\.csv\.gz line 8: a label other than 0, 1 or empty"),
])
def test_bad_raw_rows_are_one_error_before_processing(local_copy: Path, edit, message: str) -> None:
    edit(local_copy)
    with pytest.raises(DataError, match=message):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert not (local_copy / "processed").exists()  # found before ogb processed anything


def test_read_only_root_with_a_processed_dataset(local_copy: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(dataset_cfg(local_copy.parent, None))

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(FileLock, "acquire", read_only)
    assert len(load_dataset(dataset_cfg(local_copy.parent, None)).graphs) == N
    shutil.rmtree(local_copy / "processed")
    with pytest.raises(DataError, match=r"not processed .* dataset.root is read-only"):
        load_dataset(dataset_cfg(local_copy.parent, None))


def test_full_disk_while_processing_blames_the_disk(local_copy: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DataError, match=r"No space left on the device .*\(the raw files are fine\)"):
        load_dataset(dataset_cfg(local_copy.parent, None))
    assert (local_copy / "raw" / "node-feat.csv.gz").is_file()


def test_waiting_for_the_dataset_lock_is_announced(local_copy: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    lock = FileLock(str(local_copy.parent / ".ogbg_molbbbp.lock"))
    lock.acquire()
    result = []
    waiter = threading.Thread(target=lambda: result.append(
        load_dataset(dataset_cfg(local_copy.parent, None))))
    with caplog.at_level(logging.INFO, logger="gmoe_bench.data.ogb"):
        waiter.start()
        deadline = time.time() + 10
        while "another run is preparing" not in caplog.text and time.time() < deadline:
            time.sleep(0.01)
        assert not result  # still waiting
        lock.release()
        waiter.join(timeout=30)
    assert "Waiting for" in caplog.text and str(local_copy.parent) in caplog.text
    assert len(result[0].graphs) == N
