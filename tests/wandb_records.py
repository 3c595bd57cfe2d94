"""Read the records of an offline W&B run file (``run-ID.wandb``) without a server.

The file is wandb's transaction log: a 7-byte header, then LevelDB-style log blocks of 32 KiB whose
records (7-byte header: crc32, length, type) carry serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    records, chunks, pos = [], b"", FILE_HEADER
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        payload = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        chunks = payload if kind in (FULL, FIRST) else chunks + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def run_contents(path: Path) -> dict[str, Any]:
    """The run's group, name, job type, its history rows and final summary, from its records."""
    out: dict[str, Any] = {"history": [], "summary": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, name=record.run.display_name,
                       job_type=record.run.job_type)
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "summary":
            out["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.summary.update})
    return out


def finished_runs(folder: Path, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The contents of the ``count`` offline runs under ``folder``, once W&B's service has written
    each one's run record and summary: it writes the files in the background, and ``wandb.finish``
    can return before the last run's records are on disk."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [run_contents(p) for p in sorted(folder.glob("offline-run-*/*.wandb"))]
        settled = len(runs) == count and all("job_type" in r and r["summary"] for r in runs)
        if settled or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)
