"""Measuring an ANN search: recall@k against exact inner-product ground truth.

    gt, _ = exact_ground_truth(base, queries, 100)      # base may be a np.memmap
    r = recall_at_k(found_ids, gt, 10)

Depends on numpy alone (1.x or 2.x) and imports nothing from the package, so a benchmark
running in another environment can load this file by its path.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exact_ground_truth", "recall_at_k"]


def recall_at_k(found_ids: np.ndarray, gt_ids: np.ndarray, k: int, query_block: int = 1024) -> float:
    """Mean over queries of |set(found[:, :k]) ∩ set(gt[:, :k])| / k.

    found_ids: (nq, >=k) integer ids, -1 for padding (never a hit; an id repeated in a row
    counts once). gt_ids: (nq, >=k) integer ids, best first. Returns a float in [0, 1]; 0.0
    for nq = 0. ValueError if the row counts differ, a side has fewer than k columns or
    k < 1. O(nq * k^2) time, O(query_block * k^2) memory.
    """
    found = np.asarray(found_ids)
    gt = np.asarray(gt_ids)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if found.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"found and gt must be 2-D (nq, k), got shapes {found.shape} and {gt.shape}")
    if found.shape[0] != gt.shape[0]:
        raise ValueError(f"found has {found.shape[0]} rows, gt has {gt.shape[0]}")
    if found.shape[1] < k or gt.shape[1] < k:
        raise ValueError(f"recall@{k} needs at least {k} columns, got found {found.shape} and gt {gt.shape}")
    nq = found.shape[0]
    if nq == 0:
        return 0.0
    hits = 0
    for lo in range(0, nq, max(1, query_block)):
        f = np.sort(found[lo : lo + query_block, :k].astype(np.int64), axis=1)
        g = gt[lo : lo + query_block, :k].astype(np.int64)
        first = np.ones(f.shape, bool)  # the first copy of each id in a row
        first[:, 1:] = f[:, 1:] != f[:, :-1]
        hit = (f[:, :, None] == g[:, None, :]).any(axis=2)
        hits += int(np.count_nonzero(hit & first & (f >= 0)))
    return hits / (nq * k)


def exact_ground_truth(
    base: np.ndarray, queries: np.ndarray, k: int, block_rows: int = 8192, query_rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every query by inner product with the base rows, best first.

    base: (N, d) float16/float32/float64, e.g. a np.memmap larger than RAM: read once, in
    order, `block_rows` rows at a time converted to float32. queries: (nq, d) float.
    Returns ids (nq, k) int64 and scores (nq, k) float32; equal scores are ordered by lower
    id, and when k > N the last k - N columns are -1 / -inf. Scores are float32 dot
    products, so the order matches a float32 brute force over the same data.
    O(nq * N * d) time; O(nq * k + block_rows * d + query_rows * (block_rows + k)) memory
    (the running top-k, one base block, the scores of one block of queries).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or np.ndim(base) != 2 or q.shape[1] != base.shape[1]:
        raise ValueError(f"base (N, d) and queries (nq, d) must agree on d, got {np.shape(base)} and {q.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    block_rows, query_rows = max(1, int(block_rows)), max(1, int(query_rows))
    nq, n = q.shape[0], base.shape[0]
    kk = min(k, n)
    best_s = np.full((nq, kk), -np.inf, np.float32)
    best_i = np.full((nq, kk), _NO_ID, np.int64)
    for lo in range(0, n, block_rows):
        block = np.asarray(base[lo : min(n, lo + block_rows)], dtype=np.float32)
        for qlo in range(0, nq, query_rows):
            rows = slice(qlo, min(nq, qlo + query_rows))
            best_s[rows], best_i[rows] = _merge(best_s[rows], best_i[rows], q[rows] @ block.T, lo)
    if kk < k:
        best_i = np.concatenate([best_i, np.full((nq, k - kk), -1, np.int64)], axis=1)
        best_s = np.concatenate([best_s, np.full((nq, k - kk), -np.inf, np.float32)], axis=1)
    return best_i, best_s


_NO_ID = np.iinfo(np.int64).max  # an empty slot of the running top-k: sorts after every id


def _merge(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """The running top-k (m, k) scores and ids merged with the scores (m, b) of base rows
    lo..lo+b: the k best by score descending, then id ascending, in that order."""
    k = best_s.shape[1]
    all_s = np.concatenate([best_s, s], axis=1)
    part = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
    top_s = np.take_along_axis(all_s, part, 1)
    old = np.take_along_axis(best_i, np.minimum(part, k - 1), 1)
    top_i = np.where(part < k, old, part - k + lo)
    # argpartition picks arbitrarily among scores equal to the k-th: redo those rows in full.
    kth = top_s.min(axis=1, keepdims=True)
    for r in np.flatnonzero((all_s >= kth).sum(axis=1) > k):
        ids = np.concatenate([best_i[r], np.arange(lo, lo + s.shape[1], dtype=np.int64)])
        order = np.lexsort((ids, -all_s[r]))[:k]
        top_s[r], top_i[r] = all_s[r, order], ids[order]
    order = np.lexsort((top_i, -top_s), axis=1)
    return np.take_along_axis(top_s, order, 1), np.take_along_axis(top_i, order, 1)
