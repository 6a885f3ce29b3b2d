"""Merge per-shard Vamana graphs into one graph over all nodes (sharded build).

Each node sits in `overlap` shards (2), so it has that many out-lists. Its merged out-list
is their union over global ids (the lists laid out in increasing shard order), re-pruned to
R by `vamana.prune_rows` (robust_prune with the build's alpha): cross-shard edges survive
where they are useful, and no node keeps 2R neighbours. Time O(N * overlap * R * R * d)
worst case, and every candidate's row is read, in no order the vectors file serves: where
the vectors do not fit in RAM those are disk reads. mode="interleave" instead takes the
lists' entries in turn (each list's first, then each list's second, ...; a shard's list is
robust_prune's choice, closest first, then any reverse edges it gained), skipping repeats,
up to R: no distance and no row read, O(N * overlap * R^2) comparisons of ids.

`merge_shard_files` streams: it walks node-id blocks [lo, hi), reads each shard's rows for
the block's nodes (a contiguous range of the shard's sorted ids) from memory-mapped files and
writes the merged rows to memory-mapped outputs. Memory 4 B/vector (norms) plus
O(block * overlap * max R_s); everything else is file-backed. `merge_shard_graphs` is the same
code over arrays in RAM (small sets, tests).

The merged graph is weakest at shard borders: a node's true neighbours in a third shard are
missing, and no search crossed shards while the shard graphs were built. The sharded build
therefore follows the merge with `vamana.refine_graph` (one more Vamana pass with a small L
over the merged graph, from the medoid of all vectors) on the nodes `border_nodes` picks:
those whose farthest own shard is least ahead of the nearest other shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from .kernels import as_fp16, parallel_for, resolve_threads
from .vamana import prune_rows, vector_norms

ShardGraph = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ids (n_s,) int64, neighbours (n_s, R_s), degrees (n_s,))


def member_from_shards(shards: Sequence[np.ndarray], n: int) -> np.ndarray:
    """(n, width) int32 in RAM: each node's shards in increasing order, -1 padded (width = the
    most shards any node is in, at least 1), from per-shard sorted id arrays. The layout of
    `partition.DiskPartition.member`; for small sets and tests (8 B/vector while built)."""
    count = np.zeros(n, np.int64)
    for ids in shards:
        count[np.asarray(ids)] += 1
    member = np.full((n, max(1, int(count.max(initial=0)))), -1, np.int32)
    count[:] = 0
    for s, ids in enumerate(shards):
        ids = np.asarray(ids)
        member[ids, count[ids]] = s
        count[ids] += 1
    return member


def _merge_block(X: np.ndarray, norms: np.ndarray, member: np.ndarray, shards: Sequence[ShardGraph],
                 width: int, lo: int, hi: int, R: int, alpha: float, out: np.ndarray, out_deg: np.ndarray,
                 threads: int, pool: ThreadPoolExecutor, mode: str = "prune") -> None:
    """Merged rows of nodes [lo, hi) (re-pruned, or interleaved: `mode`) into out (hi - lo, R)
    and out_deg (hi - lo,)."""
    m = np.asarray(member[lo:hi])
    overlap = m.shape[1]
    lists = np.full((hi - lo, overlap * width), -1, np.int32)
    slot = np.zeros(hi - lo, np.int64)  # the next free list of each row (its shards come in increasing order)
    for s, (ids, nbrs, deg) in enumerate(shards):
        a, b = (int(v) for v in np.searchsorted(ids, [lo, hi]))
        if a == b:
            continue
        rows = np.asarray(ids[a:b], np.int64) - lo
        if (slot[rows] >= overlap).any() or (m[rows, np.minimum(slot[rows], overlap - 1)] != s).any():
            raise ValueError(f"shard {s}'s ids disagree with the member array in nodes [{lo}, {hi})")
        nb = np.asarray(nbrs[a:b])
        valid = (nb >= 0) & (np.arange(nb.shape[1])[None, :] < np.asarray(deg[a:b])[:, None])
        local = np.where(valid, nb, 0)
        glob = np.where(valid, np.asarray(ids[local.reshape(-1)]).reshape(local.shape), -1)
        cols = slot[rows][:, None] * width + np.arange(nb.shape[1])[None, :]
        lists[rows[:, None], cols] = glob
        slot[rows] += 1
    if not np.array_equal(slot, (m >= 0).sum(axis=1)):
        raise ValueError(f"the member array names shards that do not hold nodes in [{lo}, {hi})")
    if mode == "interleave":
        parallel_for(lambda a, b: _interleave_rows(lists, width, overlap, lo, a, b, R, out, out_deg), hi - lo, threads,
                     pool)
        return
    counts = np.full(hi - lo, lists.shape[1], np.int32)
    prune_rows(X, norms, lists, counts, lo, R, alpha, out, out_deg, threads, pool)


@njit(nogil=True, cache=True)
def _interleave_rows(lists, width, overlap, row0, lo, hi, R, out, out_deg):
    """For rows i in [lo, hi) (node row0 + i): the entries of its `overlap` lists of `width`
    (lists[i, s * width:(s + 1) * width], -1 padded) taken in turn, position by position,
    skipping -1, the node itself and repeats, up to R. Writes out[i] (-1 padded), out_deg[i]."""
    for i in range(lo, hi):
        j = row0 + i
        deg = 0
        for t in range(width):
            for s in range(overlap):
                u = lists[i, s * width + t]
                if u < 0 or u == j or deg >= R:
                    continue
                seen = False
                for q in range(deg):
                    if out[i, q] == u:
                        seen = True
                        break
                if not seen:
                    out[i, deg] = u
                    deg += 1
        out[i, deg:] = -1
        out_deg[i] = deg


def _merge(vectors: np.ndarray, member: np.ndarray, shards: Sequence[ShardGraph], R: int, alpha: float,
           neighbours_out: np.ndarray, degrees_out: np.ndarray, threads: int | None, block: int,
           mode: str = "prune") -> None:
    if mode not in ("prune", "interleave"):
        raise ValueError(f"merge mode must be 'prune' or 'interleave', got {mode!r}")
    # a view of an fp16 memmap, no copy; interleaving reads no vector at all
    X = as_fp16(vectors).view(np.uint16) if mode == "prune" else np.empty((len(vectors), 0), np.uint16)
    n = X.shape[0]
    if member.shape[0] != n or neighbours_out.shape != (n, R) or degrees_out.shape != (n,):
        raise ValueError("member, neighbours_out and degrees_out must have one row per vector (R columns)")
    for s, (ids, nbrs, deg) in enumerate(shards):
        if len(ids) != len(nbrs) or len(ids) != len(deg):
            raise ValueError(f"shard {s}: ids, neighbours and degrees differ in length")
        if len(ids) and (int(ids[0]) < 0 or int(ids[-1]) >= n):
            raise ValueError(f"shard {s} has ids outside [0, {n})")
    width = max((nbrs.shape[1] for _, nbrs, _ in shards), default=R)
    threads = resolve_threads(threads)
    block = max(1, int(block))
    with ThreadPoolExecutor(threads) as pool:
        norms = vector_norms(X, threads, pool) if mode == "prune" else np.zeros(0, np.float32)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            # plain-ndarray views of the output rows (memmap slices write through to the file)
            out = np.asarray(neighbours_out[lo:hi])
            out_deg = np.asarray(degrees_out[lo:hi])
            _merge_block(X, norms, member, shards, width, lo, hi, R, alpha, out, out_deg, threads, pool, mode)


def merge_shard_files(vectors: np.ndarray, member: np.ndarray, shards: Sequence[ShardGraph], R: int, alpha: float,
                      neighbours_out: np.ndarray, degrees_out: np.ndarray, threads: int | None = None,
                      block: int = 65536, mode: str = "prune") -> None:
    """Merge shard graphs kept on disk into `neighbours_out` and `degrees_out`, blockwise.

    vectors: (N, d) float16 (a memmap; float32 is converted, a copy); member: (N, overlap)
    int32, each node's shards in increasing order, -1 for none (`DiskPartition.member`);
    shards: per shard s, (ids (n_s,) sorted int64 global ids, neighbours (n_s, R_s) int32
    local ids padded with -1, degrees (n_s,) int32; the first degrees[i] entries of row i
    count), memmaps; neighbours_out (N, R) int32 and degrees_out (N,) int32: C-contiguous
    arrays or memmaps, filled (-1 padded). A node's merged list is its shards' lists in
    increasing shard order, translated to global ids, re-pruned to R (identical to
    `merge_shard_graphs`); a node in no shard gets degree 0. Raises ValueError when member
    and the shards' ids disagree.

    Over node-id blocks [lo, hi) of `block` nodes: each shard's rows for the block are the
    contiguous range of its ids in [lo, hi) (two binary searches). Time O(N * overlap * R *
    R * d) worst case; memory 4 B/vector (norms) plus O(block * overlap * max R_s);
    vectors, graphs and ids are read through the page cache. mode: "prune" or "interleave"
    (module doc; the latter reads no vector and needs no norms).
    """
    _merge(vectors, member, shards, R, alpha, neighbours_out, degrees_out, threads, block, mode)


def merge_shard_graphs(vectors: np.ndarray, shards: Sequence[ShardGraph], R: int, alpha: float,
                       threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`merge_shard_files` in RAM. vectors: (N, d) fp16/fp32; shards: per shard (global ids
    (n,) int64 sorted, local neighbours (n, R_shard) int32 padded with -1, degrees (n,)
    int32). Returns (neighbours (N, R) int32 padded with -1, degrees (N,) int32). Nodes in no
    shard get degree 0. Memory O(N * (R + overlap)) for the outputs and the member array."""
    n = len(vectors)
    member = member_from_shards([ids for ids, _, _ in shards], n)
    neighbours = np.empty((n, R), np.int32)
    degrees = np.empty(n, np.int32)
    _merge(vectors, member, shards, R, alpha, neighbours, degrees, threads, 65536)
    return neighbours, degrees


def _order_keys(x: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 values x (no NaN; -0.0 and 0.0 get the same key)."""
    bits = (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> 31 != 0, ~bits, bits | np.uint32(0x80000000))


def _kth_key(margin: np.ndarray, count: int, block: int) -> tuple[int, int]:
    """(key, below): the key (`_order_keys`) of the count-th smallest margin (1 <= count <= N)
    and how many margins have a smaller key. A two-pass radix select on the keys' high, then
    low 16 bits, blockwise. Memory O(block + 65536)."""
    hist = np.zeros(1 << 16, np.int64)
    for lo in range(0, len(margin), block):
        hist += np.bincount(_order_keys(margin[lo:lo + block]) >> 16, minlength=1 << 16)
    cum = np.cumsum(hist)
    high = int(np.searchsorted(cum, count))  # the first bucket holding the count-th
    below = int(cum[high - 1]) if high else 0
    hist[:] = 0
    for lo in range(0, len(margin), block):
        keys = _order_keys(margin[lo:lo + block])
        hist += np.bincount(keys[keys >> 16 == high] & 0xFFFF, minlength=1 << 16)
    cum = np.cumsum(hist)
    low = int(np.searchsorted(cum, count - below))
    return (high << 16) | low, below + (int(cum[low - 1]) if low else 0)


def border_nodes(vectors: np.ndarray, centroids: np.ndarray, member: np.ndarray, fraction: float,
                 block: int = 65536) -> np.ndarray:
    """The `fraction` of nodes nearest a shard border, as sorted int64 ids.

    A node's margin is the cosine to the least similar centroid of the shards it is in minus
    the cosine to the most similar centroid of a shard it is not in; the round(fraction * N)
    smallest margins are taken (ties by id). vectors: (N, d) fp16/fp32, may be a memmap;
    centroids: (k, d) unit rows; member: (N, overlap) int32, each node's shards, -1 for none
    (`DiskPartition.member`, or `member_from_shards`), may be a memmap; a node in no shard
    counts as nearest. With a single shard, or fraction >= 1, every node.

    Blockwise: the margins (float32), then the count-th smallest by a radix select over
    them (two passes), then the ids at most that, in id order. Time O(N k d); memory
    4 B/vector (margins) + 8 B per node returned + O(block * (d + k)).
    """
    n, k = len(vectors), len(centroids)
    count = int(round(min(max(fraction, 0.0), 1.0) * n))
    if k <= 1 or count >= n:
        return np.arange(n, dtype=np.int64)
    if count <= 0:
        return np.empty(0, np.int64)
    if member.shape[0] != n:
        raise ValueError("member must have one row per vector")
    cent = np.asarray(centroids, np.float32)
    margin = np.empty(n, np.float32)
    for lo in range(0, n, block):
        x = np.asarray(vectors[lo:lo + block], np.float32)
        sims = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ cent.T
        m = np.asarray(member[lo:lo + block])
        own = np.where(m >= 0, np.take_along_axis(sims, np.maximum(m, 0), axis=1), np.inf).min(axis=1)
        rows = np.repeat(np.arange(len(x)), m.shape[1])
        cols = m.reshape(-1)
        sims[rows[cols >= 0], cols[cols >= 0]] = -np.inf
        margin[lo:lo + block] = np.where((m >= 0).any(axis=1), own - sims.max(axis=1), -np.inf)  # no shard: first
    kth, below = _kth_key(margin, count, block)
    ties = count - below  # nodes at the count-th margin: the lowest ids
    chosen = np.empty(count, np.int64)
    filled = 0
    for lo in range(0, n, block):
        keys = _order_keys(margin[lo:lo + block])
        tie = np.flatnonzero(keys == kth)[:ties]
        ties -= tie.size
        take = np.union1d(np.flatnonzero(keys < kth), tie) + lo
        chosen[filled:filled + take.size] = take
        filled += take.size
    assert filled == count
    return chosen
