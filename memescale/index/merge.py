"""Merge per-shard Vamana graphs into one graph over all nodes (sharded build).

Each node sits in `overlap` shards (2), so it has that many out-lists. Its merged out-list
is their union over global ids, re-pruned to R by `prune_lists` (robust_prune with the
build's alpha): cross-shard edges survive where they are useful, and no node keeps 2R
neighbours. Time O(N * overlap * R * R * d) worst case; memory N * overlap * R * 4 bytes.
"""

from __future__ import annotations

import numpy as np

from .vamana import prune_lists


def merge_shard_graphs(vectors: np.ndarray, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       R: int, alpha: float, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """vectors: (N, d) fp16/fp32; shards: per shard (global ids (n,) int64, local neighbours
    (n, R_shard) int32 padded with -1, degrees (n,) int32). Returns (neighbours (N, R) int32 padded
    with -1, degrees (N,) int32). Nodes in no shard get degree 0."""
    n = len(vectors)
    membership = np.zeros(n, np.int64)
    for ids, _, _ in shards:
        membership[ids] += 1
    width = max((nbrs.shape[1] for _, nbrs, _ in shards), default=R)
    lists = np.full((n, width * max(1, int(membership.max(initial=0)))), -1, np.int32)
    slot = np.zeros(n, np.int64)
    for ids, nbrs, _ in shards:
        glob = np.where(nbrs >= 0, ids[np.maximum(nbrs, 0)], -1).astype(np.int32)
        cols = slot[ids][:, None] * width + np.arange(nbrs.shape[1])[None, :]
        lists[ids[:, None], cols] = glob
        slot[ids] += 1
    return prune_lists(vectors, lists, R, alpha, threads)
