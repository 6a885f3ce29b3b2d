"""The update log: inserts and deletes made to one index generation, durable before they count.

File ``updates/wal-<generation>.log``: a 16-byte header (magic ``MSIXWAL\\0``, format version,
generation) and then frames, each ``<u32 length><u32 CRC-32 of the payload><payload>``, the
payload a msgpack map with an ``op``:

- ``insert``: ``image_ids`` (n int64 bytes), ``vectors`` (n x dim fp16 bytes, at the index
  width: weighting columns included), ``dim``, ``meta`` (n msgpack blobs, the node metadata);
- ``delete``: ``image_ids`` (n int64 bytes, the images taken down);
- ``commit``: closes a transaction: the frames since the previous commit take effect
  together, or (when the commit frame is missing or torn) not at all.

`UpdateLog.append` writes a transaction's frames and its commit and fsyncs the file before
returning: an operation is durable when the command reports it. A crash mid-transaction
leaves a tail that readers ignore and the next writer cuts off (`UpdateLog.open`), so the
log always holds whole operations. Readers (`read_committed`) parse frames from any byte
offset up to the last commit, so a searcher can follow the log as it grows.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..crashpoints import crash_point
from ..durable import fsync_dir
from .disk import IndexFormatError

MAGIC_WAL = b"MSIXWAL\x00"
WAL_VERSION = 1
_HEAD = struct.Struct("<8sII")
_FRAME = struct.Struct("<II")
MAX_FRAME = 1 << 30  # a larger length is corruption, not data
OPS = ("insert", "delete")


def wal_path(index_dir: str | os.PathLike, generation: int) -> Path:
    """updates/wal-<generation>.log of the index folder."""
    return Path(index_dir) / "updates" / f"wal-{generation:06d}.log"


@dataclass
class Committed:
    """The committed operations of a log read from some offset: `ops` in log order and the
    byte offset just past the last commit (where the next read starts)."""

    ops: list[dict[str, Any]]
    end: int


def _read_header(path: Path, f, generation: int | None) -> int:
    raw = f.read(_HEAD.size)
    if len(raw) < _HEAD.size:
        raise IndexFormatError(path, "truncated header")
    magic, version, gen = _HEAD.unpack(raw)
    if magic != MAGIC_WAL:
        raise IndexFormatError(path, f"bad magic {magic!r}: not an update log")
    if version != WAL_VERSION:
        raise IndexFormatError(path, f"unsupported update log version {version}")
    if generation is not None and gen != generation:
        raise IndexFormatError(path, f"log of generation {gen}, expected {generation}")
    return gen


def _frames(f, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset past the frame, payload) of the whole, valid frames from `start` on; stops
    at the first torn or corrupt one."""
    f.seek(start)
    at = start
    while True:
        head = f.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        length, crc = _FRAME.unpack(head)
        if length > MAX_FRAME:
            return
        payload = f.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return
        if not isinstance(obj, dict) or obj.get("op") not in (*OPS, "commit"):
            return
        at += _FRAME.size + length
        yield at, obj


def read_committed(path: str | os.PathLike, start: int = 0, generation: int | None = None) -> Committed:
    """The committed operations from byte `start` (0: the beginning) of the log at `path`;
    a missing log has none. Memory: the operations read."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Committed([], max(start, _HEAD.size))
    with f:
        _read_header(path, f, generation)
        ops: list[dict[str, Any]] = []
        txn: list[dict[str, Any]] = []
        end = max(start, _HEAD.size)
        for at, obj in _frames(f, end):
            if obj["op"] == "commit":
                ops.extend(txn)
                txn = []
                end = at
            else:
                txn.append(obj)
        return Committed(ops, end)


class UpdateLog:
    """The log open for appending (one writer at a time: the caller holds the update lock)."""

    def __init__(self, path: Path, f):
        self.path = path
        self.f = f

    @classmethod
    def open(cls, path: str | os.PathLike, generation: int) -> UpdateLog:
        """Open (creating it if needed) the log of `generation` and cut off any uncommitted tail."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size < _HEAD.size:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(_HEAD.pack(MAGIC_WAL, WAL_VERSION, generation))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        end = read_committed(path, 0, generation).end
        out = open(path, "r+b")
        if os.fstat(out.fileno()).st_size != end:
            out.truncate(end)
            os.fsync(out.fileno())
            crash_point("wal.truncated")
        out.seek(end)
        return cls(path, out)

    def append(self, ops: list[dict[str, Any]]) -> int:
        """Write `ops` (each a dict with an ``op`` of OPS) as one transaction, fsync, and
        return the log's new committed end offset."""
        for op in ops:
            if op.get("op") not in OPS:
                raise ValueError(f"unknown log operation {op.get('op')!r}")
        for op in [*ops, {"op": "commit"}]:
            payload = msgpack.packb(op, use_bin_type=True)
            if len(payload) > MAX_FRAME:
                raise ValueError(f"a log frame of {len(payload)} bytes is over {MAX_FRAME}: split the operation")
            self.f.write(_FRAME.pack(len(payload), zlib.crc32(payload)))
            self.f.flush()
            crash_point("wal.frame_head")
            self.f.write(payload)
            self.f.flush()
            crash_point("wal.frame")
        os.fsync(self.f.fileno())
        crash_point("wal.fsync")
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> UpdateLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
