"""Merge per-shard Vamana graphs into one graph over all nodes (sharded build).

Each node sits in `overlap` shards (2), so it has that many out-lists, each over global ids.
Its merged out-list is their union, re-pruned to R with the same robust_prune (and alpha) as
the per-shard builds: the overlap's cross-shard edges survive where they are useful, and no
node keeps 2R neighbours. Time O(N * overlap * R * R * d) worst case; memory
N * overlap * R * 4 bytes for the union.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import as_fp16, parallel_for, resolve_threads, squared_norms
from .vamana import _prune_to_degree as prune_to_degree


@njit(nogil=True, cache=True)
def _union_rows(union, degrees, rows, local_nbrs, local_deg, shard_ids):
    """Append shard-local out-lists (mapped to global ids) to the rows of `union`, skipping
    ids already present. rows: (n,) global ids of the shard's nodes in local order."""
    for i in range(rows.shape[0]):
        u = rows[i]
        for t in range(local_deg[i]):
            v = shard_ids[local_nbrs[i, t]]
            dup = False
            for s in range(degrees[u]):
                if union[u, s] == v:
                    dup = True
                    break
            if not dup and degrees[u] < union.shape[1]:
                union[u, degrees[u]] = v
                degrees[u] += 1


def merge_shard_graphs(vectors: np.ndarray, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       R: int, alpha: float, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """vectors: (N, d) fp16/fp32; shards: per shard (global ids (n,) int64 sorted, local
    neighbours (n, R) int32 padded -1, degrees (n,) int32). Returns (neighbours (N, R) int32
    padded -1, degrees (N,) int32). Nodes in no shard get degree 0."""
    X16 = as_fp16(vectors)
    X = X16.view(np.uint16)
    n = len(X)
    width = R * max(1, _max_membership(n, shards))
    union = np.full((n, width), -1, np.int32)
    degrees = np.zeros(n, np.int32)
    for ids, nbrs, deg in shards:
        _union_rows(union, degrees, ids.astype(np.int64), nbrs, deg, ids.astype(np.int32))
    threads = resolve_threads(threads)
    norms = np.empty(n, np.float32)
    parallel_for(lambda lo, hi: squared_norms(X, lo, hi, norms), n, threads)
    parallel_for(lambda lo, hi: prune_to_degree(X, norms, union, degrees, lo, hi, float(alpha), R), n, threads)
    out = np.ascontiguousarray(union[:, :R])
    out[np.arange(R)[None, :] >= degrees[:, None]] = -1
    return out, degrees


def _max_membership(n: int, shards) -> int:
    counts = np.zeros(n, np.int32)
    for ids, _, _ in shards:
        counts[ids] += 1
    return int(counts.max()) if n else 0
