"""`build_index`: PQ training, Vamana graph and the disk format, end to end."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import IndexConfig
from .disk import write_index
from .kernels import as_fp16, resolve_threads
from .pq import QUERY_EPS, train_pq
from .vamana import build_vamana

log = logging.getLogger(__name__)


@dataclass
class IndexParams:
    """Build parameters.

    R: graph degree; L: construction search list size; alpha: second-pass prune slack;
    pq_bytes: PQ bytes per vector (M subspaces); seed: makes the build deterministic (the
    same files for any thread count); threads: worker threads (None/0: all cores); queries:
    optional (nq, d) query sample for query-aware PQ (None: plain OPQ); pq_eps: its
    covariance regulariser; opq_iters and pq_train_size: PQ training effort; progress:
    tqdm bars (None: only on a terminal).
    """

    R: int = 64
    L: int = 100
    alpha: float = 1.2
    pq_bytes: int = 48
    seed: int = 0
    threads: int | None = None
    queries: np.ndarray | None = field(default=None, repr=False)
    pq_eps: float = QUERY_EPS
    opq_iters: int = 16
    pq_train_size: int = 25_000
    progress: bool | None = None

    @classmethod
    def from_config(cls, cfg: IndexConfig, **overrides) -> IndexParams:
        """Params from the project's `IndexConfig` (R, L, alpha, pq_bytes, seed)."""
        return cls(R=cfg.R, L=cfg.L, alpha=cfg.alpha, pq_bytes=cfg.pq_bytes, seed=cfg.seed, **overrides)


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

    def as_dict(self) -> dict:
        return asdict(self)


def build_index(vectors: np.ndarray, metadata: list[dict] | None, out_dir: str | Path, params: IndexParams) -> BuildStats:
    """Build a disk index of `vectors` (N, d) float16/float32 with optional per-vector
    `metadata` (N dicts) into the folder `out_dir`. Ids are 0..N-1 in input order.

    Time O(N (L + R) R d) for the graph + O(train * 256 * d * opq_iters) for PQ; memory:
    the fp16 vectors + the graph + the PQ codes.
    """
    t0 = time.perf_counter()
    X = as_fp16(vectors)
    n, d = X.shape
    if n == 0:
        raise ValueError("cannot index zero vectors")
    if not np.isfinite(X).all():
        raise ValueError("vectors contain NaN or infinity (after conversion to float16)")
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries for {n} vectors")
    if params.queries is not None and (np.ndim(params.queries) != 2 or np.shape(params.queries)[1] != d):
        raise ValueError(f"query sample must be (nq, {d}), got shape {np.shape(params.queries)}")
    threads = resolve_threads(params.threads)
    M = min(params.pq_bytes, d)
    log.info("building index of %d x %d vectors into %s (R=%d L=%d alpha=%.2f pq_bytes=%d threads=%d)",
             n, d, out_dir, params.R, params.L, params.alpha, M, threads)

    codec = train_pq(X, M, queries=params.queries, eps=params.pq_eps, opq_iters=params.opq_iters,
                     train_size=params.pq_train_size, seed=params.seed, threads=threads, progress=params.progress)
    codes = codec.encode(X, threads=threads)
    t1 = time.perf_counter()
    log.info("pq trained and encoded in %.1f s", t1 - t0)

    neighbours, degrees, medoid = build_vamana(X, params.R, params.L, params.alpha, params.seed, threads=threads,
                                               progress=params.progress)
    t2 = time.perf_counter()
    log.info("graph built in %.1f s (mean degree %.1f)", t2 - t1, float(degrees.mean()))

    info = {"R": params.R, "L": params.L, "alpha": params.alpha, "pq_bytes": M, "seed": params.seed,
            "query_aware": params.queries is not None, "medoid": int(medoid)}
    ws = write_index(out_dir, X, (neighbours, degrees), codec, codes, metadata, np.array([medoid]), info)
    t3 = time.perf_counter()
    log.info("wrote %.1f MB in %.1f s (record %d B, %d per sector, metadata budget %d B, %d spilled)",
             ws.bytes_written / 1e6, t3 - t2, ws.record_size, ws.nodes_per_sector, ws.meta_budget, ws.meta_spilled)
    return BuildStats(n, d, t1 - t0, t2 - t1, t3 - t2, t3 - t0, float(degrees.mean()), int(medoid), ws.record_size,
                      ws.nodes_per_sector, ws.meta_budget, ws.meta_spilled, ws.bytes_written)
