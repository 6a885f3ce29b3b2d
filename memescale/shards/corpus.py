"""Embedding shards -> one build corpus on local disk: a vector matrix and the node metadata.

The index build needs random access to every vector (graph construction, re-ranking,
merging) while holding only one shard's worth in RAM, so the shards' `embedding` columns are
streamed once into `WORK/vectors.npy` (float16, memory-mapped) and the per-node metadata the
index stores into `WORK/meta.parquet`. Node id = row number in that order (shards sorted by
path, rows in file order). Any pyarrow filesystem path or URI is accepted as input.
Curated shards keep their duplicates for inspection (`dup_of` set); the index is built from
the rows without `dup_of` only. Time O(N d), memory O(one record batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from memescale.shards.store import ShardStore

log = logging.getLogger(__name__)

# Metadata a search result needs, stored in each node's record (quality scores when present).
NODE_FIELDS = ["image_id", "url", "title", "subreddit", "permalink", "created_utc", "score",
               "width", "height", "over_18"]
QUALITY_FIELDS = ["meme", "aesthetic", "useful"]
# Columns the curate step adds (memescale/curate/decide.py); the optional ones are indexed when present.
CURATE_FIELDS = ["nsfw", "dup_of"] + QUALITY_FIELDS
OPTIONAL_NODE_FIELDS = QUALITY_FIELDS + ["nsfw"]


@dataclass
class Corpus:
    """`vectors`: (N, d) float16 memmap; `meta`: table of NODE_FIELDS (+ quality) in node order."""

    vectors: np.ndarray
    meta: pa.Table
    work_dir: Path

    def __len__(self) -> int:
        return len(self.vectors)

    def metadata(self, ids: np.ndarray | None = None) -> list[dict]:
        t = self.meta if ids is None else self.meta.take(pa.array(ids))
        return t.to_pylist()


def shard_dataset(embeddings: str) -> pads.Dataset:
    """The Parquet shards of an ingest (or curate) output directory as one dataset."""
    store = ShardStore(embeddings)
    paths = store.shard_paths()
    if not paths:
        raise FileNotFoundError(f"no part-*.parquet shards under {embeddings}")
    return pads.dataset(paths, format="parquet", filesystem=store.fs)


def collect_corpus(embeddings: str, work_dir: str | Path, batch_rows: int = 65536,
                   fields: list[str] | None = None, skip_duplicates: bool = True) -> Corpus:
    """Stream the shards into `work_dir` (reused when already complete there).

    `fields`: metadata columns to keep (default NODE_FIELDS plus the OPTIONAL_NODE_FIELDS
    present). `skip_duplicates`: leave out rows whose `dup_of` is set (when the column exists).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    vec_path, meta_path = work / "vectors.npy", work / "meta.parquet"
    if vec_path.exists() and meta_path.exists():
        vectors = np.load(vec_path, mmap_mode="r")
        meta = pq.read_table(meta_path)
        if len(vectors) == meta.num_rows:
            log.info("corpus already collected", extra={"n": len(vectors), "work_dir": str(work)})
            return Corpus(vectors, meta, work)
    ds = shard_dataset(embeddings)
    names = set(ds.schema.names)
    if fields is None:
        fields = NODE_FIELDS + [f for f in OPTIONAL_NODE_FIELDS if f in names]
    where = pads.field("dup_of").is_null() if skip_duplicates and "dup_of" in names else None
    n = ds.count_rows(filter=where)
    dim = ds.schema.field("embedding").type.list_size
    tmp = work / "vectors.tmp.npy"
    vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    metas, row = [], 0
    for batch in ds.to_batches(columns=["embedding"] + fields, filter=where, batch_size=batch_rows):
        emb = batch.column("embedding")
        vectors[row:row + len(batch)] = emb.values.to_numpy(zero_copy_only=False).reshape(len(batch), dim)
        metas.append(pa.Table.from_batches([batch.drop_columns(["embedding"])]))
        row += len(batch)
    vectors.flush()
    del vectors
    tmp.rename(vec_path)
    meta = pa.concat_tables(metas) if metas else pa.table({f: [] for f in fields})
    pq.write_table(meta, meta_path, compression="zstd")
    log.info("corpus collected", extra={"n": n, "dim": dim, "work_dir": str(work)})
    return Corpus(np.load(vec_path, mmap_mode="r"), meta, work)
