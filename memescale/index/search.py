"""`Index`: the disk-resident searcher (DiskANN beam search with PQ distances in RAM).

RAM holds the PQ codes (N x M bytes), the small arrays (codebooks, transforms, entry
points) and a BFS cache of the records nearest the entry points. Records are read from
``records.bin`` in one of two ways (`Index.open(io=...)`):
- "mmap" (default): through a read-only memory map, so the page cache keeps hot records;
  each beam step requests its sectors with ``madvise(MADV_WILLNEED)`` before touching any.
- "direct": O_DIRECT reads with Linux native AIO (`aio.py`), as DiskANN reads: each query
  submits its beam's sectors at once and is expanded when they have all arrived, while the
  worker waits for (or computes on) its other queries; the search's reads never go through
  the page cache. The node cache, `vectors` and `metadata` still read through the mapping
  (so fetching a result's metadata costs one page-cache read of its sector).

Beam search, per query (numba, nogil): the candidate list holds the L best nodes by ADC
score; each step takes the best `beam_width` unexpanded ones, reads their records (one
sector each; cached nodes cost no read), scores them exactly from the fp16 vector (the
re-rank pool), and ADC-scores their not yet seen neighbours into the list. It stops when
every listed node is expanded or the I/O budget is spent, and returns the top-k of the
re-rank pool by exact inner product; nodes in an exclusion bitmap (deleted, or not matching
a filter) are traversed like any other but never enter the pool. Each worker thread runs `interleave` queries at once,
each taking its next step as soon as its own reads are in, so one thread keeps up to
interleave x beam_width reads in flight on a cold cache. Each query's visited set is a small
hash table (memory follows the nodes it touches, not N).
Both read paths return the same results.

A damaged record (a corrupt file that passed the cheap open-time checks) is never returned: a
record that could enter a query's top k must pass its CRC-32 first, and one that fails, or
whose degree or neighbour ids are out of range, is skipped and counted (`SearchStats.corrupt`,
logged with its node id); its in-range neighbours are still followed. `Index.verify` checks
the whole file.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit

from .aio import AioView, DirectIOUnavailable, DirectReader, reap, set_read, submit
from .disk import (
    ARRAYS_FILE,
    CODES_FILE,
    IDS_FILE,
    MAGIC_ARRAYS,
    MAGIC_CODES,
    MAGIC_IDS,
    MAGIC_OVERFLOW,
    OVERFLOW_FILE,
    RECORDS_FILE,
    SPILL_BIT,
    IndexFormatError,
    decode_metadata,
    map_small_file,
    read_record_header,
    read_small_file,
    resolve_generation,
    unpack_arrays,
    verify_records,
)
from .kernels import (
    crc32_words,
    dot_hf,
    madvise_willneed,
    monotonic_ns,
    prefetch_address,
    prefetch_bytes,
    resolve_threads,
)
from .labels import LABELS_FILE, MAGIC_POSTINGS, NO_FILTER, POSTINGS_FILE, LabelFilter, load_labels
from .pq import PQCodec, adc_score
from .weighting import WEIGHTING_FILE, Weighting

log = logging.getLogger(__name__)

# Layout vector fields (disk.RecordLayout.as_array).
_REC, _NPS, _SPN, _SECTOR, _VEC, _DEG, _NBR, _META, _DIM, _R, _CRC = range(11)
_CACHED, _MAPPED, _BUFFER = 0, 1, 2  # where a beam's record is read from
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier of the visited sets
_VISIT_LOAD = 2  # visited sets stay at most half full
_NO_EXCLUDE = np.zeros(0, np.uint8)  # an exclusion bitmap that excludes nothing
_NO_STARTS = np.zeros(0, np.int64)  # no entry points beyond the index's
SCAN_AHEAD = 16  # `Index.scan` prefetches the PQ codes of the member this many ahead


class IndexView(NamedTuple):
    """An open index as the search kernels take it (plain ints and C-contiguous arrays, so
    the compiled kernels stay cached). Built once by `Index.open`."""

    qtransform: np.ndarray  # (d, M * dsub) float32: the codec's query transform
    centroids: np.ndarray  # (M, 256, dsub) float32: the codec's codebooks
    codes: np.ndarray  # (N, M) uint8: PQ codes of every node
    entry: np.ndarray  # (E,) int64: entry points
    lay: np.ndarray  # (11,) int64: record layout vector (fields _REC ... _CRC)
    r16: np.ndarray  # uint16 view of the whole record file, mapped read-only
    r32: np.ndarray  # int32 view of the same mapping
    base_addr: int  # address of the mapping's first byte
    cache_ids: np.ndarray  # (C,) int64: sorted ids of the nodes cached in RAM
    c16: np.ndarray  # uint16 view of the cached records (slot s at byte s * record size)
    c32: np.ndarray  # int32 view of the same buffer
    labels: np.ndarray  # (N,) labels.LABEL_DTYPE: per-node filter labels


class SearchParams(NamedTuple):
    """Per-call search settings."""

    L: int  # candidate list size
    W: int  # beam width: records taken per step of one query
    io_budget: int  # max sector reads per query (<= 0: unlimited)
    prefetch: bool  # madvise(WILLNEED) each beam's sectors before reading them (mapped reads)
    exclude: np.ndarray  # (ceil(N / 8),) uint8 bitmap (bit u % 8 of byte u // 8, little bit
    # order) of nodes never returned, still traversed; (0,): none
    flt: LabelFilter  # label conditions a returned node meets (NO_FILTER: none)
    starts: np.ndarray  # (S,) int64 entry points added to the index's for this call (0,): none
    mismatch: np.float32  # under an active flt: taken off the list score of a node that fails it


class Results(NamedTuple):
    """Per-query outputs, row i: query i (of a group in `beam_search`, of the call in
    `_search_range`)."""

    ids: np.ndarray  # (n, k) int64: result ids, best first; -1 past the last expanded node
    scores: np.ndarray  # (n, k) float32: their exact inner products; -inf past the last
    reads: np.ndarray  # (n,) int64: sector reads (cache hits excluded)
    cmps: np.ndarray  # (n,) int64: ADC evaluations
    ns: np.ndarray  # (n,) int64: beam_search writes the monotonic ns at which each query
    # finished; _search_range turns that into the latency from the start of its group
    corrupt: np.ndarray  # (n,) int64: records that failed their CRC (or held impossible
    # neighbour lists) and were skipped
    bad: np.ndarray  # (n,) int64: the last such node, -1 if none


class Candidates(NamedTuple):
    """The candidate lists of a group of G queries (row g: query g), sorted by descending
    ADC score."""

    ids: np.ndarray  # (G, L) int64: node ids
    scores: np.ndarray  # (G, L) float32: their ADC scores
    done: np.ndarray  # (G, L) bool: expanded
    n: np.ndarray  # (G,) int64: list sizes
    cur: np.ndarray  # (G,) int64: no unexpanded node before this position


class Beams(NamedTuple):
    """The current beam and progress of each query of a group of G (row g: query g)."""

    ids: np.ndarray  # (G, W) int64: node ids of the beam's records
    off: np.ndarray  # (G, W) int64: byte offset of each record in its source
    src: np.ndarray  # (G, W) int8: where each record is read: _CACHED, _MAPPED, _BUFFER
    size: np.ndarray  # (G,) int64: beam sizes
    pending: np.ndarray  # (G,) int64: direct reads of the beam still in flight
    active: np.ndarray  # (G,) bool: not finished yet
    exhausted: np.ndarray  # (G,) bool: stopped by the I/O budget


@njit(nogil=True, cache=True, inline="always")
def _accepts(u, exclude, flt, labels):
    """Whether node u may be returned: not in the exclusion bitmap, and its labels meet `flt`."""
    if exclude.shape[0] and (exclude[u >> 3] >> (u & 7)) & 1:
        return False
    if not flt.active:
        return True
    r = labels[u]
    if not flt.allow_nsfw and (r.flags & 1):
        return False
    if r.month < flt.month_lo or r.month > flt.month_hi or r.bucket < flt.min_bucket:
        return False
    if flt.sub_mode != 0:
        ids = flt.sub_ids
        lo, hi = 0, ids.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if ids[mid] < r.sub:
                lo = mid + 1
            else:
                hi = mid
        found = lo < ids.shape[0] and ids[lo] == r.sub
        if found != (flt.sub_mode == 1):
            return False
    return True


@njit(nogil=True, cache=True, inline="always")
def _priority(u, table, codes, par, labels):
    """Candidate-list score of node u: its ADC score, less par.mismatch when a label filter
    is active and u does not meet it (such nodes are expanded as bridges only when no
    matching candidate is nearly as good; the results are ranked by exact scores)."""
    s = adc_score(table, codes, u)
    if par.flt.active and par.mismatch > 0 and not _accepts(u, _NO_EXCLUDE, par.flt, labels):
        s -= par.mismatch
    return s


@njit(nogil=True, cache=True, inline="always")
def _record_offset(i, lay):
    return lay[_SECTOR] * (1 + (i // lay[_NPS]) * lay[_SPN]) + (i % lay[_NPS]) * lay[_REC]


@njit(nogil=True, cache=True, inline="always")
def _cache_slot(cache_ids, i):
    lo, hi = 0, cache_ids.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if cache_ids[mid] < i:
            lo = mid + 1
        else:
            hi = mid
    if lo < cache_ids.shape[0] and cache_ids[lo] == i:
        return lo
    return -1


@njit(nogil=True, cache=True, inline="always")
def _visit(vis, g, u, shift):
    """Add node u to query g's visited set, row g of `vis` (open addressing with linear
    probing, int32 ids, -1 empty, rows of 2^(64 - shift)); True if u was not in it yet."""
    mask = np.uint64(vis.shape[1] - 1)
    i = (np.uint64(u) * _GOLDEN) >> shift
    while True:
        v = vis[g, i]
        if v == u:
            return False
        if v < 0:
            vis[g, i] = u
            return True
        i = (i + np.uint64(1)) & mask


@njit(nogil=True, cache=True, inline="always")
def _unvisit(vis, g, u, shift):
    """Remove node u from query g's visited set; correct when nodes leave in the reverse
    order they came in (the table is then exactly as it was right after u's insertion)."""
    mask = np.uint64(vis.shape[1] - 1)
    i = (np.uint64(u) * _GOLDEN) >> shift
    while vis[g, i] != u:
        i = (i + np.uint64(1)) & mask
    vis[g, i] = -1


@njit(nogil=True, cache=True)
def _hash_shift(size):
    """64 - log2(size) for a power-of-two table size."""
    b = 0
    while (1 << b) < size:
        b += 1
    return np.uint64(64 - b)


@njit(nogil=True, cache=True)
def _grow_visited(vis, seen, n_seen):
    """`vis` rehashed into tables twice as large (rows g < len(n_seen) hold seen[g, :n_seen[g]])."""
    out = np.full((vis.shape[0], 2 * vis.shape[1]), -1, np.int32)
    shift = _hash_shift(out.shape[1])
    for g in range(n_seen.shape[0]):
        for t in range(n_seen[g]):
            _visit(out, g, seen[g, t], shift)
    return out


@njit(nogil=True, cache=True)
def _grow_rows(a):
    """Copy of 2-D `a` with twice the columns (the new ones uninitialised)."""
    b = np.empty((a.shape[0], 2 * a.shape[1]), a.dtype)
    b[:, : a.shape[1]] = a
    return b


@njit(nogil=True, cache=True, inline="always")
def _insert(cand_id, cand_s, done, n, L, u, s):
    """Insert (u, s) into the list sorted by descending s; returns (new size, position or L)."""
    if n == L and s <= cand_s[n - 1]:
        return n, L
    pos = n if n < L else L - 1
    while pos > 0 and cand_s[pos - 1] < s:
        cand_id[pos] = cand_id[pos - 1]
        cand_s[pos] = cand_s[pos - 1]
        done[pos] = done[pos - 1]
        pos -= 1
    cand_id[pos] = u
    cand_s[pos] = s
    done[pos] = False
    return (n + 1 if n < L else n), pos


@njit(nogil=True, cache=True, inline="always")
def _select_beam(g, cand, beam, ix, par, out):
    """Take query g's best W unexpanded candidates as its beam (marking them expanded);
    returns the beam's size. Sets beam.exhausted[g] when the I/O budget stops it early."""
    lay = ix.lay
    m = 0
    i = cand.cur[g]
    while i < cand.n[g] and m < par.W:
        if not cand.done[g, i]:
            u = cand.ids[g, i]
            slot = _cache_slot(ix.cache_ids, u)
            if slot >= 0:
                beam.off[g, m] = slot * lay[_REC]
                beam.src[g, m] = _CACHED
            else:
                if par.io_budget > 0 and out.reads[g] + lay[_SPN] > par.io_budget:
                    beam.exhausted[g] = True
                    break
                beam.off[g, m] = _record_offset(u, lay)
                beam.src[g, m] = _MAPPED
                out.reads[g] += lay[_SPN]
            beam.ids[g, m] = u
            cand.done[g, i] = True
            m += 1
        i += 1
    return m


@njit(nogil=True, cache=True, inline="always")
def _request_beam(g, beam, ix, par, io):
    """Ask for the sectors of query g's beam: with direct reads, fill iocbs [g W, g W + n)
    (the records then live in the slot buffer) and return n, the reads to submit; through
    the mapping, madvise them (when `par.prefetch`) and return 0."""
    lay = ix.lay
    sector = lay[_SECTOR]
    span = lay[_SPN] * sector
    j = g * par.W
    for b in range(beam.size[g]):
        if beam.src[g, b] != _MAPPED:
            continue
        at = beam.off[g, b] // sector * sector
        if io.fd >= 0:
            set_read(io.iocbs, j, io.fd, io.b16.ctypes.data + j * span, span, at)
            beam.off[g, b] = j * span + beam.off[g, b] - at
            beam.src[g, b] = _BUFFER
            j += 1
        else:
            if par.prefetch:
                madvise_willneed(ix.base_addr + at, span)
            prefetch_bytes(ix.base_addr + beam.off[g, b], lay[_META])
    return j - g * par.W


@njit(nogil=True, cache=True, inline="always")
def _next_beam(g, cand, beam, ix, par, io, out):
    """Start query g's next step: take its beam and request its sectors, submitting the
    direct reads. Returns the reads submitted (0: the beam is readable now), or -1 when the
    query has finished (nothing left to expand, or its I/O budget spent; out.ns[g] is then
    its finishing time)."""
    beam.size[g] = 0 if cand.cur[g] >= cand.n[g] or beam.exhausted[g] else _select_beam(g, cand, beam, ix, par, out)
    if beam.size[g] == 0:
        beam.active[g] = False
        out.ns[g] = monotonic_ns()
        return -1
    beam.pending[g] = _request_beam(g, beam, ix, par, io)
    if beam.pending[g] > 0:
        submit(io.ctx, io.ptrs, g * par.W, beam.pending[g])
    return beam.pending[g]


@njit(nogil=True, cache=True, inline="always")
def _record_sound(r32, off, rec_words, crc_word):
    """Whether the record at byte offset `off` of an int32 view `r32` (record file, cache or
    read buffer) passes its CRC-32 (word `crc_word` of its `rec_words`). O(rec_words)."""
    w0 = off >> 2
    return crc32_words(r32, w0, w0 + rec_words, w0 + crc_word) == (np.int64(r32[w0 + crc_word]) & 0xFFFFFFFF)


@njit(nogil=True, cache=True)
def beam_search(Q, tables, ix, par, io, vis, out):
    """Beam search for a group of G queries, each advancing as soon as its reads are in.

    A query's step takes its beam (its best W unexpanded candidates), requests their
    sectors, and once all have arrived expands them: exact score from the record's fp16
    vector into the re-rank pool, ADC scores of the unseen neighbours into the candidate
    list. While one query's reads are in flight the others compute, so up to G * W reads
    are outstanding. A query finishes when its list has no unexpanded node or its I/O
    budget is spent. Each query's result depends on nothing but itself.

    Q: (G, d) float32 queries; tables: (G, M, 256) float32 their ADC tables; ix: the
    `IndexView`; par: `SearchParams`; io: the `AioView` of an IoSlot with room for G * W
    reads, for direct reads into its buffer (io.fd < 0: read through the mapping instead);
    vis: (>= G, 2^b) int32 empty visited sets (-1), one row per query (hash tables: memory
    follows the nodes a query touches, not N), returned empty, grown when a query outgrew
    them. Writes the G rows of `out` (`Results`; out.ns: monotonic ns at which each query
    finished).
    Time O(expansions * (R * M + d)) per query; memory O(G * (L + seen)).
    """
    G = Q.shape[0]
    L, W = par.L, par.W
    exclude = par.exclude
    codes, entry, lay = ix.codes, ix.entry, ix.lay
    code_base, code_row = codes.ctypes.data, codes.shape[1]
    label_base, filtered = ix.labels.ctypes.data, par.flt.active
    r16, r32, c16, c32, b16, b32 = ix.r16, ix.r32, ix.c16, ix.c32, io.b16, io.b32
    reads, cmps = out.reads, out.cmps
    shift = _hash_shift(vis.shape[1])
    n_nodes = codes.shape[0]
    dim = lay[_DIM]
    cand = Candidates(np.empty((G, L), np.int64), np.empty((G, L), np.float32), np.zeros((G, L), np.bool_),
                      np.zeros(G, np.int64), np.zeros(G, np.int64))
    beam = Beams(np.empty((G, W), np.int64), np.empty((G, W), np.int64), np.empty((G, W), np.int8),
                 np.zeros(G, np.int64), np.zeros(G, np.int64), np.ones(G, np.bool_), np.zeros(G, np.bool_))
    cand_id, cand_s, done, n, cur = cand
    beam_id, beam_off, beam_src, nb, pending, active = beam.ids, beam.off, beam.src, beam.size, beam.pending, beam.active
    starts = par.starts
    n_entry = entry.shape[0] + starts.shape[0]
    seen = np.empty((G, max(32 * L, n_entry)), np.int64)
    n_seen = np.zeros(G, np.int64)
    pool_id = np.empty((G, 2 * L), np.int64)
    pool_s = np.empty((G, 2 * L), np.float32)
    n_pool = np.zeros(G, np.int64)
    k = out.ids.shape[1]
    top_s = np.empty((G, k), np.float32)  # each query's k best pool scores, descending
    n_top = np.zeros(G, np.int64)
    rec_words, crc_word = lay[_REC] >> 2, lay[_CRC] >> 2
    for g in range(G):
        reads[g] = 0
        cmps[g] = 0
        out.corrupt[g] = 0
        out.bad[g] = -1
        while _VISIT_LOAD * (n_seen[g] + n_entry) > vis.shape[1]:
            vis = _grow_visited(vis, seen, n_seen)
        shift = _hash_shift(vis.shape[1])
        for e in range(n_entry):
            u = entry[e] if e < entry.shape[0] else starts[e - entry.shape[0]]
            if not _visit(vis, g, u, shift):
                continue
            seen[g, n_seen[g]] = u
            n_seen[g] += 1
            cmps[g] += 1
            n[g], _ = _insert(cand_id[g], cand_s[g], done[g], n[g], L, u, _priority(u, tables[g], codes, par, ix.labels))
    n_active = G
    in_flight = 0
    for g in range(G):
        got = _next_beam(g, cand, beam, ix, par, io, out)
        if got < 0:
            n_active -= 1
        else:
            in_flight += got
    while n_active > 0:
        ready = 0
        for g in range(G):
            if not active[g] or pending[g] > 0:
                continue
            # expand query g's beam, whose records are all readable now
            while _VISIT_LOAD * (n_seen[g] + nb[g] * lay[_R]) > vis.shape[1]:  # room for every neighbour
                vis = _grow_visited(vis, seen, n_seen)
            shift = _hash_shift(vis.shape[1])
            lowest = n[g]
            for b in range(nb[g]):
                off = beam_off[g, b]
                src = beam_src[g, b]
                r16b, r32b = (c16, c32) if src == _CACHED else ((r16, r32) if src == _MAPPED else (b16, b32))
                v0 = (off + lay[_VEC]) >> 1
                if n_pool[g] == pool_id.shape[1]:
                    pool_id = _grow_rows(pool_id)
                    pool_s = _grow_rows(pool_s)
                bu = beam_id[g, b]
                damaged = False
                if _accepts(bu, exclude, par.flt, ix.labels):
                    s = dot_hf(r16b[v0 : v0 + dim], Q[g])
                    if n_top[g] < k or s > top_s[g, k - 1]:
                        # a would-be result: its record must pass its CRC first (a score
                        # below the k-th best can never be returned, so it needs no check)
                        damaged = not _record_sound(r32b, off, rec_words, crc_word)
                        if not damaged:
                            t = min(n_top[g], k - 1)
                            while t > 0 and top_s[g, t - 1] < s:
                                top_s[g, t] = top_s[g, t - 1]
                                t -= 1
                            top_s[g, t] = s
                            n_top[g] = min(n_top[g] + 1, k)
                    if not damaged:
                        pool_id[g, n_pool[g]] = bu
                        pool_s[g, n_pool[g]] = s
                        n_pool[g] += 1
                deg = r32b[(off + lay[_DEG]) >> 2]
                if deg < 0 or deg > lay[_R]:  # damaged: its neighbours are unknown
                    damaged = True
                    deg = 0
                # a damaged record is never returned but still expanded: its in-range
                # neighbour ids are real nodes, and skipping it could strand the search
                nb0 = (off + lay[_NBR]) >> 2
                for t in range(deg):  # each neighbour's PQ code (and label) is a cache miss: start them all
                    prefetch_address(code_base + np.int64(r32b[nb0 + t]) * code_row)
                    if filtered:
                        prefetch_address(label_base + np.int64(r32b[nb0 + t]) * 8)  # LABEL_DTYPE: 8 bytes
                for t in range(deg):
                    u = r32b[nb0 + t]
                    if u < 0 or u >= n_nodes:
                        damaged = True
                        continue
                    if not _visit(vis, g, u, shift):
                        continue
                    if n_seen[g] == seen.shape[1]:
                        seen = _grow_rows(seen)
                    seen[g, n_seen[g]] = u
                    n_seen[g] += 1
                    cmps[g] += 1
                    n[g], pos = _insert(cand_id[g], cand_s[g], done[g], n[g], L, u,
                                        _priority(u, tables[g], codes, par, ix.labels))
                    if pos < lowest:
                        lowest = pos
                if damaged:
                    out.corrupt[g] += 1
                    out.bad[g] = bu
            c = min(cur[g], lowest)
            while c < n[g] and done[g, c]:
                c += 1
            cur[g] = c
            got = _next_beam(g, cand, beam, ix, par, io, out)
            if got < 0:
                n_active -= 1
            elif got == 0:
                ready += 1
            else:
                in_flight += got
        if in_flight > 0:
            got = reap(io.ctx, io.events, io.iocbs, 0 if ready else 1, in_flight)
            for e in range(got):
                pending[io.events[e, 0] // W] -= 1
            in_flight -= got
    for g in range(G):
        for t in range(n_seen[g] - 1, -1, -1):  # reverse insertion order keeps every chain intact
            _unvisit(vis, g, seen[g, t], shift)
        order = np.argsort(-pool_s[g, : n_pool[g]], kind="mergesort")
        for t in range(k):
            if t < n_pool[g]:
                out.ids[g, t] = pool_id[g, order[t]]
                out.scores[g, t] = pool_s[g, order[t]]
            else:
                out.ids[g, t] = -1
                out.scores[g, t] = -np.inf
    return vis


@njit(nogil=True, cache=True, fastmath=True)
def _adc_table(q, B, qt, centroids, table):
    """ADC table (M, 256) of query q (d,): qt = q @ B (B: (d, M * dsub) query transform), then
    table[m, c] = qt[m * dsub:(m + 1) * dsub] . centroids[m, c]. O(d D + 256 D)."""
    M, k, dsub = centroids.shape
    qt[:] = 0.0
    for j in range(q.shape[0]):
        qj = q[j]
        for c in range(qt.shape[0]):
            qt[c] += qj * B[j, c]
    for m in range(M):
        for c in range(k):
            s = np.float32(0.0)
            for j in range(dsub):
                s += qt[m * dsub + j] * centroids[m, c, j]
            table[m, c] = s


def matching_nodes(members: np.ndarray, flt: LabelFilter, labels: np.ndarray) -> np.ndarray:
    """The nodes of `members` (m,) int64 whose `labels` ((N,) LABEL_DTYPE) meet `flt`, in order."""
    if not flt.active:
        return np.asarray(members, np.int64)
    return _matching(np.ascontiguousarray(members, np.int64), flt, labels)


@njit(nogil=True, cache=True)
def _matching(members, flt, labels):
    """The nodes of `members` (m,) int64 whose labels meet `flt` (`_accepts`), in order."""
    m = members.shape[0]
    out = np.empty(m, np.int64)
    base = labels.ctypes.data
    n = 0
    for i in range(m):
        if i + SCAN_AHEAD < m:
            prefetch_address(base + members[i + SCAN_AHEAD] * 8)  # LABEL_DTYPE rows are 8 bytes
        u = members[i]
        if _accepts(u, _NO_EXCLUDE, flt, labels):
            out[n] = u
            n += 1
    return out[:n]


@njit(nogil=True, cache=True)
def _scan_matching(table, codes, members, flt, labels, ids, est):
    """Score the members (m,) int32/int64 that meet `flt` by ADC with `table` (M, 256) and
    keep the best len(ids) of them in ids (keep,) int64 and est (keep,) float32, a min-heap
    by est (ties: the earlier member stays); returns (matching members, kept). One pass: each
    member's label row and code row are cache misses, those SCAN_AHEAD members on are
    prefetched so the misses overlap. O(m M + m log keep) time, O(keep) memory."""
    n = members.shape[0]
    keep = ids.shape[0]
    code_base, row = codes.ctypes.data, codes.shape[1]
    label_base = labels.ctypes.data
    check = flt.active
    matched = 0
    size = 0
    for i in range(n):
        if i + SCAN_AHEAD < n:
            ahead = np.int64(members[i + SCAN_AHEAD])
            at = code_base + ahead * row
            prefetch_address(at)
            prefetch_address(at + row - 1)  # a row may straddle two cache lines
            if check:
                prefetch_address(label_base + ahead * 8)  # LABEL_DTYPE rows are 8 bytes
        u = np.int64(members[i])
        if check and not _accepts(u, _NO_EXCLUDE, flt, labels):
            continue
        matched += 1
        s = adc_score(table, codes, u)
        if size < keep:  # sift up
            j = size
            size += 1
            while j > 0:
                parent = (j - 1) >> 1
                if est[parent] <= s:
                    break
                est[j] = est[parent]
                ids[j] = ids[parent]
                j = parent
            est[j] = s
            ids[j] = u
        elif s > est[0]:  # replace the worst kept, sift down
            j = 0
            while True:
                c = 2 * j + 1
                if c >= keep:
                    break
                if c + 1 < keep and est[c + 1] < est[c]:
                    c += 1
                if est[c] >= s:
                    break
                est[j] = est[c]
                ids[j] = ids[c]
                j = c
            est[j] = s
            ids[j] = u
    return matched, size


@njit(nogil=True, cache=True)
def _search_range(lo, hi, group, Q, ix, par, io, out):
    """beam_search queries [lo, hi) of Q (nq, d) float32, `group` at a time, into rows
    [lo, hi) of `out` (`Results` of nq rows; out.ns[i]: query i's latency in ns from the
    start of its group)."""
    M, k, dsub = ix.centroids.shape
    tables = np.empty((group, M, k), np.float32)
    qt = np.empty(M * dsub, np.float32)
    vis = np.full((group, 1 << 12), -1, np.int32)  # grows to fit the busiest query
    for s in range(lo, hi, group):
        e = min(hi, s + group)
        t0 = monotonic_ns()
        for i in range(s, e):
            _adc_table(Q[i], ix.qtransform, qt, ix.centroids, tables[i - s])
        part = Results(out.ids[s:e], out.scores[s:e], out.reads[s:e], out.cmps[s:e], out.ns[s:e],
                       out.corrupt[s:e], out.bad[s:e])
        vis = beam_search(Q[s:e], tables[: e - s], ix, par, io, vis, part)
        for i in range(s, e):
            out.ns[i] -= t0


@njit(nogil=True, cache=True)
def _records_ok(r32, offsets, rec_words, crc_word, ok):
    """ok[i] = whether the record at byte offset offsets[i] of the record file (int32 view
    `r32`) passes its CRC-32. O(len(offsets) * rec_words)."""
    for i in range(offsets.shape[0]):
        ok[i] = _record_sound(r32, offsets[i], rec_words, crc_word)


IO_MODES = ("mmap", "direct")
BEAM_WIDTH = 4  # default sector reads per step of one query
# Default queries per worker: a device read (direct) takes far longer than a page-cache
# hit, so hiding it takes more queries in flight.
INTERLEAVE = {"mmap": 4, "direct": 8}
# What the kernels take for an IoSlot when records are read through the mapping.
_NO_AIO = AioView(0, -1, np.zeros((1, 8), np.uint64), np.zeros(1, np.uint64), np.zeros((1, 4), np.int64),
                  np.zeros(8, np.uint16), np.zeros(4, np.int32))
_NO_AIO.b16.flags.writeable = _NO_AIO.b32.flags.writeable = False


def exclusion_bitmap(n: int, ids: np.ndarray | None = None) -> np.ndarray:
    """(ceil(n / 8),) uint8 bitmap with the bits of node ids `ids` (int, in [0, n)) set, in
    the bit order `Index.search(exclude=...)` reads. n / 8 bytes."""
    bits = np.zeros((n + 7) // 8, np.uint8)
    if ids is not None and len(ids):
        a = np.asarray(ids, np.int64)
        if a.min() < 0 or a.max() >= n:
            raise IndexError(f"node ids must be in [0, {n})")
        np.bitwise_or.at(bits, a >> 3, (1 << (a & 7)).astype(np.uint8))
    return bits


@dataclass
class SearchStats:
    """Per-query cost of one `Index.search` call: arrays of shape (nq,)."""

    reads: np.ndarray  # int64 sector reads (cache hits excluded)
    pq_comparisons: np.ndarray  # int64 ADC evaluations
    ms: np.ndarray  # float64 latency: from the start of the query's group to its end
    corrupt: np.ndarray  # int64 damaged records met and skipped (failed CRC, impossible lists)

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def summary(self) -> dict[str, float]:
        """mean / p50 / p99 of each per-query array, and the damaged records skipped."""
        out = {}
        for name in ("reads", "pq_comparisons", "ms"):
            a = np.asarray(self[name], np.float64)
            if a.size:
                out[f"{name}_mean"] = float(a.mean())
                out[f"{name}_p50"] = float(np.percentile(a, 50))
                out[f"{name}_p99"] = float(np.percentile(a, 99))
        out["corrupt_records"] = float(np.sum(self.corrupt))
        return out


class Index:
    """A disk index opened for search; see the module doc. Use `Index.open(dir)`.

    RAM: N x M bytes of PQ codes + small arrays + cache_nodes records (the image-id map
    is memory-mapped).
    """

    def __init__(self, path: Path, threads: int | None, cache_nodes: int, prefetch: bool, interleave: int | None,
                 io: str):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        self.path = path
        self.io = io
        self._mm = None
        self._fd = None
        self._pool = None
        self._direct = None
        self._view = None
        arrays, self.info = unpack_arrays(path / ARRAYS_FILE, read_small_file(path / ARRAYS_FILE, MAGIC_ARRAYS)[0])
        try:
            self.entry_points = np.ascontiguousarray(arrays["entry_points"], np.int64)
            self.codec = PQCodec.from_arrays({k[3:]: v for k, v in arrays.items() if k.startswith("pq_")})
        except KeyError as e:
            raise IndexFormatError(path / ARRAYS_FILE, f"missing array {e}") from None
        self.layout, _ = read_record_header(path / RECORDS_FILE)
        payload, rows, cols = read_small_file(path / CODES_FILE, MAGIC_CODES)
        if rows != self.layout.count or cols != self.codec.M or len(payload) != rows * cols:
            raise IndexFormatError(
                path / CODES_FILE, f"holds {rows} x {cols} codes, the index has {self.layout.count} nodes x {self.codec.M} bytes"
            )
        self.codes = np.frombuffer(payload, np.uint8).reshape(rows, cols)
        self.overflow = read_small_file(path / OVERFLOW_FILE, MAGIC_OVERFLOW)[0]
        idmap, rows, cols = map_small_file(path / IDS_FILE, MAGIC_IDS)
        if cols != 12 or len(idmap) != 12 * rows or rows > self.layout.count:
            raise IndexFormatError(path / IDS_FILE, f"holds {rows} x {cols} bytes for {self.layout.count} nodes")
        self._id_keys = idmap[: 8 * rows].view("<i8")
        self._id_nodes = idmap[8 * rows :].view("<i4")
        self.labels = load_labels(path)
        if self.labels.n != self.layout.count:
            raise IndexFormatError(path / LABELS_FILE, f"labels for {self.labels.n} nodes, the index has {self.layout.count}")
        if self.codec.dim != self.layout.dim:
            raise IndexFormatError(path / ARRAYS_FILE, f"codec dim {self.codec.dim} != record dim {self.layout.dim}")
        try:  # the extra weight dimensions (none without weighting.json)
            self.weighting = Weighting.load(path, base_dim=self.layout.dim)
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(path / WEIGHTING_FILE, f"unreadable weighting: {e}") from None
        if self.weighting.dim != self.layout.dim:
            raise IndexFormatError(path / WEIGHTING_FILE, f"describes {self.weighting.dim}-d vectors, the records "
                                                          f"hold {self.layout.dim}-d")
        n = self.layout.count
        if self.entry_points.size == 0 or self.entry_points.min() < 0 or self.entry_points.max() >= n:
            raise IndexFormatError(path / ARRAYS_FILE, "entry points out of range")

        self.threads = resolve_threads(threads)
        self.prefetch = prefetch
        self.interleave = max(1, int(interleave or INTERLEAVE[io]))
        self._fd = os.open(path / RECORDS_FILE, os.O_RDONLY)
        try:
            self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
            self._mm.madvise(mmap.MADV_RANDOM)
            self._r8 = np.frombuffer(self._mm, np.uint8)
            self._r16 = self._r8.view(np.uint16)
            self._r32 = self._r8.view(np.int32)
            self._build_cache(cache_nodes)
            self._view = IndexView(
                np.ascontiguousarray(self.codec.query_transform, np.float32),
                np.ascontiguousarray(self.codec.centroids, np.float32), self.codes, self.entry_points,
                self.layout.as_array(), self._r16, self._r32, self._r8.ctypes.data, self._cache_ids, self._c16,
                self._c32, self.labels.rows)
            if io == "direct":
                self._direct = DirectReader(path / RECORDS_FILE, self.layout.sectors_per_node * self.layout.sector,
                                            self.interleave * BEAM_WIDTH)
                assert self._direct.fd is not None  # open until close()
                a, b = os.fstat(self._fd), os.fstat(self._direct.fd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise IndexFormatError(path / RECORDS_FILE, "replaced while the index was being opened")
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    @classmethod
    def open(cls, path: str | os.PathLike, threads: int | None = None, cache_nodes: int = 1024,
             prefetch: bool = True, interleave: int | None = None, io: str = "mmap") -> Index:
        """Open the index folder `path` (raises IndexFormatError if a file is bad).

        threads: search workers (default: all cores); cache_nodes: records kept in RAM,
        taken breadth-first from the entry points; prefetch: madvise(WILLNEED) each beam;
        interleave: queries each worker advances together, so that up to interleave x
        beam_width sector reads are in flight per worker (results do not depend on it;
        default `INTERLEAVE[io]`); io: "mmap" or "direct" (see the module doc; "direct"
        raises aio.DirectIOUnavailable where the platform or filesystem cannot do it).
        An updated index folder opens its current generation (`disk.resolve_generation`);
        `memescale.index.live.LiveIndex` adds the updates made since.
        """
        return cls(resolve_generation(Path(path)), threads, cache_nodes, prefetch, interleave, io)

    def _build_cache(self, cache_nodes: int) -> None:
        n = self.layout.count
        take = min(max(0, cache_nodes), n)
        order: list[int] = []
        queued = set()
        todo: deque[int] = deque()
        for e in self.entry_points.tolist():
            if e not in queued:
                queued.add(e)
                todo.append(e)
        skipped = []
        while todo and len(order) < take:
            u = todo.popleft()
            if not self.records_ok([u])[0]:  # left on disk: search skips it there, counted
                skipped.append(u)
                continue
            order.append(u)
            for v in self._neighbours(u).tolist():
                if v not in queued:
                    queued.add(v)
                    todo.append(v)
        if skipped:
            self._report_corrupt(np.array([len(skipped)]), np.array(skipped[-1:]))
        ids = np.array(sorted(order), np.int64)
        rs = self.layout.record_size
        buf = np.zeros(max(1, ids.size) * rs, np.uint8)
        for slot, u in enumerate(ids.tolist()):
            off = int(self.layout.offset(u))
            buf[slot * rs : (slot + 1) * rs] = self._r8[off : off + rs]
        buf.flags.writeable = False
        self._cache_ids = ids
        self._c16 = buf.view(np.uint16)
        self._c32 = buf.view(np.int32)

    def _neighbours(self, u: int) -> np.ndarray:
        off = int(self.layout.offset(u))
        deg = int(self._r32[(off + self.layout.deg_off) // 4])
        if deg > self.layout.R:
            raise IndexFormatError(self.path / RECORDS_FILE, f"node {u} has degree {deg} > R={self.layout.R}")
        s = (off + self.layout.nbr_off) // 4
        ids = self._r32[s : s + deg]
        if deg < 0 or (deg and (ids.min() < 0 or ids.max() >= self.layout.count)):
            raise IndexFormatError(self.path / RECORDS_FILE, f"node {u}: corrupt degree or neighbour ids")
        return ids

    def __len__(self) -> int:
        return self.layout.count

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def degree(self) -> int:
        """R: the most out-neighbours a node has."""
        return self.layout.R

    @property
    def cached_nodes(self) -> int:
        return int(self._cache_ids.size)

    def search(
        self, queries: np.ndarray, k: int, L: int, beam_width: int = BEAM_WIDTH, io_budget: int | None = None,
        exclude: np.ndarray | None = None, flt: LabelFilter = NO_FILTER, starts: np.ndarray | None = None,
        mismatch: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """Top-k by inner product for queries (nq, d) float: ids (nq, k) int64, scores
        (nq, k) float32 (exact, from the records), best first, and per-query `SearchStats`.
        On an index with extra weight dimensions (weighting.json), queries may also be
        plain model embeddings (nq, base_dim): they get neutral weights
        (`Weighting.index_queries`), so their scores are the plain inner products.

        L: candidate list size (raised to k if smaller); beam_width: sectors read per step;
        io_budget: max sector reads per query (None: unlimited); exclude: a bitmap of nodes
        never returned (`exclusion_bitmap`: (ceil(N / 8),) uint8, node u is bit u % 8 of byte
        u // 8), traversed all the same, so the graph stays navigable through them; rows end
        in -1 / -inf when fewer than k non-excluded nodes were reached. flt: label conditions
        (`label_filter`) a returned node meets; the others are traversed the same way.
        starts: node ids (S,) to enter the graph from besides the index's entry points (for
        a selective filter: a sample of the nodes it matches, so the search begins among
        them; each costs one PQ score).
        """
        Q = np.ascontiguousarray(self.weighting.index_queries(queries))
        if k < 1 or beam_width < 1:
            raise ValueError("k and beam_width must be >= 1")
        nq = Q.shape[0]
        L = max(int(L), k)
        ids = np.empty((nq, k), np.int64)
        scores = np.empty((nq, k), np.float32)
        reads = np.zeros(nq, np.int64)
        cmps = np.zeros(nq, np.int64)
        ns = np.zeros(nq, np.int64)
        corrupt = np.zeros(nq, np.int64)
        bad = np.full(nq, -1, np.int64)
        if exclude is None:
            exclude = _NO_EXCLUDE
        elif exclude.dtype != np.uint8 or exclude.ndim != 1 or exclude.shape[0] < (len(self) + 7) // 8:
            raise ValueError(f"exclude must be a (>= {(len(self) + 7) // 8},) uint8 bitmap")
        starts = _NO_STARTS if starts is None else np.ascontiguousarray(starts, np.int64).ravel()
        if starts.size and (starts.min() < 0 or starts.max() >= len(self)):
            raise IndexError(f"starts must be node ids in [0, {len(self)})")
        par = SearchParams(L, int(beam_width), int(io_budget) if io_budget else 0, bool(self.prefetch),
                           np.ascontiguousarray(exclude), flt, starts, np.float32(mismatch))
        out = Results(ids, scores, reads, cmps, ns, corrupt, bad)

        def run(lo: int, hi: int) -> None:
            direct = self._direct
            slot = direct.borrow(self.interleave * beam_width) if direct else None
            try:
                _search_range(lo, hi, self.interleave, Q, self._view, par, slot.view() if slot else _NO_AIO, out)
            except BaseException:
                if direct and slot:
                    direct.discard(slot)  # waits for any read still in flight
                raise
            if direct and slot:
                direct.give_back(slot)

        chunk = self.interleave * max(1, min(32 // self.interleave, nq // (4 * self.threads * self.interleave)))
        firsts = list(range(0, nq, chunk))
        try:
            if self._pool is None or len(firsts) == 1:
                run(0, nq)
            else:
                list(self._pool.map(lambda lo: run(lo, min(nq, lo + chunk)), firsts))
        except DirectIOUnavailable:  # a new slot's io_setup failed: says why already
            raise
        except OSError as e:  # raised by the direct-read kernels
            raise OSError(f"{self.path / RECORDS_FILE}: {e}") from None
        self._report_corrupt(corrupt, bad)
        return ids, scores, SearchStats(reads, cmps, ns / 1e6, corrupt)

    def _report_corrupt(self, corrupt: np.ndarray, bad: np.ndarray) -> None:
        """Log the damaged records a call met (they were skipped, never returned)."""
        if corrupt.any():
            nodes = sorted(set(bad[bad >= 0].tolist()))
            log.error("damaged index records skipped (CRC mismatch or impossible neighbour list); "
                      "Index.verify() checks the whole file", extra={
                          "path": str(self.path / RECORDS_FILE), "records_skipped": int(corrupt.sum()),
                          "nodes": nodes[:20]})

    def records_ok(self, ids) -> np.ndarray:
        """(n,) bool: whether each of node ids (n,) has a record that passes its CRC-32.
        O(n * record_size) reads through the mapping."""
        a = self._check_ids(ids)
        ok = np.empty(a.size, np.bool_)
        _records_ok(self._r32, self.layout.offset(a), self.layout.record_size >> 2, self.layout.crc_off >> 2, ok)
        return ok

    def scan(self, queries: np.ndarray, members: np.ndarray, k: int, flt: LabelFilter = NO_FILTER,
             rerank: int = 0, member_flt: LabelFilter | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """Top-k by inner product among `members` (node ids) only, for a filter whose matching
        set is small: the members meeting `flt` are scored with PQ (ADC, codes in RAM) in one
        pass, the best max(rerank, 4k, 64) re-ranked exactly from their records. `member_flt`:
        the part of `flt` the members are not already known to meet (the planner's members
        come from a posting that settles the rest; default `flt`). Same outputs as `search`;
        stats count the records read and the members that met the filter (each one PQ
        score). O(m M + rerank d) per query for m members; memory O(m)."""
        check = flt if member_flt is None else member_flt
        Q = np.ascontiguousarray(self.weighting.index_queries(queries), np.float32)
        nq = Q.shape[0]
        m = np.asarray(members)
        m = np.ascontiguousarray(m if m.dtype in (np.int32, np.int64) else m.astype(np.int64))
        ids = np.full((nq, k), -1, np.int64)
        scores = np.full((nq, k), -np.inf, np.float32)
        reads = np.zeros(nq, np.int64)
        matched = np.zeros(nq, np.int64)
        corrupt = np.zeros(nq, np.int64)
        bad = np.full(nq, -1, np.int64)
        t0 = time.perf_counter_ns()
        view = self._view
        if view is None:
            raise ValueError("the index is closed")
        M, K, dsub = self.codec.centroids.shape
        table = np.empty((M, K), np.float32)
        qt = np.empty(M * dsub, np.float32)
        keep = min(m.size, max(int(rerank), 4 * k, 64))
        found = np.empty(keep, np.int64)
        est = np.empty(keep, np.float32)
        for i in range(nq):
            if m.size == 0:
                continue
            _adc_table(Q[i], view.qtransform, qt, view.centroids, table)
            matched[i], n = _scan_matching(table, view.codes, m, check, view.labels, found, est)
            if n == 0:
                continue
            top = found[:n].copy()
            exact = self._vectors(top).astype(np.float32) @ Q[i]
            order = np.argsort(-exact, kind="stable")
            kept: list[np.ndarray] = []
            for lo in range(0, order.size, k):  # damaged ones are dropped, their places refilled
                part = order[lo : lo + k]
                sound = self.records_ok(top[part])
                if not sound.all():
                    corrupt[i] += int((~sound).sum())
                    bad[i] = int(top[part][~sound][-1])
                kept.append(part[sound])
                if sum(len(x) for x in kept) >= k:
                    break
            order = np.concatenate(kept)[:k] if kept else order[:0]
            ids[i, : order.size] = top[order]
            scores[i, : order.size] = exact[order]
            reads[i] = top.size
        ns = np.full(nq, (time.perf_counter_ns() - t0) // max(1, nq), np.int64)
        self._report_corrupt(corrupt, bad)
        return ids, scores, SearchStats(reads, matched, ns / 1e6, corrupt)

    def _check_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids, np.int64).ravel()
        if a.size and (a.min() < 0 or a.max() >= len(self)):
            raise IndexError(f"node ids must be in [0, {len(self)})")
        return a

    def nodes_of(self, image_ids) -> np.ndarray:
        """Node ids (n,) int64 of `image_ids` (n,) int (the metadata's ``image_id``); -1 for
        an id not in this index (the lowest node where one is in it twice). O(n log N) reads of
        the memory-mapped id map."""
        q = np.asarray(image_ids, np.int64).ravel()
        pos = np.searchsorted(self._id_keys, q)
        out = np.full(q.shape[0], -1, np.int64)
        ok = pos < self._id_keys.shape[0]
        ok[ok] = self._id_keys[pos[ok]] == q[ok]
        out[ok] = self._id_nodes[pos[ok]]
        return out

    def vectors(self, ids) -> np.ndarray:
        """fp16 vectors (n, d) of node ids (n,) as stored in their records; raises
        IndexFormatError naming the node if a record fails its CRC."""
        a = self._check_ids(ids)
        self._require_sound(a)
        return self._vectors(a)

    def _require_sound(self, a: np.ndarray) -> None:
        ok = self.records_ok(a)
        if not ok.all():
            u = int(a[~ok][0])
            self._report_corrupt(np.array([int((~ok).sum())]), np.array([u]))
            raise IndexFormatError(self.path / RECORDS_FILE, f"node {u}: record checksum mismatch")

    def _vectors(self, a: np.ndarray) -> np.ndarray:
        starts = (self.layout.offset(a) + self.layout.vec_off) // 2
        return self._r16[starts[:, None] + np.arange(self.dim)[None, :]].view(np.float16)

    def metadata(self, ids) -> list[dict]:
        """Metadata dicts of node ids ({} where none was given); raises IndexFormatError
        naming the node if a record fails its CRC."""
        out = []
        mo = self.layout.meta_off
        a = self._check_ids(ids)
        self._require_sound(a)
        for u in a.tolist():
            off = int(self.layout.offset(u)) + mo
            (length,) = np.frombuffer(self._r8[off : off + 4].tobytes(), "<u4")
            length = int(length)
            if length & SPILL_BIT:
                size = length & ~SPILL_BIT
                (at,) = np.frombuffer(self._r8[off + 4 : off + 12].tobytes(), "<u8")
                if at + size > len(self.overflow):
                    raise IndexFormatError(self.path / OVERFLOW_FILE, f"node {u}: spilled metadata out of range")
                blob = self.overflow[int(at) : int(at) + size]
                out.append(decode_metadata(self.path / OVERFLOW_FILE, blob))
            else:
                if length > self.layout.meta_budget:
                    raise IndexFormatError(self.path / RECORDS_FILE, f"node {u}: metadata length {length} over budget")
                out.append(decode_metadata(self.path / RECORDS_FILE, self._r8[off + 4 : off + 4 + length].tobytes()))
        return out

    def verify(self) -> None:
        """Full integrity check: re-reads every file and checks every checksum."""
        verify_records(self.path / RECORDS_FILE)
        read_small_file(self.path / CODES_FILE, MAGIC_CODES)
        read_small_file(self.path / ARRAYS_FILE, MAGIC_ARRAYS)
        read_small_file(self.path / OVERFLOW_FILE, MAGIC_OVERFLOW)
        read_small_file(self.path / IDS_FILE, MAGIC_IDS)
        load_labels(self.path)
        read_small_file(self.path / POSTINGS_FILE, MAGIC_POSTINGS)

    def close(self) -> None:
        """Release the memory map, file and threads (the object is unusable afterwards)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._mm is not None:
            self._view = self._r8 = self._r16 = self._r32 = None  # type: ignore[assignment]  # unusable after close
            self._id_keys = self._id_nodes = None  # type: ignore[assignment]
            try:
                self._mm.close()
            except BufferError:
                # A view is still referenced, e.g. from a traceback or a garbage cycle: collect,
                # and otherwise leave the unmapping to whoever drops the last view.
                gc.collect()
                with contextlib.suppress(BufferError):
                    self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
