"""Merge per-shard Vamana graphs into one graph over all nodes (sharded build).

Each node sits in `overlap` shards (2), so it has that many out-lists. Its merged out-list
is their union over global ids, re-pruned to R by `prune_lists` (robust_prune with the
build's alpha): cross-shard edges survive where they are useful, and no node keeps 2R
neighbours. Time O(N * overlap * R * R * d) worst case; memory N * overlap * R * 4 bytes.

The merged graph is weakest at shard borders: a node's true neighbours in a third shard are
missing, and no search crossed shards while the shard graphs were built. The sharded build
therefore follows the merge with `vamana.refine_graph` (one more Vamana pass with a small L
over the merged graph, from the medoid of all vectors) on the nodes `border_nodes` picks:
those whose farthest own shard is least ahead of the nearest other shard.
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


def border_nodes(vectors: np.ndarray, centroids: np.ndarray, shards: list[np.ndarray], fraction: float,
                 block: int = 65536) -> np.ndarray:
    """The `fraction` of nodes nearest a shard border, as sorted int64 ids.

    A node's margin is the cosine to the least similar centroid of the shards it is in minus
    the cosine to the most similar centroid of a shard it is not in; the smallest margins are
    taken (ties by id). vectors: (N, d); centroids: (k, d) unit rows; shards: per shard its
    sorted node ids; a node in no shard counts as nearest. With a single shard, or fraction
    >= 1, every node. Time O(N k d + N log N); memory O(N * overlap) besides a block of vectors.
    """
    n, k = len(vectors), len(centroids)
    count = int(round(min(max(fraction, 0.0), 1.0) * n))
    if k <= 1 or count >= n:
        return np.arange(n, dtype=np.int64)
    slot = np.zeros(n, np.int32)
    for ids in shards:
        slot[ids] += 1
    member = np.full((n, max(1, int(slot.max(initial=1)))), -1, np.int32)  # each node's shards
    slot[:] = 0
    for s, ids in enumerate(shards):
        member[ids, slot[ids]] = s
        slot[ids] += 1
    cent = np.asarray(centroids, np.float32)
    margin = np.full(n, np.inf, np.float32)
    for lo in range(0, n, block):
        x = np.asarray(vectors[lo:lo + block], np.float32)
        sims = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ cent.T
        m = member[lo:lo + block]
        own = np.where(m >= 0, np.take_along_axis(sims, np.maximum(m, 0), axis=1), np.inf).min(axis=1)
        rows = np.repeat(np.arange(len(x)), m.shape[1])
        cols = m.reshape(-1)
        sims[rows[cols >= 0], cols[cols >= 0]] = -np.inf
        margin[lo:lo + block] = np.where(m[:, 0] >= 0, own - sims.max(axis=1), -np.inf)  # no shard: first
    return np.sort(np.argsort(margin, kind="stable")[:count]).astype(np.int64)
