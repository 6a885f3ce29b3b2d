"""Embedding shards -> one build corpus on local disk: a vector matrix and the node metadata.

The index build needs random access to every vector (graph construction, re-ranking,
merging) while holding only one block in RAM, so the shards' `embedding` columns are streamed
once into `WORK/corpus/vectors.npy` (float16, memory-mapped) and the per-node metadata the
index stores into `WORK/corpus/meta.parquet` (row groups of META_ROW_GROUP rows, so a read by
node id decodes one row group). Node id = row number in that order (shards sorted by path,
rows in file order). Any pyarrow filesystem path or URI is accepted as input.

WORK/corpus/ is a fingerprinted phase (`memescale.build.fingerprint.Phase`): it is reused
only when the shards' paths, sizes and row counts, the fields and `skip_duplicates` are the
ones it was collected from; anything else collects it again.

Curated shards keep their duplicates for inspection (`dup_of` set); the index is built from
the rows without `dup_of` only. Collecting takes time O(N d) and memory O(one record batch +
one metadata row group), independent of N; the metadata is never held whole in RAM (read it
by ids with `Corpus.metadata`, in node order with `Corpus.metadata_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from memescale.build.fingerprint import Phase, input_fingerprint, phase_fingerprint
from memescale.shards.store import ShardStore

log = logging.getLogger(__name__)

# Metadata a search result needs, stored in each node's record (quality scores when present).
NODE_FIELDS = ["image_id", "url", "title", "subreddit", "permalink", "created_utc", "score",
               "width", "height", "over_18"]
QUALITY_FIELDS = ["meme", "aesthetic", "useful"]
# Columns the curate step adds (memescale/curate/decide.py); the optional ones are indexed when present.
CURATE_FIELDS = ["nsfw", "dup_of"] + QUALITY_FIELDS
OPTIONAL_NODE_FIELDS = QUALITY_FIELDS + ["nsfw"]

CORPUS_PHASE = "corpus"  # WORK/corpus/
VECTORS_FILE = "vectors.npy"
META_FILE = "meta.parquet"
META_ROW_GROUP = 65536  # rows per row group of meta.parquet: the unit a read by id decodes
# Parquet is read through a buffer of this size without pre-buffering: pyarrow's default
# (pre_buffer=True) holds every column chunk of a row group in memory, O(row group) bytes.
READ_BUFFER = 1 << 20
CORPUS_LAYOUT = 1  # part of the corpus fingerprint: bump when the files' layout changes


@dataclass
class Corpus:
    """A collected corpus: `vectors` (N, d) float16 memmap of WORK/corpus/vectors.npy and the
    metadata in `meta_path` (WORK/corpus/meta.parquet, N rows in node order, read on demand).

    `work_dir`: WORK; `fingerprint`: the corpus phase's fingerprint (the parent of every
    phase computed from it); `reused`: the corpus was already collected in WORK.
    """

    vectors: np.ndarray
    meta_path: Path
    work_dir: Path
    fingerprint: str = ""
    reused: bool = False

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def schema(self) -> pa.Schema:
        """The metadata's Arrow schema (read from the footer)."""
        return pq.read_schema(self.meta_path)

    def rows(self, ids: Sequence[int] | np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Rows `ids` (node ids, any order, repeats allowed) of the metadata as a table in
        that order; `columns`: those only (default all). Decodes only the row groups holding
        an id. Memory O(len(ids) + one row group). Raises IndexError for an id outside [0, N)."""
        ids = np.asarray(ids, np.int64).ravel()
        pf = _open_meta(self.meta_path)
        md = pf.metadata
        if ids.size and (ids.min() < 0 or ids.max() >= md.num_rows):
            raise IndexError(f"node ids must be in [0, {md.num_rows}), got {ids.min()}..{ids.max()}")
        order = np.argsort(ids, kind="stable")
        sids = ids[order]
        bounds = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
        cuts = np.searchsorted(sids, bounds)  # sids[cuts[g]:cuts[g + 1]] lie in row group g
        parts = []
        for g in np.flatnonzero(np.diff(cuts)):
            local = sids[cuts[g]:cuts[g + 1]] - bounds[g]
            parts.append(pf.read_row_group(int(g), columns=columns).take(pa.array(local)))
        if not parts:
            schema = pf.schema_arrow
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        table = pa.concat_tables(parts)
        if np.any(np.diff(order) != 1):  # back to the order asked for
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            table = table.take(pa.array(inverse))
        return table

    def metadata(self, ids: Sequence[int] | np.ndarray | None = None,
                 columns: list[str] | None = None) -> list[dict]:
        """The metadata rows `ids` (node ids, any order) as dicts, in that order (`rows`):
        memory O(len(ids) + one row group). `ids=None`: every row, N Python dicts -- for small
        corpora and tests only; the build streams `metadata_batches` or `meta_path` instead."""
        if ids is None:
            return pq.read_table(self.meta_path, columns=columns).to_pylist()
        return self.rows(ids, columns).to_pylist()

    def metadata_batches(self, block: int = 65536, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Every metadata row in node order, as record batches of at most `block` rows
        (`columns` only, default all). Memory O(block + one row group)."""
        yield from _open_meta(self.meta_path).iter_batches(batch_size=block, columns=columns, use_threads=False)

    def column(self, name: str, ids: Sequence[int] | np.ndarray | None = None) -> pa.ChunkedArray:
        """One metadata column: for node ids `ids` (any order; memory O(len(ids) + one row
        group)), or, when `ids` is None, for all N rows (memory O(N): ask for it only where a
        whole column is meant to be in RAM)."""
        if ids is None:
            return pq.read_table(self.meta_path, columns=[name]).column(name)
        return self.rows(ids, [name]).column(name)


class RowDicts(Sequence[dict]):
    """The rows of a table or record batch as dicts, each made when it is accessed (the
    `Sequence[Mapping]` that `memescale.index.weighting` reads) instead of all at once.

    Integer, float and bool columns are held as numpy arrays plus a validity mask (9 bytes
    per row and column, null -> None), other columns as Python lists: for numeric columns the
    memory is O(rows x columns x 9 B), not one dict per row.
    """

    def __init__(self, table: pa.Table | pa.RecordBatch) -> None:
        self._n = table.num_rows
        self._names = list(table.column_names)
        self._cols: list[tuple[np.ndarray | list, np.ndarray | None]] = []
        for name in self._names:
            col = table.column(name)
            t = col.type
            if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                valid = None if col.null_count == 0 else pc.is_valid(col).to_numpy(zero_copy_only=False)
                filled = col if valid is None else pc.fill_null(col, pa.scalar(False if pa.types.is_boolean(t) else 0, t))
                self._cols.append((filled.to_numpy(zero_copy_only=False), valid))
            else:
                self._cols.append((col.to_pylist(), None))

    def __len__(self) -> int:
        return self._n

    def _row(self, i: int) -> dict:
        out: dict = {}
        for name, (values, valid) in zip(self._names, self._cols):
            if valid is not None and not valid[i]:
                out[name] = None
            else:
                v = values[i]
                out[name] = v.item() if isinstance(v, np.generic) else v
        return out

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._row(i)

    def __iter__(self) -> Iterator[dict]:
        return (self._row(i) for i in range(self._n))


def _open_meta(path: Path) -> pq.ParquetFile:
    return pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)


def shard_dataset(embeddings: str) -> pads.Dataset:
    """The Parquet shards of an ingest (or curate) output directory as one dataset."""
    store = ShardStore(embeddings)
    paths = store.shard_paths()
    if not paths:
        raise FileNotFoundError(f"no part-*.parquet shards under {embeddings}")
    return pads.dataset(paths, format="parquet", filesystem=store.fs)


def _embedding_matrix(column: pa.Array, dim: int) -> np.ndarray:
    """(n, dim) array of a FixedSizeList column slice. `.flatten()` honours the slice's
    offset (`.values` would be the whole parent buffer of a batch cut from a larger row group)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} rows have no embedding")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


def _open(phase: Phase, work: Path, reused: bool) -> Corpus:
    return Corpus(np.load(phase.dir / VECTORS_FILE, mmap_mode="r"), phase.dir / META_FILE, work,
                  phase.fingerprint, reused)


def _shards_and_fields(embeddings: str, fields: list[str] | None) -> tuple[ShardStore, list, pa.Schema, list[str]]:
    """(store, shard paths, the first shard's schema, the metadata fields: `fields` or the
    default NODE_FIELDS plus the OPTIONAL_NODE_FIELDS that shard has)."""
    store = ShardStore(embeddings)
    paths = store.shard_paths()
    if not paths:
        raise FileNotFoundError(f"no part-*.parquet shards under {embeddings}")
    first = pq.read_schema(paths[0], filesystem=store.fs)
    if fields is None:
        fields = NODE_FIELDS + [f for f in OPTIONAL_NODE_FIELDS if f in first.names]
    return store, paths, first, list(fields)


def node_batches(embeddings: str, batch_rows: int = 16384, fields: list[str] | None = None,
                 skip_duplicates: bool = True) -> Iterator[pa.Schema | tuple[np.ndarray, pa.Table]]:
    """Stream the shards' rows as the index takes them: first the metadata schema, then per
    batch (vectors (m, d) float16, metadata Table of `fields` cast to that schema).

    `fields` and `skip_duplicates` as in `collect_corpus`; shards in path order, rows in file
    order, at most `batch_rows` per batch (input row groups of any size). Memory
    O(batch_rows d), no per-row Python object."""
    store, paths, first, fields = _shards_and_fields(embeddings, fields)
    missing = [f for f in fields if f not in first.names]
    if missing:
        raise KeyError(f"fields {missing} are not in the shards' schema")
    schema = pa.schema([first.field(f) for f in fields])
    dim = first.field("embedding").type.list_size
    skip = skip_duplicates and "dup_of" in first.names
    yield schema
    for path in paths:
        pa.default_memory_pool().release_unused()  # the last file's freed buffers back to the OS
        pf = pq.ParquetFile(path, filesystem=store.fs, buffer_size=READ_BUFFER, pre_buffer=False)
        have = set(pf.schema_arrow.names)
        read = ["embedding"] + [f for f in fields if f in have] + (["dup_of"] if skip and "dup_of" in have else [])
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(read)), use_threads=False):
            if skip and "dup_of" in have:
                batch = batch.filter(pc.is_null(batch.column("dup_of")))
            m = batch.num_rows
            if m == 0:
                continue
            vecs = _embedding_matrix(batch.column("embedding"), dim)
            if vecs.dtype != np.float16:
                vecs = vecs.astype(np.float16)
            cols = [batch.column(f) if f in have else pa.nulls(m, schema.field(f).type) for f in fields]
            cols = [c if c.type == schema.field(f).type else c.cast(schema.field(f).type) for f, c in zip(fields, cols)]
            yield vecs, pa.Table.from_arrays(cols, schema=schema)


def collect_corpus(embeddings: str, work_dir: str | Path, batch_rows: int = 16384,
                   fields: list[str] | None = None, skip_duplicates: bool = True) -> Corpus:
    """Stream the shards into WORK/corpus/ (`work_dir` = WORK) and return the corpus.

    `fields`: metadata columns to keep (default NODE_FIELDS plus the OPTIONAL_NODE_FIELDS
    present in the first shard; a shard without a field gets nulls). `skip_duplicates`: leave
    out rows whose `dup_of` is set (when the column exists). Reused (`Corpus.reused`) when
    WORK/corpus/ was collected with the same fingerprint (`memescale.build.fingerprint`:
    the shards' paths, sizes and row counts + fields + skip_duplicates); otherwise collected
    anew. Input row groups of any size work: shards are read `batch_rows` rows at a time.
    Time O(N d); memory O(batch_rows d + META_ROW_GROUP rows), no per-row Python object.
    """
    work = Path(work_dir)
    store, paths, first, fields = _shards_and_fields(embeddings, fields)
    skip = skip_duplicates and "dup_of" in first.names
    phase = Phase(work, CORPUS_PHASE, phase_fingerprint(input_fingerprint(embeddings), fields=fields,
                                                      skip_duplicates=skip, layout=CORPUS_LAYOUT))
    if phase.is_complete():
        corpus = _open(phase, work, True)
        log.info("corpus reused", extra={"n": len(corpus), "work_dir": str(work)})
        return corpus

    dim = first.field("embedding").type.list_size
    ds = pads.dataset(paths, format="parquet", filesystem=store.fs)
    n = ds.count_rows(filter=pads.field("dup_of").is_null()) if skip else ds.count_rows()
    batches = node_batches(embeddings, batch_rows, fields, skip_duplicates)
    schema = next(batches)  # checks the fields
    assert isinstance(schema, pa.Schema)
    phase.start()
    vectors = np.lib.format.open_memmap(phase.dir / VECTORS_FILE, mode="w+", dtype=np.float16, shape=(n, dim))
    row = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(phase.dir / META_FILE, schema, compression="zstd") as writer:
        for vecs, table in batches:
            m = table.num_rows
            if row + m > n:
                raise RuntimeError(f"the shards changed while being collected: more than {n} rows")
            vectors[row:row + m] = vecs
            row += m
            pending.append(table)
            pending_rows += m
            while pending_rows >= META_ROW_GROUP:
                table = pa.concat_tables(pending)
                writer.write_table(table.slice(0, META_ROW_GROUP), row_group_size=META_ROW_GROUP)
                rest = table.slice(META_ROW_GROUP)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
                del table
                pa.default_memory_pool().release_unused()
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=META_ROW_GROUP)
    if row != n:
        raise RuntimeError(f"collected {row} rows, the shards held {n} when counted: they changed meanwhile")
    vectors.flush()
    del vectors
    pa.default_memory_pool().release_unused()
    phase.finish(rows=n, dim=dim, fields=fields, skip_duplicates=skip, inputs=len(paths))
    log.info("corpus collected", extra={"n": n, "dim": dim, "work_dir": str(work)})
    return _open(phase, work, False)
