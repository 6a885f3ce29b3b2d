"""Balanced partition for the sharded build: cohesive clusters under a hard size cap.

1. `balanced_kmeans`: spherical k-means on a sample whose assignment step respects a capacity
   (each cluster at most ceil(n/k * (1 + slack)) sample points), so centroids end up where
   equal-sized, cohesive clusters are -- not random balanced cuts, which waste the overlap.
2. `assign_shards`: every vector goes to its `overlap` (2) most similar centroids among those
   with room, with a hard cap per shard of ceil(overlap * N / k * (1 + slack)). The cap is
   what lets a shard's build task declare its memory up front.

Both use a greedy capacitated assignment: candidate (point, centroid) pairs from each point's
`candidates` nearest centroids, taken in order of decreasing similarity while the point still
needs an assignment and the centroid has room; points left short (rare) take the most
similar centroids that still have room. Time O(N k d) for the similarities plus
O(N c log(N c)) for the sort (c = candidates); memory O(N c).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np


@dataclass
class Partition:
    """`centroids` (k, d) float32 unit rows; `shards[s]` sorted int64 ids of shard s."""

    centroids: np.ndarray
    shards: list[np.ndarray]

    def sizes(self) -> np.ndarray:
        return np.array([len(s) for s in self.shards])

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` (.npz: `centroids`, `shard_0` ... `shard_{k-1}`), atomically."""
        path = Path(path)
        tmp = path.with_name(path.stem + ".tmp.npz")
        shards: dict[str, Any] = {f"shard_{s}": ids for s, ids in enumerate(self.shards)}
        np.savez(tmp, centroids=self.centroids, **shards)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Partition:
        """The partition `save` wrote to `path`."""
        z = np.load(path)
        return cls(z["centroids"], [z[f"shard_{s}"] for s in range(len(z["centroids"]))])


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _topc(x: np.ndarray, centroids: np.ndarray, c: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `c` most similar centroids: (ids (n, c) int32, sims (n, c) float32), blocked."""
    n = len(x)
    ids = np.empty((n, c), dtype=np.int32)
    sims = np.empty((n, c), dtype=np.float32)
    for lo in range(0, n, block):
        s = np.asarray(x[lo:lo + block], dtype=np.float32) @ centroids.T
        part = np.argpartition(-s, c - 1, axis=1)[:, :c] if c < s.shape[1] else np.tile(np.arange(c), (len(s), 1))
        ids[lo:lo + block] = part
        sims[lo:lo + block] = np.take_along_axis(s, part, axis=1)
    return ids, sims


@numba.njit(cache=True)
def _greedy(order, ids, per_point, cap, out, filled, load):
    c = ids.shape[1]
    for flat in order:
        p = flat // c
        f = filled[p]
        if f == per_point:
            continue
        cid = ids[p, flat % c]
        if load[cid] < cap:
            out[p, f] = cid
            filled[p] = f + 1
            load[cid] += 1


def capacitated_assign(x: np.ndarray, centroids: np.ndarray, per_point: int, cap: int,
                       candidates: int = 8) -> np.ndarray:
    """Assign each row of `x` to `per_point` distinct centroids, each centroid taking at most
    `cap` rows. Returns (n, per_point) int32 centroid ids, most similar first.
    Requires per_point <= k and n * per_point <= k * cap."""
    n, k = len(x), len(centroids)
    if per_point > k or n * per_point > k * cap:
        raise ValueError(f"cannot place {n} x {per_point} assignments in {k} shards of cap {cap}")
    c = min(k, max(candidates, per_point + 1))
    ids, sims = _topc(x, centroids, c)
    order = np.argsort(-sims, axis=None, kind="stable")
    out = np.full((n, per_point), -1, dtype=np.int32)
    filled = np.zeros(n, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    _greedy(order, ids, per_point, cap, out, filled, load)
    for p in np.nonzero(filled < per_point)[0]:
        s = np.asarray(x[p], dtype=np.float32) @ centroids.T
        for cid in np.argsort(-s):
            if filled[p] == per_point:
                break
            if load[cid] < cap and cid not in out[p, : filled[p]]:
                out[p, filled[p]] = cid
                filled[p] += 1
                load[cid] += 1
    return out


def balanced_kmeans(sample: np.ndarray, k: int, iters: int = 12, slack: float = 0.05,
                    seed: int = 0) -> np.ndarray:
    """Spherical k-means with capacitated assignment on `sample` (n, d) -> (k, d) unit centroids."""
    x = _normalise(sample)
    rng = np.random.default_rng(seed)
    n = len(x)
    if n < k:
        raise ValueError(f"sample of {n} vectors is smaller than k={k}")
    # k-means++ seeding on inner-product distance (1 - cos)
    cent = [x[rng.integers(n)]]
    dist = 1.0 - x @ cent[0]
    for _ in range(1, k):
        p = np.maximum(dist, 0) + 1e-12
        cent.append(x[rng.choice(n, p=p / p.sum())])
        dist = np.minimum(dist, 1.0 - x @ cent[-1])
    centroids = np.stack(cent)
    cap = math.ceil(n / k * (1 + slack))
    for _ in range(iters):
        a = capacitated_assign(x, centroids, 1, cap)[:, 0]
        sums = np.zeros_like(centroids)
        np.add.at(sums, a, x)
        empty = np.bincount(a, minlength=k) == 0
        sums[empty] = x[rng.integers(n, size=int(empty.sum()))]
        centroids = _normalise(sums)
    return centroids


def assign_shards(vectors: np.ndarray, centroids: np.ndarray, overlap: int = 2,
                  slack: float = 0.05) -> Partition:
    """Every vector into its `overlap` nearest shards under the hard cap (see module doc)."""
    k = len(centroids)
    overlap = min(overlap, k)
    cap = math.ceil(overlap * len(vectors) / k * (1 + slack))
    a = capacitated_assign(_normalise(vectors), centroids, overlap, cap)
    flat_ids = np.repeat(np.arange(len(vectors), dtype=np.int64), overlap)
    flat_shard = a.reshape(-1)
    order = np.argsort(flat_shard, kind="stable")
    bounds = np.searchsorted(flat_shard[order], np.arange(k + 1))
    shards = [np.sort(flat_ids[order[bounds[s]:bounds[s + 1]]]) for s in range(k)]
    return Partition(centroids=centroids, shards=shards)


def cohesion(vectors: np.ndarray, part: Partition) -> float:
    """Mean cosine of each (vector, shard) membership to that shard's centroid."""
    x = _normalise(vectors)
    total = sum(float((x[ids] @ part.centroids[s]).sum()) for s, ids in enumerate(part.shards))
    return total / max(1, sum(len(s) for s in part.shards))


def plain_kmeans_partition(vectors: np.ndarray, k: int, overlap: int = 2, iters: int = 12,
                           seed: int = 0) -> Partition:
    """Reference: unconstrained spherical k-means, each vector in its `overlap` nearest
    clusters with no cap (for reporting sizes and cohesion next to the balanced partition)."""
    x = _normalise(vectors)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        a = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, a, x)
        empty = np.bincount(a, minlength=k) == 0
        sums[empty] = x[rng.integers(len(x), size=int(empty.sum()))]
        centroids = _normalise(sums)
    ids, _ = _topc(x, centroids, min(k, overlap))
    shards = [np.nonzero((ids == s).any(axis=1))[0].astype(np.int64) for s in range(k)]
    return Partition(centroids=centroids, shards=shards)
