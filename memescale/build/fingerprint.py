"""Fingerprints of a build's inputs and phases, and the phase folders they key.

Every phase of the build writes its output into its own folder WORK/<name>/ and, last, a
`fingerprint.json` naming what the output was made from: the fingerprint of its parent (the
inputs, or the phase it read) and the parameters that shape its output. A rerun reuses a
phase only when that file exists and holds the same fingerprint; otherwise the folder is
cleared and the phase redone. So adding a Parquet shard, or changing a parameter, redoes the
phases downstream of the change and nothing else.

    input_fingerprint(embeddings)          Parquet paths, sizes and row counts (footers only)
    phase_fingerprint(parent, **params)    sha256 of the canonical JSON of parent + params
    Phase(work, name, fingerprint)         WORK/<name>/: is_complete, start (or resume), finish

Nothing here reads row data or imports Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from memescale.shards.store import ShardStore

FINGERPRINT_FILE = "fingerprint.json"
STARTED_FILE = "started.json"  # `Phase.resume`: the fingerprint a partial output was begun with


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def input_files(embeddings: str) -> list[tuple[str, int, int]]:
    """(path, size in bytes, rows) of every Parquet shard under `embeddings` (any pyarrow
    filesystem path or URI), sorted by path. Row counts come from the footers: no row data is
    read. O(files) footer reads. Raises FileNotFoundError when there is no shard."""
    store = ShardStore(embeddings)
    paths = store.shard_paths()
    if not paths:
        raise FileNotFoundError(f"no part-*.parquet shards under {embeddings}")
    infos = store.fs.get_file_info(paths)
    return [(p, int(info.size), int(pq.read_metadata(p, filesystem=store.fs).num_rows))
            for p, info in zip(paths, infos)]


def input_fingerprint(embeddings: str) -> str:
    """sha256 hex of the shards' (path, size, rows) list (`input_files`): it changes when a
    shard is added, removed, renamed or rewritten with another size or row count."""
    return _digest({"inputs": [list(f) for f in input_files(embeddings)]})


def phase_fingerprint(parent: str, **params: Any) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no whitespace) of `parent` (the
    fingerprint this phase's input has) and `params` (JSON values: what shapes the output)."""
    return _digest({"parent": parent, "params": params})


class Phase:
    """The folder WORK/<name>/ of one phase, keyed by `fingerprint`.

    `is_complete()`: the folder holds a finished output of this fingerprint. `start()`:
    clear whatever the folder holds and create it empty. `finish(**info)`: write
    fingerprint.json (the fingerprint and `info`, JSON values) atomically, as the phase's last
    write: a phase interrupted before it is redone by the next run.
    """

    def __init__(self, work: str | os.PathLike, name: str, fingerprint: str) -> None:
        self.work = Path(work)
        self.name = name
        self.fingerprint = fingerprint
        self.dir = self.work / name

    def __repr__(self) -> str:
        return f"Phase({str(self.dir)!r}, {self.fingerprint[:12]})"

    @property
    def _file(self) -> Path:
        return self.dir / FINGERPRINT_FILE

    def recorded(self) -> dict | None:
        """The content of fingerprint.json ({"fingerprint": ..., "info": {...}}), or None
        when there is none or it cannot be read."""
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_complete(self) -> bool:
        rec = self.recorded()
        return rec is not None and rec.get("fingerprint") == self.fingerprint

    def info(self) -> dict:
        """The `info` given to `finish` (empty when the phase is not complete)."""
        rec = self.recorded()
        return dict(rec.get("info", {})) if rec and rec.get("fingerprint") == self.fingerprint else {}

    def start(self) -> Path:
        """Remove the folder (a stale or partial output) and create it empty; returns it."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        return self.dir

    def resume(self) -> Path:
        """The folder for a phase whose output is made of parts that are each written whole
        (the shard graphs): kept with its parts when an earlier run started it with this
        fingerprint (its STARTED_FILE says so), else cleared as by `start`; returns it."""
        started = self.dir / STARTED_FILE
        try:
            same = json.loads(started.read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            self.start()
            tmp = started.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint}))
            os.replace(tmp, started)
        return self.dir

    def finish(self, **info: Any) -> None:
        """Mark the phase complete: fingerprint.json written to a temporary file, synced and
        renamed, so it exists only whole and only after every output written before it."""
        tmp = self._file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "info": info}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)
