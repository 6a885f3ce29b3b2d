"""`build_index`: PQ training, Vamana graph and the disk format, end to end.

The steps every index build shares, whether in one process (`build_index`) or sharded
(`memescale.build.stages`): `check_build_inputs` (what may be indexed), `train_codec` (PQ
training and encoding) and `write_built_index` (the files and their build information).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import IndexConfig
from ..durable import fsync_tree
from .disk import MetadataSource, WriteStats, write_index
from .kernels import as_fp16, int8_scale, int8_stride, quantize_int8, resolve_threads
from .pq import QUERY_EPS, PQCodec, train_pq
from .vamana import build_vamana, nav_dsub_for

log = logging.getLogger(__name__)


@dataclass
class IndexParams:
    """Build parameters.

    R: graph degree; L: construction search list size; alpha: second-pass prune slack;
    pq_bytes: PQ bytes per vector (M subspaces); build_pq_bytes: navigation codes of the
    construction searches (0: exact distances; `IndexConfig.build_pq_bytes`); seed: makes
    the build deterministic (the same files for any thread count); threads: worker threads (None/0: all cores); queries:
    optional (nq, d) query sample for query-aware PQ (None: plain OPQ); pq_eps: its
    covariance regulariser; opq_iters and pq_train_size: PQ training effort; progress:
    tqdm bars (None: only on a terminal). R, L, alpha, pq_bytes and seed default to
    `IndexConfig`'s defaults.
    """

    R: int = IndexConfig.R
    L: int = IndexConfig.L
    alpha: float = IndexConfig.alpha
    pq_bytes: int = IndexConfig.pq_bytes
    build_pq_bytes: int = IndexConfig.build_pq_bytes
    seed: int = IndexConfig.seed
    threads: int | None = None
    queries: np.ndarray | None = field(default=None, repr=False)
    pq_eps: float = QUERY_EPS
    opq_iters: int = 16
    pq_train_size: int = 25_000
    progress: bool | None = None

    @classmethod
    def from_config(cls, cfg: IndexConfig, **overrides) -> IndexParams:
        """Params from the project's `IndexConfig` (R, L, alpha, pq_bytes, build_pq_bytes, seed)."""
        return cls(R=cfg.R, L=cfg.L, alpha=cfg.alpha, pq_bytes=cfg.pq_bytes, build_pq_bytes=cfg.build_pq_bytes,
                   seed=cfg.seed, **overrides)


@dataclass
class BuildStats:
    """Where a build spent its time and what it produced."""

    count: int
    dim: int
    pq_seconds: float
    graph_seconds: float
    write_seconds: float
    total_seconds: float
    mean_degree: float
    medoid: int
    record_size: int
    nodes_per_sector: int
    meta_budget: int
    meta_spilled: int
    bytes_written: int
    pq_eta: float  # the codec's score-aware weight (`pq.choose_eta` with a query sample)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_query_sample(queries: np.ndarray | None, d: int) -> None:
    if queries is not None and (np.ndim(queries) != 2 or np.shape(queries)[1] != d):
        raise ValueError(f"query sample must be (nq, {d}), got shape {np.shape(queries)}")


def check_build_inputs(vectors: np.ndarray, metadata: Sized | None = None, queries: np.ndarray | None = None,
                       block: int = 65536) -> None:
    """Refuse what no index build accepts, with the same ValueError on every path.

    vectors: (N, d) float16 (as stored: call `as_fp16` first), in memory or memory-mapped;
    N >= 1 and every value finite. metadata: anything with len() == N (a list of dicts, a
    pyarrow Table) or None. queries: a (nq, d) query sample or None. Time O(N d), memory
    O(block d) (the finiteness scan reads `block` rows at a time).
    """
    if np.ndim(vectors) != 2:
        raise ValueError(f"vectors must be 2-D (N, d), got shape {np.shape(vectors)}")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot index zero vectors")
    for lo in range(0, n, block):
        if not np.isfinite(vectors[lo:lo + block]).all():
            raise ValueError("vectors contain NaN or infinity (after conversion to float16)")
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries for {n} vectors")
    _check_query_sample(queries, d)


def train_codec(vectors: np.ndarray, params: IndexParams, codes_path: str | os.PathLike | None = None
                ) -> tuple[PQCodec, np.ndarray]:
    """Train the PQ codec on a sample of `vectors` (N, d) float16, in memory or memory-mapped
    (query-aware when `params.queries`), and encode every vector block by block.
    M = min(params.pq_bytes, d) bytes per vector.

    Returns (codec, codes (N, M) uint8): in memory, or with `codes_path` a read-only memmap
    of the .npy written there (through a temporary file, renamed when complete).
    Deterministic for params.seed at any thread count. Time O(train * 256 * d * opq_iters)
    + O(N * 256 * d) for the codes; memory O(train * d) plus the codes unless `codes_path`.
    """
    d = vectors.shape[1]
    _check_query_sample(params.queries, d)
    threads = resolve_threads(params.threads)
    codec = train_pq(vectors, min(params.pq_bytes, d), queries=params.queries, eps=params.pq_eps,
                     opq_iters=params.opq_iters, train_size=params.pq_train_size, seed=params.seed, threads=threads,
                     progress=params.progress)
    block = max(1024, (16 << 20) // (8 * codec.M * codec.dsub))  # 16 MiB of transformed rows (Y, Z)
    if codes_path is None:
        return codec, codec.encode(vectors, threads=threads, block=block)
    path = Path(codes_path)
    tmp = path.with_name(path.stem + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(vectors), codec.M))
    codec.encode(vectors, threads=threads, block=block, out=out)
    out.flush()
    del out
    os.replace(tmp, path)
    return codec, np.load(path, mmap_mode="r")


def build_info(params: IndexParams, codec: PQCodec, **extra) -> dict:
    """The build information an index stores in arrays.bin: R, L, alpha, pq_bytes (the codec's
    M), seed, query_aware and pq_eta (the codec's: trained with a query sample, and its
    score-aware weight; so a consolidation, which trains no codec, keeps them), then `extra`
    (JSON-like) in the order given."""
    return {"R": params.R, "L": params.L, "alpha": params.alpha, "pq_bytes": codec.M, "seed": params.seed,
            "query_aware": codec.query_predictor is not None, "pq_eta": codec.eta, **extra}


def write_built_index(out_dir: str | os.PathLike, vectors: np.ndarray, graph: tuple[np.ndarray, np.ndarray],
                      codec: PQCodec, codes: np.ndarray, metadata: MetadataSource, entry_points: np.ndarray,
                      params: IndexParams, **extra) -> WriteStats:
    """Write the index folder (`disk.write_index`) with `build_info(params, codec, **extra)`.

    vectors: (N, d) float16; graph: (neighbours (N, R) int32, degrees (N,) int32); codes:
    (N, M) uint8 (any of them memory-mapped); metadata: what `disk.write_index` takes (N dicts,
    a Parquet path, record batches) or None; entry_points: (E,) node ids. O(N record_size) I/O.
    """
    return write_index(out_dir, vectors, graph, codec, codes, metadata, np.asarray(entry_points, np.int64),
                       build_info(params, codec, **extra))


def build_index(vectors: np.ndarray, metadata: list[dict] | None, out_dir: str | os.PathLike,
                params: IndexParams) -> BuildStats:
    """Build a disk index of `vectors` (N, d) float16/float32 with optional per-vector
    `metadata` (N dicts) into the folder `out_dir`. Ids are 0..N-1 in input order.

    Time O(N (L + R) R d) for the graph + O(train * 256 * d * opq_iters) for PQ; memory:
    the fp16 vectors + their int8 copy the graph is built over + the graph + the PQ codes.
    """
    t0 = time.perf_counter()
    X = as_fp16(vectors)
    check_build_inputs(X, metadata, params.queries)
    n, d = X.shape
    threads = resolve_threads(params.threads)
    log.info("building index of %d x %d vectors into %s (R=%d L=%d alpha=%.2f pq_bytes=%d threads=%d)",
             n, d, out_dir, params.R, params.L, params.alpha, min(params.pq_bytes, d), threads)

    codec, codes = train_codec(X, params)
    t1 = time.perf_counter()
    log.info("pq trained and encoded in %.1f s", t1 - t0)

    # the graph is built over int8 rows (as a sharded build's tasks do): half the bytes per distance
    X8 = quantize_int8(X, int8_scale(X[::int8_stride(n)]))
    nav_dsub = nav_dsub_for(d, params.build_pq_bytes, n)
    neighbours, degrees, medoid = build_vamana(X8, params.R, params.L, params.alpha, params.seed, threads=threads,
                                               progress=params.progress, nav_dsub=nav_dsub)
    del X8
    t2 = time.perf_counter()
    log.info("graph built in %.1f s (mean degree %.1f)", t2 - t1, float(degrees.mean()))

    ws = write_built_index(out_dir, X, (neighbours, degrees), codec, codes, metadata, np.array([medoid]), params,
                           medoid=int(medoid))
    fsync_tree(out_dir)
    t3 = time.perf_counter()
    log.info("wrote %.1f MB in %.1f s (record %d B, %d per sector, metadata budget %d B, %d spilled)",
             ws.bytes_written / 1e6, t3 - t2, ws.record_size, ws.nodes_per_sector, ws.meta_budget, ws.meta_spilled)
    return BuildStats(n, d, t1 - t0, t2 - t1, t3 - t2, t3 - t0, float(degrees.mean()), int(medoid), ws.record_size,
                      ws.nodes_per_sector, ws.meta_budget, ws.meta_spilled, ws.bytes_written, codec.eta)
