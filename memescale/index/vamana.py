"""Vamana graph construction (Subramanya et al., "DiskANN", NeurIPS 2019).

Names follow the paper: `greedy_search` (Algorithm 1), `robust_prune` (Algorithm 2) and the
two-pass `build_vamana` (Algorithm 3: a pass with alpha = 1, then one with the given alpha).
`prune_lists` re-prunes merged neighbour lists (the union of a node's lists from several
shard graphs) back to R; `refine_graph` runs one more such pass over an existing graph (the
merged graph of a sharded build).

Geometry: the graph is built on squared Euclidean distance, ``d(a, b) = |a|^2 + |b|^2 -
2 a.b``, computed in float32 from fp16 vectors. For the L2-normalised vectors this index
serves, Euclidean and inner-product neighbours coincide, and alpha keeps its usual meaning
(as in the reference implementation, alpha scales squared distances).

Parallel and deterministic: points are inserted in a seeded random order, in batches
(sizes doubling from 1 up to `max_batch`). Within a batch every point's greedy_search and
robust_prune run in parallel against the graph frozen at the batch start; the new out-lists
are then written, and the reverse edges are grouped by target node (in batch order) and
applied target by target, each target by exactly one thread. Nothing depends on thread
scheduling, so a seed gives the same graph for any thread count.

Navigation on PQ codes (`nav_dsub`, off by default; `index.build_pq_bytes` in a build): the
construction searches (Algorithm 1 inside Algorithm 3) rank candidates by ADC distances to a
product quantisation of the rows (`navigation_codes`: one byte per nav_dsub dimensions,
k-means codebooks trained on a seeded sample of the rows) instead of fetching every
candidate's full row; only the nodes a search expands are scored exactly, and those exact
distances are what robust_prune sees. A row fetched at random costs d bytes of memory
traffic, a code d / nav_dsub bytes and a few lookups in a table that stays in cache. The
build is faster and the graph a little different: `bench/README.md` ("Construction
variants") has both measured against exact navigation, by code size. With a few dimensions per vector the
codes rank too coarsely to be worth it.

Memory: vectors + the graph (N x ceil(slack * R) int32 while building, like the reference
implementation's slack before re-pruning) + N float32 norms + one batch's lists (at most
MAX_BATCH points) + per thread a small visited set (`_vs_add`: a hash table of the nodes one
search touches, sized by them, not by N); with navigation codes, ceil(d / nav_dsub) bytes per
vector and per thread an ADC table of 256 x ceil(d / nav_dsub) float32. Nothing quadratic.
`refine_graph` can keep its working graph in a memory-mapped file.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from .kernels import as_fp16, dot_hf, parallel_for, prefetch_bytes, resolve_threads, squared_norms, widen
from .pq import K as PQ_K
from .pq import adc_score, assign_subspaces, kmeans_subspaces

log = logging.getLogger(__name__)

MAX_CANDIDATES = 750  # robust_prune considers at most this many closest candidates
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier of the visited sets
_TAG_LIMIT = 2**31 - 2  # visited-set epochs are int32 values in the entries' high word
VISIT_TABLE = 4096  # initial entries of a thread's visited set (grown on demand)
MAX_BATCH = 65_536  # most points per batch: a batch's out-lists and reverse edges are O(batch * R) memory
NAV_DSUB = 8  # dimensions per byte of navigation codes, where a caller asks for them without a size
NAV_TRAIN_ROWS = 16_384  # rows sampled to train the navigation codebooks (64 per centroid)
NAV_BLOCK_BYTES = 16 << 20  # float32 bytes of one block of rows being encoded
NAV_KMEANS_ITERS = 10
NO_CODES = np.zeros((0, 0), np.uint8)  # "no navigation codes": rank by exact distances
NO_TABLE = np.zeros((0, 0), np.float32)


@njit(nogil=True, cache=True, inline="always")
def _vs_slot(vis, u, tag):
    """The slot of node u (>= 0) in the visited set of epoch `tag` (>= 1) held in `vis`: where
    its entry is, or the free slot it would take. vis: power-of-two int64 hash table (linear
    probing), entries (tag << 32) | u; an entry of another epoch counts as free, so a new
    epoch starts with no clearing. The caller keeps the table at most half full (`_vs_reserve`)."""
    mask = np.uint64(vis.shape[0] - 1)
    want = (np.int64(tag) << 32) | np.int64(u)
    i = ((np.uint64(u) * _GOLDEN) >> np.uint64(32)) & mask
    while vis[i] != want and (vis[i] >> 32) == tag:
        i = (i + np.uint64(1)) & mask
    return i


@njit(nogil=True, cache=True, inline="always")
def _vs_add(vis, u, tag):
    """Add node u to the visited set of epoch `tag` (see `_vs_slot`); True when it was not in it yet."""
    i = _vs_slot(vis, u, tag)
    want = (np.int64(tag) << 32) | np.int64(u)
    if vis[i] == want:
        return False
    vis[i] = want
    return True


@njit(nogil=True, cache=True, inline="always")
def _vs_has(vis, u, tag):
    """Whether node u is in the visited set of epoch `tag` (see `_vs_slot`)."""
    return vis[_vs_slot(vis, u, tag)] == ((np.int64(tag) << 32) | np.int64(u))


@njit(nogil=True, cache=True)
def _vs_reserve(vis, used, more, tag):
    """`vis` when it holds `used` + `more` entries at most half full, else a table large
    enough holding epoch `tag`'s entries (the other epochs' are dropped)."""
    need = 2 * (used + more)
    if need <= vis.shape[0]:
        return vis
    size = vis.shape[0]
    while size < need:
        size *= 2
    out = np.zeros(size, np.int64)
    for e in vis:
        if (e >> 32) == tag:
            _vs_add(out, np.int64(e & 0xFFFFFFFF), tag)
    return out


@njit(nogil=True, cache=True)
def greedy_search(X, norms, graph, degrees, start, qf, qnorm, L, vis, tag, codes=NO_CODES, table=NO_TABLE):
    """Algorithm 1: greedy search from `start` for query `qf` with search list size L.

    X: (N, d) uint16 fp16 bits; norms: (N,) float32 squared norms; graph: (N, W) int32 out-
    lists (first degrees[i] valid); qf: (d,) float32 query, qnorm its squared norm; vis: this
    thread's visited set, a power-of-two int64 hash table (`_vs_add`; np.zeros(VISIT_TABLE)
    to start), `tag` (>= 1) an epoch not used before in it: no clearing between searches,
    and its memory follows the nodes one search touches, not N. codes: (N, M) uint8
    navigation codes and table: the query's (M, 256) `adc_table`, to rank candidates by ADC
    distances to the codes' reconstructions instead of exact distances; only the expanded
    nodes are scored exactly (for the caller: the ranking stays on one scale), so of X only
    their rows are read. NO_CODES / NO_TABLE: exact distances throughout.
    Returns (visited ids int32, their exact squared distances float32, the table, possibly
    grown): the expanded set V, in expansion order. Each expansion costs degree-many
    distance evaluations: O(|V| * R * d), or O(|V| * (R * M + d)) with codes.
    """
    cand_id = np.empty(L + 1, np.int32)
    cand_d = np.empty(L + 1, np.float32)
    done = np.zeros(L + 1, np.bool_)
    fresh = np.empty(graph.shape[1], np.int32)
    vis_id = np.empty(2 * L + 8, np.int32)
    vis_d = np.empty(2 * L + 8, np.float32)
    n_vis = 0
    nav = codes.shape[0] > 0
    rowbytes = codes.shape[1] if nav else X.shape[1] * X.itemsize
    base = codes.ctypes.data if nav else X.ctypes.data

    vis = _vs_reserve(vis, 0, 1 + graph.shape[1], tag)
    _vs_add(vis, start, tag)
    marked = 1
    cand_id[0] = start
    cand_d[0] = _adc_distance(table, codes, qnorm, start) if nav else _distance_to(X, norms, qf, qnorm, start)
    n = 1
    cur = 0
    while cur < n:
        p = cand_id[cur]
        dp = cand_d[cur]
        if nav:  # an expanded node is scored exactly for the caller; the list stays ranked by ADC
            dp = _distance_to(X, norms, qf, qnorm, p)
        done[cur] = True
        if n_vis == vis_id.shape[0]:
            vis_id = np.concatenate((vis_id, np.empty_like(vis_id)))
            vis_d = np.concatenate((vis_d, np.empty_like(vis_d)))
        vis_id[n_vis] = p
        vis_d[n_vis] = dp
        n_vis += 1
        vis = _vs_reserve(vis, marked, degrees[p], tag)
        m = 0
        for t in range(degrees[p]):
            u = graph[p, t]
            if _vs_add(vis, u, tag):
                fresh[m] = u
                m += 1
        marked += m
        for t in range(m):
            prefetch_bytes(base + np.int64(fresh[t]) * rowbytes, rowbytes)
        nxt = n
        for t in range(m):
            u = fresh[t]
            d = _adc_distance(table, codes, qnorm, u) if nav else _distance_to(X, norms, qf, qnorm, u)
            if n == L and d >= cand_d[n - 1]:
                continue
            pos = n if n < L else L - 1
            while pos > 0 and cand_d[pos - 1] > d:
                cand_id[pos] = cand_id[pos - 1]
                cand_d[pos] = cand_d[pos - 1]
                done[pos] = done[pos - 1]
                pos -= 1
            cand_id[pos] = u
            cand_d[pos] = d
            done[pos] = False
            if n < L:
                n += 1
            if pos < nxt:
                nxt = pos
        cur = nxt if nxt < cur else cur
        while cur < n and done[cur]:
            cur += 1
    return vis_id[:n_vis], vis_d[:n_vis], vis


@njit(nogil=True, cache=True, inline="always")
def _distance_to(X, norms, qf, qnorm, j):
    d = qnorm + norms[j] - 2.0 * dot_hf(X[j], qf)
    return d if d > 0.0 else np.float32(0.0)


@njit(nogil=True, cache=True, fastmath=True)
def adc_table(qf, cb_t, cnorm, table):
    """table (M, 256) float32 <- |c|^2 - 2 q_m . c for every centroid c of every subspace m,
    so that |q|^2 + sum_m table[m, code[m]] = |q - x_hat|^2 (the squared distance to the
    code's reconstruction). qf: (d,) float32 (zero-padded to M * dsub); cb_t: (M, dsub, 256)
    float32 codebooks, transposed; cnorm: (M, 256) float32 squared centroid norms. O(256 M dsub)."""
    M, dsub, k = cb_t.shape
    for m in range(M):
        for t in range(k):
            table[m, t] = cnorm[m, t]
        for j in range(dsub):
            i = m * dsub + j
            v = np.float32(-2.0) * qf[i] if i < qf.shape[0] else np.float32(0.0)
            for t in range(k):
                table[m, t] += v * cb_t[m, j, t]


@njit(nogil=True, cache=True, fastmath=True, inline="always")
def _adc_distance(table, codes, qnorm, u):
    """|q - x_hat_u|^2 from q's `adc_table`."""
    d = qnorm + adc_score(table, codes, u)
    return d if d > 0.0 else np.float32(0.0)


@njit(nogil=True, cache=True, fastmath=True)
def robust_prune(X, norms, cand_ids, cand_d, alpha, R, out):
    """Algorithm 2: choose at most R out-neighbours of a point p from its candidates.

    cand_ids: (n,) int32 distinct candidates, p excluded; cand_d: (n,) float32 squared
    distances to p; out: (>= R,) int32 receives the chosen ids, closest first. Returns their
    count. Candidate p' is dropped once a chosen p* has alpha * d(p*, p') <= d(p, p').
    Only the MAX_CANDIDATES closest candidates are considered: O(min(n, 750) * R * d).
    """
    order = np.argsort(cand_d, kind="mergesort")
    n = min(order.shape[0], MAX_CANDIDATES)
    removed = np.zeros(n, np.bool_)
    pf = np.empty(X.shape[1], np.float32)
    deg = 0
    for a in range(n):
        if removed[a]:
            continue
        star = cand_ids[order[a]]
        out[deg] = star
        deg += 1
        if deg == R:
            break
        widen(X[star], pf)
        nstar = norms[star]
        for b in range(a + 1, n):
            if removed[b]:
                continue
            j = order[b]
            d = _distance_to(X, norms, pf, nstar, cand_ids[j])
            if alpha * d <= cand_d[j]:
                removed[b] = True
    return deg


@njit(nogil=True, cache=True)
def _search_and_prune(X, norms, graph, degrees, medoid, points, lo, hi, L, alpha, R, vis, tag0, out, out_deg,
                      codes, cb_t, cnorm):
    """For points[lo:hi]: V = greedy_search from the medoid, then robust_prune(V + N_out(p)).

    With navigation codes (`navigation_codes`: codes (N, M) uint8, cb_t (M, dsub, 256), cnorm
    (M, 256); codes of shape (0, 0): none) the search ranks candidates by ADC distances and scores V exactly,
    so the prune sees exact distances either way. Writes out[b, :out_deg[b]] for b in [lo, hi);
    reads the graph only. Uses visited-set epochs tag0 + 2 * (b - lo) and + 1 for that
    point. Returns the table (possibly grown).
    """
    qf = np.empty(X.shape[1], np.float32)
    nav = codes.shape[0] > 0
    table = np.empty((cb_t.shape[0], cb_t.shape[2]), np.float32)
    for b in range(lo, hi):
        p = points[b]
        widen(X[p], qf)
        tag = tag0 + 2 * (b - lo)
        if nav:
            adc_table(qf, cb_t, cnorm, table)
            vis_id, vis_d, vis = greedy_search(X, norms, graph, degrees, medoid, qf, norms[p], L, vis, tag, codes,
                                               table)
        else:
            vis_id, vis_d, vis = greedy_search(X, norms, graph, degrees, medoid, qf, norms[p], L, vis, tag)
        tag += 1
        deg = degrees[p]
        vis = _vs_reserve(vis, 0, 1 + vis_id.shape[0] + deg, tag)
        _vs_add(vis, p, tag)
        ids = np.empty(vis_id.shape[0] + deg, np.int32)
        ds = np.empty(vis_id.shape[0] + deg, np.float32)
        n = 0
        for t in range(vis_id.shape[0]):
            u = vis_id[t]
            if _vs_add(vis, u, tag):
                ids[n] = u
                ds[n] = vis_d[t]
                n += 1
        for t in range(deg):
            u = graph[p, t]
            if _vs_add(vis, u, tag):
                ids[n] = u
                ds[n] = _distance_to(X, norms, qf, norms[p], u)
                n += 1
        out_deg[b] = robust_prune(X, norms, ids[:n], ds[:n], alpha, R, out[b])
    return vis


@njit(nogil=True, cache=True)
def _add_reverse_edges(X, norms, graph, degrees, targets, starts, sources, glo, ghi, alpha, R, vis, tag0):
    """Add edges source -> ... reversed: for groups g in [glo, ghi), target j = targets[g]
    gets sources[starts[g]:starts[g+1]] appended to its out-list; when that would exceed the
    list width, the union is robust_pruned to R instead. Each group touches only graph[j].
    Uses visited-set epoch tag0 + (g - glo) for group g; returns the table (possibly grown)."""
    width = graph.shape[1]
    pf = np.empty(X.shape[1], np.float32)
    for g in range(glo, ghi):
        j = targets[g]
        tag = tag0 + (g - glo)
        deg = degrees[j]
        s0, s1 = starts[g], starts[g + 1]
        vis = _vs_reserve(vis, 0, deg + 1 + (s1 - s0), tag)
        for t in range(deg):
            _vs_add(vis, graph[j, t], tag)
        _vs_add(vis, j, tag)
        n_new = 0
        for t in range(s0, s1):
            if not _vs_has(vis, sources[t], tag):
                n_new += 1
        if n_new == 0:
            continue
        if deg + n_new <= width:
            for t in range(s0, s1):
                u = sources[t]
                if _vs_add(vis, u, tag):
                    graph[j, deg] = u
                    deg += 1
            degrees[j] = deg
            continue
        ids = np.empty(deg + n_new, np.int32)
        ds = np.empty(deg + n_new, np.float32)
        widen(X[j], pf)
        n = 0
        for t in range(deg):
            ids[n] = graph[j, t]
            n += 1
        for t in range(s0, s1):
            u = sources[t]
            if _vs_add(vis, u, tag):
                ids[n] = u
                n += 1
        for t in range(n):
            ds[t] = _distance_to(X, norms, pf, norms[j], ids[t])
        degrees[j] = robust_prune(X, norms, ids, ds, alpha, R, graph[j])
    return vis


@njit(nogil=True, cache=True)
def _prune_rows(X, norms, lists, counts, row0, lo, hi, alpha, R, out, out_deg):
    """For rows i in [lo, hi) (node j = row0 + i): the distinct ids >= 0 of lists[i, :counts[i]]
    other than j, in order of first occurrence, kept as they are when at most R, else
    robust_pruned to R. Writes out[i] (-1 padded) and out_deg[i]. Memory O(lists' width)."""
    pf = np.empty(X.shape[1], np.float32)
    W = lists.shape[1]
    size = 16
    while size < 2 * (W + 1):
        size *= 2
    vis = np.zeros(size, np.int64)
    ids = np.empty(W, np.int32)
    for i in range(lo, hi):
        j = row0 + i
        tag = i - lo + 1
        _vs_add(vis, j, tag)
        n = 0
        for t in range(min(counts[i], W)):
            u = lists[i, t]
            if u >= 0 and _vs_add(vis, u, tag):
                ids[n] = u
                n += 1
        if n <= R:
            out[i, :n] = ids[:n]
            deg = n
        else:
            widen(X[j], pf)
            ds = np.empty(n, np.float32)
            for t in range(n):
                ds[t] = _distance_to(X, norms, pf, norms[j], ids[t])
            deg = robust_prune(X, norms, ids[:n], ds, alpha, R, out[i])
        out[i, deg:] = -1
        out_deg[i] = deg


def vector_norms(X: np.ndarray, threads: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """(N,) float32 squared norms of X ((N, d) uint16 fp16 bits, may be memory-mapped). 4 B/vector."""
    norms = np.empty(X.shape[0], np.float32)
    parallel_for(lambda lo, hi: squared_norms(X, lo, hi, norms), X.shape[0], threads, pool)
    return norms


def prune_rows(X: np.ndarray, norms: np.ndarray, lists: np.ndarray, counts: np.ndarray, row0: int, R: int,
               alpha: float, out: np.ndarray, out_deg: np.ndarray, threads: int,
               pool: ThreadPoolExecutor | None = None) -> None:
    """`prune_lists` for a block of rows: lists (B, W) int32 are the lists of nodes row0 ..
    row0 + B - 1 (the first counts[i] entries of row i count); X (N, d) uint16 fp16 bits and
    norms (N,) float32 of all nodes. Writes out (B, R) int32 (-1 padded) and out_deg (B,)."""
    parallel_for(lambda lo, hi: _prune_rows(X, norms, lists, counts, int(row0), lo, hi, float(alpha), R, out, out_deg),
                 lists.shape[0], threads, pool)


def prune_lists(
    vectors: np.ndarray, lists: np.ndarray, R: int, alpha: float = 1.2, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Re-prune neighbour lists to at most R each with robust_prune.

    For merging shard graphs: lists (N, W) int32 holds, per node, the union of its out-lists
    from every graph it is in (any order, duplicates allowed, -1 = empty slot); vectors
    (N, d) float16/float32. Returns (neighbours (N, R) int32 padded with -1, degrees (N,)
    int32). O(N * W * R * d) time.
    """
    X16 = as_fp16(vectors)
    X = X16.view(np.uint16)
    N = X.shape[0]
    lists = np.ascontiguousarray(lists, np.int32)
    if lists.shape[0] != N or (lists >= N).any():
        raise ValueError("lists must have one row per vector and ids < N")
    threads = resolve_threads(threads)
    out = np.empty((N, R), np.int32)
    degrees = np.empty(N, np.int32)
    counts = np.full(N, lists.shape[1], np.int32)
    with ThreadPoolExecutor(threads) as pool:
        norms = vector_norms(X, threads, pool)
        prune_rows(X, norms, lists, counts, 0, R, alpha, out, degrees, threads, pool)
    return out, degrees


def find_medoid(vectors: np.ndarray, block: int | None = None) -> int:
    """Index of the point closest (Euclidean) to the mean of `vectors` ((N, d) float), read
    `block` rows at a time (default: 16 MiB of float64 rows). Time O(N d), memory O(block d)."""
    n = vectors.shape[0]
    block = block or max(256, (16 << 20) // (8 * max(1, vectors.shape[1])))
    mean = np.zeros(vectors.shape[1], np.float64)
    for lo in range(0, n, block):
        mean += np.asarray(vectors[lo : lo + block], dtype=np.float64).sum(axis=0)
    mean = (mean / n).astype(np.float32)
    best, best_d = 0, np.inf
    for lo in range(0, n, block):
        x = np.asarray(vectors[lo : lo + block], dtype=np.float32)
        d = np.einsum("ij,ij->i", x, x) - 2.0 * (x @ mean)
        i = int(np.argmin(d))
        if d[i] < best_d:
            best, best_d = lo + i, float(d[i])
    return best


def _reverse_edges_by_target(points: np.ndarray, out: np.ndarray, out_deg: np.ndarray):
    """Edges p -> j of a batch (out[b, :out_deg[b]] for p = points[b]) grouped by target j,
    sources in batch order: (targets (G,), starts (G + 1,) into sources, sources)."""
    tgt = out[out >= 0]
    src = np.repeat(points, out_deg)
    by_target = np.argsort(tgt, kind="stable")
    tgt, src = tgt[by_target], src[by_target]
    targets, starts = np.unique(tgt, return_index=True)
    return targets, np.append(starts, tgt.shape[0]).astype(np.int64), src


def _batches(n: int, max_batch: int, grow: bool) -> list[tuple[int, int]]:
    out, lo, size = [], 0, 1 if grow else max_batch
    while lo < n:
        hi = min(n, lo + size)
        out.append((lo, hi))
        lo = hi
        size = min(max_batch, size * 2)
    return out


def _visit_sets(threads: int):
    """Per-thread visited sets (hash tables of VISIT_TABLE entries, grown by the kernels) and
    `take(t, count)`: the first of `count` fresh epochs of thread t (its table is cleared when
    the int32 range would run out). Memory O(threads * nodes one search touches), not O(N)."""
    tables = [np.zeros(VISIT_TABLE, np.int64) for _ in range(threads)]
    tag_next = np.ones(threads, np.int64)

    def take(t: int, count: int) -> int:
        if tag_next[t] + count >= _TAG_LIMIT:
            tables[t].fill(0)
            tag_next[t] = 1
        s = int(tag_next[t])
        tag_next[t] += count
        return s

    return tables, take


def _vamana_pass(pool, threads, X, norms, graph, degrees, start, order, batches, L, alpha, R, tables, take_tags,
                 desc: str, progress: bool | None, nav: tuple[np.ndarray, ...] | None = None) -> None:
    """One pass of Algorithm 3 over order[lo:hi] for each (lo, hi) in `batches`: every point's
    greedy_search from `start` + robust_prune against the graph frozen at the batch start, then
    its new out-list, then the reverse edges grouped by target. Updates graph/degrees in place.
    nav: `navigation_codes` to rank the searches by (None: exact distances)."""
    codes, cb_t, cnorm = nav if nav is not None else (NO_CODES, np.zeros((0, 0, 0), np.float32), NO_TABLE)
    bar = tqdm(total=int(sum(hi - lo for lo, hi in batches)), desc=desc, unit="pt",
               disable=None if progress is None else not progress)
    for lo, hi in batches:
        points = order[lo:hi]
        B = hi - lo
        out = np.full((B, R), -1, np.int32)
        out_deg = np.zeros(B, np.int32)
        slices = np.linspace(0, B, min(threads, B) + 1).astype(np.int64)

        def search_slice(t: int, points=points, out=out, out_deg=out_deg, slices=slices) -> None:
            s0, s1 = int(slices[t]), int(slices[t + 1])
            tag0 = take_tags(t, 2 * (s1 - s0) + 2)
            tables[t] = _search_and_prune(X, norms, graph, degrees, start, points, s0, s1, L, alpha, R, tables[t], tag0,
                                          out, out_deg, codes, cb_t, cnorm)

        # every point's greedy_search + robust_prune against the frozen graph
        list(pool.map(search_slice, range(len(slices) - 1)))
        # N_out(p) <- the pruned list, then the reverse edges, one target per thread
        graph[points, :R] = out
        graph[points, R:] = -1
        degrees[points] = out_deg

        targets, starts, src = _reverse_edges_by_target(points, out, out_deg)
        gsl = np.linspace(0, targets.shape[0], min(threads, max(1, targets.shape[0])) + 1).astype(np.int64)

        def reverse_slice(t: int, targets=targets, starts=starts, src=src, gsl=gsl) -> None:
            g0, g1 = int(gsl[t]), int(gsl[t + 1])
            tag0 = take_tags(t, g1 - g0 + 1)
            tables[t] = _add_reverse_edges(X, norms, graph, degrees, targets, starts, src, g0, g1, alpha, R, tables[t],
                                           tag0)

        list(pool.map(reverse_slice, range(len(gsl) - 1)))
        bar.update(B)
    bar.close()


def navigation_codes(X: np.ndarray, dsub: int = NAV_DSUB, seed: int = 0, threads: int | None = None,
                     pool: ThreadPoolExecutor | None = None, train_rows: int = NAV_TRAIN_ROWS,
                     iters: int = NAV_KMEANS_ITERS, block: int | None = None,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Product-quantisation codes the construction searches rank by (module doc).

    X: (N, d) uint16 fp16 bits or int8 rows (compared in their own units: the scale of int8
    rows cancels out of every ranking). Codebooks: M = ceil(d / dsub) independent k-means of
    256 centroids over dsub dimensions each (zero-padded), trained on `train_rows` rows drawn
    with `seed`; then every row is encoded, `block` rows at a time (default: NAV_BLOCK_BYTES
    of float32 rows), into `out` ((N, M) uint8, e.g. a memmap) where given.
    Returns (codes (N, M) uint8, transposed codebooks (M, dsub, 256) float32, squared
    centroid norms (M, 256) float32), as `_search_and_prune` takes them. Deterministic for a
    seed at any thread count. Time O((iters * train_rows + N) * 256 * d); memory the codes
    (N * M bytes) + `navigation_scratch_bytes(d)` at most.
    """
    n, d = X.shape
    if n < PQ_K:
        raise ValueError(f"navigation codes need at least {PQ_K} rows (got {n})")
    threads = resolve_threads(threads)
    M = -(-d // dsub)
    D = M * dsub
    block = block or max(1, NAV_BLOCK_BYTES // (4 * D))

    def rows(part: np.ndarray) -> np.ndarray:
        y = part.astype(np.float32) if part.dtype == np.int8 else part.view(np.float16).astype(np.float32)
        return np.pad(y, ((0, 0), (0, D - d))) if D > d else y

    rng = np.random.default_rng(seed)
    sample = rows(X[np.sort(rng.choice(n, size=min(n, train_rows), replace=False))])
    seeds = sample[rng.choice(sample.shape[0], size=PQ_K, replace=False)]
    centroids = kmeans_subspaces(sample, np.ascontiguousarray(seeds.reshape(PQ_K, M, dsub).transpose(1, 0, 2)), iters,
                                 rng, threads, pool)
    del sample
    codes = np.empty((n, M), np.uint8) if out is None else out
    if codes.shape != (n, M) or codes.dtype != np.uint8:
        raise ValueError(f"out must be ({n}, {M}) uint8, got {codes.shape} {codes.dtype}")
    for lo in range(0, n, block):
        codes[lo:lo + block] = assign_subspaces(rows(X[lo:lo + block]), centroids, threads, pool)[0]
    cb_t = np.ascontiguousarray(centroids.transpose(0, 2, 1), np.float32)
    cnorm = np.einsum("mkj,mkj->mk", centroids, centroids).astype(np.float32)
    return codes, cb_t, cnorm


def nav_dsub_for(d: int, code_bytes: int, n: int | None = None) -> int:
    """`build_vamana`'s nav_dsub for navigation codes of about `code_bytes` bytes per row of
    width d (`index.build_pq_bytes`; at most d) over n rows (None: any); 0, exact distances,
    for code_bytes <= 0 or fewer rows than codebook centroids."""
    if code_bytes <= 0 or (n is not None and n < PQ_K):
        return 0
    return -(-d // min(d, code_bytes))


def navigation_scratch_bytes(d: int, dsub: int = NAV_DSUB) -> int:
    """The most memory `navigation_codes` holds besides the codes it returns: the float32
    training sample and the k-means sums (its peak), or one block being encoded."""
    D = -(-d // dsub) * dsub
    return max(NAV_TRAIN_ROWS * D * 4 + 2 * PQ_K * D * 8, NAV_BLOCK_BYTES + D * 4)


def _prune_back(pool, threads, X, norms, graph, degrees, alpha, R, out, out_deg) -> None:
    """Lists grown past R by reverse edges are pruned back to R: out (N, R), out_deg (N,)
    (the first degrees[i] entries of graph[i] count)."""
    prune_rows(X, norms, graph, degrees, 0, R, alpha, out, out_deg, threads, pool)


def build_vamana(
    vectors: np.ndarray,
    R: int = 64,
    L: int = 100,
    alpha: float = 1.2,
    seed: int = 0,
    threads: int | None = None,
    max_batch: int | None = None,
    slack: float = 1.3,
    progress: bool | None = None,
    nav_dsub: int = 0,
    passes: int = 2,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Build a Vamana graph over `vectors` (usable on any subset, e.g. one shard).

    vectors: (N, d) float16 or float32 (stored and compared as fp16 -> fp32), or int8 from
    `kernels.quantize_int8` (compared as they are: half the bytes per distance, for the same
    graph quality on normalised embeddings, as `tests/test_index_core.py` checks). R: max degree;
    L: search list size during construction (>= R recommended); alpha >= 1: pruning slack of
    the second pass; seed: insertion order (the result is identical for a seed at any thread
    count); max_batch: points inserted per batch (default max(1000, N / 50), at most
    MAX_BATCH: a batch's lists and reverse edges take about 30 * R bytes per point); slack: out-lists
    may grow to ceil(slack * R) through reverse edges before being pruned back to R;
    nav_dsub: the construction searches rank by `navigation_codes` of one byte per nav_dsub
    dimensions (module doc; needs N >= 256); 0: by exact distances. passes: 2, Algorithm 3 (a
    pass with alpha = 1, then one with `alpha`), or 1, a single pass with `alpha` (as the
    reference implementation's builder does today): cheaper (the alpha-1 pass over a sparse
    graph is the lighter one), for a graph a little weaker at equal L (`bench/construction.py
    --variants two-pass,one-pass` measures both).

    Returns (neighbours (N, R) int32 padded with -1, degrees (N,) int32, medoid int).
    Time O(N * (L + R) * R * d) per pass, the searches' part d / nav_dsub times
    fewer bytes with codes; memory vectors + N * (slack * R * 4 + d / nav_dsub) bytes.
    """
    X = np.ascontiguousarray(vectors) if vectors.dtype == np.int8 else as_fp16(vectors).view(np.uint16)
    N, d = X.shape
    if N == 0:
        raise ValueError("cannot build a graph over zero vectors")
    if N >= 2**31 - 1:
        raise ValueError(f"{N} points exceed the int32 node id range of one graph")
    if R < 1 or L < 1 or alpha < 1.0:
        raise ValueError(f"need R >= 1, L >= 1, alpha >= 1 (got R={R}, L={L}, alpha={alpha})")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2 (got {passes})")
    threads = resolve_threads(threads)
    width = max(R, int(math.ceil(slack * R)))
    max_batch = max_batch or min(MAX_BATCH, max(1000, N // 50))

    norms = np.empty(N, np.float32)
    medoid = find_medoid(X if X.dtype == np.int8 else X.view(np.float16))
    graph = np.full((N, width), -1, np.int32)
    degrees = np.zeros(N, np.int32)
    order = np.random.default_rng(seed).permutation(N).astype(np.int32)
    tables, take_tags = _visit_sets(threads)

    if nav_dsub < 0 or (nav_dsub and N < PQ_K):
        raise ValueError(f"nav_dsub must be >= 0, and 0 below {PQ_K} points (got {nav_dsub} for {N})")

    with ThreadPoolExecutor(threads) as pool:
        parallel_for(lambda lo, hi: squared_norms(X, lo, hi, norms), N, threads, pool)
        nav = navigation_codes(X, nav_dsub, seed, threads, pool) if nav_dsub else None
        alphas = (1.0, float(alpha)) if passes == 2 else (float(alpha),)
        for pass_no, a in enumerate(alphas):
            batches = _batches(N, max_batch, grow=pass_no == 0)
            log.info("vamana pass %d/%d (alpha=%.3f): %d points in %d batches, ranked by %s", pass_no + 1, passes, a,
                     N, len(batches), f"{nav[0].shape[1]}-byte codes" if nav else "exact distances")
            _vamana_pass(pool, threads, X, norms, graph, degrees, medoid, order, batches, L, a, R, tables, take_tags,
                         f"vamana pass {pass_no + 1}/{passes}", progress, nav)
        del nav
        neighbours = np.empty((N, R), np.int32)
        final = np.empty(N, np.int32)
        _prune_back(pool, threads, X, norms, graph, degrees, alpha, R, neighbours, final)
    return neighbours, final, medoid


def refine_graph(
    vectors: np.ndarray,
    neighbours: np.ndarray,
    degrees: np.ndarray,
    start: int,
    L: int = 32,
    alpha: float = 1.2,
    seed: int = 0,
    threads: int | None = None,
    max_batch: int | None = None,
    slack: float = 1.3,
    progress: bool | None = None,
    overwrite: bool = False,
    points: np.ndarray | None = None,
    work_graph: str | os.PathLike | None = None,
    block: int = 65536,
    nav: tuple[np.ndarray, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One more Vamana pass (Algorithm 3's second pass) over an existing graph: for every
    point (or every one of `points`), in a seeded random order and in batches as in
    `build_vamana`, greedy_search the graph from `start` with list size L, robust_prune
    (alpha) the visited set together with the point's current out-list to R, and add the
    reverse edges; lists grown past R are pruned back at the end. For the merged graph of a
    sharded build: the searches run over all the shards at once, so nodes near shard borders
    gain the cross-shard edges that no single shard graph could hold. A small L (16-32) is
    enough, since every point starts from a good out-list.

    vectors: (N, d) float16/float32 (a float16 memmap is used in place); neighbours: (N, R)
    int32 padded with -1 (first degrees[i] valid); degrees: (N,) int; start: search start
    (the medoid of all vectors); points: distinct node ids to re-search (None: all; the
    others gain reverse edges only). Returns (neighbours (N, R) int32 padded with -1, degrees
    (N,) int32), identical for a seed at any thread count; with overwrite=True they are
    written into the arrays passed in (neighbours int32 C-contiguous, e.g. a writable memmap,
    degrees int32), saving N * R * 4 bytes. work_graph: a file path for the (N, ceil(slack *
    R)) int32 working graph (memory-mapped there and deleted at the end) instead of memory.
    nav: `navigation_codes(vectors)` (codes, cb_t, cnorm; the codes may be a memmap) for the
    searches to rank by, as `build_vamana`'s: a search then reads the full rows of the nodes
    it expands only, not of every neighbour it scores, which matters where the vectors do not
    fit in RAM.
    Time O(P * (L + R) * R * d) for P points. Memory besides vectors, the inputs and outputs:
    the working graph N * ceil(slack * R) * 4 bytes (none with work_graph) + norms and a
    degree copy 8 B/vector + 8 B per point + one batch's lists and reverse edges (at most
    MAX_BATCH points) + per thread a visited set of the nodes one search touches; every pass
    over the N rows goes in blocks of `block` rows.
    """
    X16 = as_fp16(vectors)
    N = X16.shape[0]
    nbrs = neighbours if isinstance(neighbours, np.ndarray) else np.asarray(neighbours)
    R = nbrs.shape[1] if nbrs.ndim == 2 else 0
    deg_in = degrees if isinstance(degrees, np.ndarray) else np.asarray(degrees)
    if nbrs.shape != (N, R) or deg_in.shape != (N,) or R < 1:
        raise ValueError(f"neighbours must be (N, R) and degrees (N,) for N={N} vectors")
    if L < 1 or alpha < 1.0 or not 0 <= int(start) < N:
        raise ValueError(f"need L >= 1, alpha >= 1 and 0 <= start < N (got L={L}, alpha={alpha}, start={start})")
    for lo in range(0, N, block):
        d = deg_in[lo:lo + block]
        if (d < 0).any() or (d > R).any() or (nbrs[lo:lo + block] >= N).any():
            raise ValueError("degrees must be in [0, R] and neighbour ids < N")
    pts = np.arange(N, dtype=np.int32) if points is None else np.asarray(points).astype(np.int32)
    if pts.ndim != 1 or (pts.size and (pts.min() < 0 or pts.max() >= N)):
        raise ValueError("points must be distinct node ids in [0, N)")
    if pts.size > 1:
        check = np.sort(pts)
        if not (check[1:] > check[:-1]).all():
            raise ValueError("points must be distinct node ids in [0, N)")
        del check
    if nav is not None and (nav[0].shape[0] != N or nav[0].shape[1] != nav[1].shape[0]):
        raise ValueError(f"nav codes of shape {nav[0].shape} for {N} vectors and {nav[1].shape[0]} codebooks")
    if overwrite and not (nbrs.dtype == np.int32 and nbrs.flags.c_contiguous and deg_in.dtype == np.int32):
        raise ValueError("overwrite needs int32 C-contiguous neighbours and int32 degrees")
    X = X16.view(np.uint16)
    threads = resolve_threads(threads)
    width = max(R, int(math.ceil(slack * R)))
    max_batch = max_batch or min(MAX_BATCH, max(1000, N // 50))

    if work_graph is None:
        graph = np.empty((N, width), np.int32)
    else:
        graph = np.lib.format.open_memmap(work_graph, mode="w+", dtype=np.int32, shape=(N, width))
    for lo in range(0, N, block):
        graph[lo:lo + block, :R] = nbrs[lo:lo + block]
        graph[lo:lo + block, R:] = -1
    deg = np.array(deg_in, dtype=np.int32)  # a copy: with overwrite, deg_in receives the pruned result
    # order = pts[permutation(P)], shuffled in place (Generator.permutation(P) is arange(P) shuffled)
    order = pts  # a copy of `points` (astype copies)
    np.random.default_rng(seed).shuffle(order)
    tables, take_tags = _visit_sets(threads)
    out, out_deg = (nbrs, deg_in) if overwrite else (np.empty((N, R), np.int32), np.empty(N, np.int32))

    try:
        with ThreadPoolExecutor(threads) as pool:
            norms = vector_norms(X, threads, pool)
            batches = _batches(pts.size, max_batch, grow=False)
            log.info("vamana refinement pass (L=%d, alpha=%.3f%s): %d of %d points in %d batches", L, alpha,
                     f", navigation codes of {nav[0].shape[1]} B" if nav else "", pts.size, N, len(batches))
            _vamana_pass(pool, threads, X, norms, graph, deg, int(start), order, batches, int(L), float(alpha), R,
                         tables, take_tags, "vamana refinement", progress, nav)
            for lo in range(0, N, block):
                hi = min(N, lo + block)
                prune_rows(X, norms, graph[lo:hi], deg[lo:hi], lo, R, alpha, out[lo:hi], out_deg[lo:hi], threads, pool)
    finally:
        if work_graph is not None:
            del graph
            os.remove(work_graph)
    return out, out_deg
