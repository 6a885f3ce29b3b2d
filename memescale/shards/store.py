"""Embedding shards (Parquet, zstd) and the resume manifest, on any pyarrow filesystem.

Layout of an ingest output directory::

    DIR/part-<dump>-<chunk:06d>.parquet     one file per completed input chunk
    DIR/_failed/<dump>-<chunk:06d>.parquet  its refs that failed for transient reasons (if any)
    DIR/_manifest/<dump>-<chunk:06d>.json   written after both: the chunk is done
    DIR/part-<dump>-<chunk:06d>-r<n>.parquet, _failed/...-r<n>.parquet, _manifest/...-r<n>.json
                                            the chunk's n-th retry pass (`--retry-failed`): the
                                            previous pass's transient failures tried again

A chunk is the resume unit: `chunk_posts` consecutive lines of one dump file. Its Parquet file
is written to a temporary name and renamed, then its manifest entry is written; a chunk
without a manifest entry is redone in full and its file overwritten, so a crash at any point
leaves neither gaps nor duplicates. Manifest entries are write-once objects (no appends), so
the layout works on object stores as well as local disks. A retry pass takes exactly the refs
in the failures file of the pass before it, so an image lands in at most one part file.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memescale.crashpoints import crash_point
from memescale.durable import fsync_dir, fsync_file

POST_FIELDS: list[tuple[str, pa.DataType]] = [
    ("image_id", pa.int64()),
    ("post_id", pa.string()),
    ("image_index", pa.int32()),
    ("url", pa.string()),
    ("subreddit", pa.string()),
    ("title", pa.string()),
    ("author", pa.string()),
    ("created_utc", pa.int64()),
    ("score", pa.int64()),
    ("over_18", pa.bool_()),
    ("permalink", pa.string()),
]
IMAGE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("final_url", pa.string()),
    ("mime", pa.string()),
    ("bytes", pa.int64()),
    ("content_hash", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
]


FAILED_DIR = "_failed"
# A chunk's refs that failed for a transient reason: the post fields, and why.
FAILURE_SCHEMA = pa.schema(POST_FIELDS + [("reason", pa.string())])


def shard_schema(dim: int) -> pa.Schema:
    """The embedding shard schema for `dim`-wide vectors (float16, L2-normalised)."""
    return pa.schema(
        POST_FIELDS
        + IMAGE_FIELDS
        + [("embedding", pa.list_(pa.float16(), dim)), ("model", pa.string())]
    )


def embedding_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float16 -> Arrow fixed-size list column, zero-copy on the values."""
    v = np.ascontiguousarray(vectors, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float16()), v.shape[1])


def rows_to_shard_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """Column arrays (post and image fields, `embedding` (N, D) float16, `model`) -> shard table."""
    emb = np.asarray(cols["embedding"])
    schema = shard_schema(emb.shape[1])
    arrays = [embedding_column(emb) if f.name == "embedding" else pa.array(cols[f.name], type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def embeddings_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The (N, D) float16 matrix of a shard table's embedding column."""
    col = table.column(column).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


@dataclass
class ChunkResult:
    """What one completed chunk produced: its counts are summed for the job's summary."""

    dump: str
    index: int
    first_line: int
    lines: int
    posts: int = 0  # records that passed the post filters (date, sample)
    bad_lines: int = 0
    refs: int = 0
    encoded: int = 0
    discarded: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    error: str | None = None  # the dump's read error when this chunk ended a truncated file
    complete: bool = True  # False when --limit cut the chunk short
    file: str = ""
    retry: int = 0  # 0: the chunk's pass over its dump lines; n: its n-th retry pass
    retry_file: str = ""  # this pass's transient failures (FAILED_DIR/<key>.parquet), "" if none
    retried: dict[str, int] = field(default_factory=dict)  # a retry pass: the reasons its refs had failed for

    @property
    def key(self) -> str:
        return chunk_key(self.dump, self.index) + (f"-r{self.retry}" if self.retry else "")


def chunk_key(dump: str, index: int) -> str:
    """Stable name of a chunk: the dump's file name without .zst/.ndjson, plus the index."""
    stem = PurePosixPath(dump).name
    for suffix in (".zst", ".ndjson", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return f"{stem}-{index:06d}"


class ShardStore:
    """Reads the manifest and writes chunk shards under one output URI or path."""

    def __init__(self, out: str):
        if "://" in out:
            self.fs, self.root = pafs.FileSystem.from_uri(out)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(out)

    def done(self) -> dict[str, ChunkResult]:
        """All manifest entries by chunk key. O(number of completed chunks)."""
        sel = pafs.FileSelector(f"{self.root}/_manifest", allow_not_found=True)
        out: dict[str, ChunkResult] = {}
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(".json"):
                continue
            with self.fs.open_input_stream(info.path) as f:
                r = ChunkResult(**json.loads(f.read()))
            out[r.key] = r
        return out

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _durable_move(self, tmp: str, path: str) -> None:
        """Rename a written temp file into place durably: on a local disk the file is fsync'd
        before the rename and its directory after it (an object store's completed upload is
        durable as it is)."""
        if self.local:
            fsync_file(tmp)
        crash_point("store.tmp_synced")
        self.fs.move(tmp, path)
        crash_point("store.renamed")
        if self.local:
            fsync_dir(os.path.dirname(path))

    def write_table(self, table: pa.Table, name: str, compression: str = "zstd") -> None:
        """Write `table` as the Parquet file `name` (relative to the root, may name a
        subfolder) under the root: temp file, fsync, rename, fsync of the directory. A reader
        sees the old file or the whole new one. Vector columns (fixed-size lists, the
        embeddings) are written without dictionary encoding: their values hardly repeat, and a
        dictionary that overflows into plain pages makes both the write and every later read
        several times slower."""
        folder, base = posixpath.split(name)
        where = f"{self.root}/{folder}" if folder else self.root
        if folder and self.fs.get_file_info(where).type != pafs.FileType.Directory:
            self.fs.create_dir(where, recursive=True)
            if self.local:
                fsync_dir(self.root)
        tmp = f"{where}/.{base}.tmp"
        dictionary = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]
        pq.write_table(table, tmp, filesystem=self.fs, compression=compression, use_dictionary=dictionary)
        crash_point("store.tmp_written")
        self._durable_move(tmp, f"{self.root}/{name}")

    def write_chunk(self, result: ChunkResult, table: pa.Table | None, compression: str = "zstd",
                    failures: pa.Table | None = None) -> None:
        """Write the chunk's rows (if any) and its transient failures (if any: `failures`,
        `FAILURE_SCHEMA`), then its manifest entry, each durably: the entry, which marks the
        chunk done, is on disk only after the files it names. A chunk that now has no rows
        (or no failures) removes the file an earlier attempt of it left, so the files and
        the manifest always agree."""
        self.fs.create_dir(f"{self.root}/_manifest", recursive=True)
        for name, rows, attr in ((f"part-{result.key}.parquet", table, "file"),
                                 (f"{FAILED_DIR}/{result.key}.parquet", failures, "retry_file")):
            if rows is not None and rows.num_rows:
                self.write_table(rows, name, compression)
                setattr(result, attr, name)
            elif self.fs.get_file_info(f"{self.root}/{name}").type == pafs.FileType.File:
                self.fs.delete_file(f"{self.root}/{name}")
                crash_point("store.stale_removed")
                if self.local:
                    fsync_dir(posixpath.dirname(f"{self.root}/{name}"))
        entry = f"{self.root}/_manifest/{result.key}.json"
        with self.fs.open_output_stream(entry + ".tmp") as f:
            f.write(json.dumps(result.__dict__, sort_keys=True).encode())
        crash_point("store.manifest_tmp_written")
        self._durable_move(entry + ".tmp", entry)

    def read_failures(self, result: ChunkResult) -> pa.Table:
        """The failures file a manifest entry names (`FAILURE_SCHEMA`; empty if none)."""
        if not result.retry_file:
            return FAILURE_SCHEMA.empty_table()
        return pq.read_table(f"{self.root}/{result.retry_file}", filesystem=self.fs, schema=FAILURE_SCHEMA)

    def shard_paths(self) -> list[str]:
        """Paths of every Parquet shard, sorted."""
        sel = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(
            i.path for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File and PurePosixPath(i.path).name.startswith("part-")
            and i.path.endswith(".parquet")
        )


def read_shards(out: str, columns: list[str] | None = None) -> pa.Table:
    """Every shard of an output directory as one table (small outputs: tests, tools)."""
    store = ShardStore(out)
    paths = store.shard_paths()
    if not paths:
        empty = shard_schema(1).empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables(pq.read_table(p, filesystem=store.fs, columns=columns) for p in paths)


def summarize(results: list[ChunkResult]) -> dict[str, Any]:
    """Totals over chunk results, for logs and the job's final line. A retry pass's refs
    were counted by their chunk's first pass: it adds what it encoded and replaces the
    failures it retried by its own ("retried" counts its refs, "recovered" those encoded)."""
    tot: dict[str, Any] = {"chunks": 0, "lines": 0, "posts": 0, "bad_lines": 0,
                           "refs": 0, "encoded": 0, "bytes": 0, "discarded": {}, "failed": {},
                           "errors": [], "retried": 0, "recovered": 0}
    for r in results:
        for k in ("lines", "posts", "bad_lines", "refs", "encoded", "bytes"):
            if k != "refs" or not r.retry:
                tot[k] += getattr(r, k)
        tot["chunks"] += not r.retry
        if r.retry:
            tot["retried"] += r.refs
            tot["recovered"] += r.encoded
        for k in ("discarded", "failed"):
            for reason, n in getattr(r, k).items():
                tot[k][reason] = tot[k].get(reason, 0) + n
        for reason, n in r.retried.items():
            tot["failed"][reason] = tot["failed"].get(reason, 0) - n
        if r.error:
            tot["errors"].append(f"{r.dump}: {r.error}")
    tot["failed"] = {k: n for k, n in tot["failed"].items() if n}
    return tot
