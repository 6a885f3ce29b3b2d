"""`Index`: the disk-resident searcher (DiskANN beam search with PQ distances in RAM).

RAM holds the PQ codes (N x M bytes), the small arrays (codebooks, transforms, entry
points) and a BFS cache of the records nearest the entry points. Records are read from
``records.bin`` through a read-only memory map (page-cache reads): for each beam step the
beam's sectors are requested together with ``madvise(MADV_WILLNEED)`` before any of them is
touched, so cold reads overlap instead of queueing behind page faults.

Beam search, per query (numba, nogil): the candidate list holds the L best nodes by ADC
score; each step takes the best `beam_width` unexpanded ones, reads their records (one
sector each; cached nodes cost no read), scores them exactly from the fp16 vector (the
re-rank pool), and ADC-scores their not yet seen neighbours into the list. It stops when
every listed node is expanded or the I/O budget is spent, and returns the top-k of the
re-rank pool by exact inner product.
"""

from __future__ import annotations

import gc
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from .disk import (
    ARRAYS_FILE,
    CODES_FILE,
    MAGIC_ARRAYS,
    MAGIC_CODES,
    MAGIC_OVERFLOW,
    OVERFLOW_FILE,
    RECORDS_FILE,
    SPILL_BIT,
    IndexFormatError,
    decode_metadata,
    read_record_header,
    read_small_file,
    unpack_arrays,
    verify_records,
)
from .kernels import dot_hf, madvise_willneed, monotonic_ns, prefetch_bytes, resolve_threads
from .pq import PQCodec, adc_score

# Layout vector fields (disk.RecordLayout.as_array).
_REC, _NPS, _SPN, _SECTOR, _VEC, _DEG, _NBR, _META, _DIM, _R = range(10)


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


@njit(nogil=True, cache=True)
def _grow(a):
    b = np.empty(2 * a.shape[0], a.dtype)
    b[: a.shape[0]] = a
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


@njit(nogil=True, cache=True)
def beam_search(q, table, codes, r16, r32, base_addr, cache_ids, c16, c32, lay, entry, L, W, io_budget, prefetch, bits, out_ids, out_scores):
    """Search one query; writes out_ids (k,) int64 and out_scores (k,) float32, best first.

    q: (d,) float32 query; table: (M * 256,) float32 ADC table of q; codes: (N, M) uint8;
    r16/r32: uint16/int32 views of the record file mapped at integer address base_addr;
    cache_ids: (C,) sorted int64 cached node ids, c16/c32: views of their records (slot s
    at byte s * record_size); lay: int64 layout vector; entry: (E,) int64 entry points;
    io_budget: max sector reads (<= 0: unlimited); prefetch: madvise each beam's sectors
    first; bits: (ceil(N / 8),) uint8 zeroed visit bitmap, left zeroed.
    Returns (sector reads, PQ comparisons). Missing results (fewer than k expanded nodes)
    are id -1, score -inf. Time O(expansions * (R * M + d)); memory O(L + seen).
    """
    cand_id = np.empty(L, np.int64)
    cand_s = np.empty(L, np.float32)
    done = np.zeros(L, np.bool_)
    seen = np.empty(32 * L, np.int64)
    pool_id = np.empty(2 * L, np.int64)
    pool_s = np.empty(2 * L, np.float32)
    beam_id = np.empty(W, np.int64)
    beam_off = np.empty(W, np.int64)
    beam_cached = np.empty(W, np.bool_)
    dim = lay[_DIM]
    sector = lay[_SECTOR]
    span = lay[_SPN] * sector
    n = n_seen = n_pool = cmps = reads = 0
    for e in range(entry.shape[0]):
        u = entry[e]
        if bits[u >> 3] & np.uint8(1 << (u & 7)):
            continue
        bits[u >> 3] |= np.uint8(1 << (u & 7))
        seen[n_seen] = u
        n_seen += 1
        cmps += 1
        n, _ = _insert(cand_id, cand_s, done, n, L, u, adc_score(table, codes[u]))
    cur = 0
    exhausted = False
    while cur < n and not exhausted:
        # the beam: the best beam_width unexpanded candidates
        nb = 0
        i = cur
        while i < n and nb < W:
            if not done[i]:
                u = cand_id[i]
                slot = _cache_slot(cache_ids, u)
                if slot >= 0:
                    beam_off[nb] = slot * lay[_REC]
                    beam_cached[nb] = True
                else:
                    if io_budget > 0 and reads + lay[_SPN] > io_budget:
                        exhausted = True
                        break
                    beam_off[nb] = _record_offset(u, lay)
                    beam_cached[nb] = False
                    reads += lay[_SPN]
                beam_id[nb] = u
                done[i] = True
                nb += 1
            i += 1
        if nb == 0:
            break
        # request every sector of the beam before touching any of them
        for b in range(nb):
            if not beam_cached[b]:
                if prefetch:
                    madvise_willneed(base_addr + beam_off[b] // sector * sector, span)
                prefetch_bytes(base_addr + beam_off[b], lay[_META])
        lowest = n
        for b in range(nb):
            off = beam_off[b]
            r16b, r32b = (c16, c32) if beam_cached[b] else (r16, r32)
            v0 = (off + lay[_VEC]) >> 1
            if n_pool == pool_id.shape[0]:
                pool_id = _grow(pool_id)
                pool_s = _grow(pool_s)
            pool_id[n_pool] = beam_id[b]
            pool_s[n_pool] = dot_hf(r16b[v0 : v0 + dim], q)
            n_pool += 1
            deg = r32b[(off + lay[_DEG]) >> 2]
            nb0 = (off + lay[_NBR]) >> 2
            for t in range(deg):
                u = r32b[nb0 + t]
                bit = np.uint8(1 << (u & 7))
                if bits[u >> 3] & bit:
                    continue
                bits[u >> 3] |= bit
                if n_seen == seen.shape[0]:
                    seen = _grow(seen)
                seen[n_seen] = u
                n_seen += 1
                cmps += 1
                n, pos = _insert(cand_id, cand_s, done, n, L, u, adc_score(table, codes[u]))
                if pos < lowest:
                    lowest = pos
        if lowest < cur:
            cur = lowest
        while cur < n and done[cur]:
            cur += 1
    for t in range(n_seen):
        bits[seen[t] >> 3] = 0
    k = out_ids.shape[0]
    order = np.argsort(-pool_s[:n_pool], kind="mergesort")
    for t in range(k):
        if t < n_pool:
            out_ids[t] = pool_id[order[t]]
            out_scores[t] = pool_s[order[t]]
        else:
            out_ids[t] = -1
            out_scores[t] = -np.inf
    return reads, cmps


@njit(nogil=True, cache=True, fastmath=True)
def _adc_table(q, B, qt, centroids, table):
    """ADC table of query q (d,): qt = q @ B (B: (d, M * dsub) query transform), then
    table[m * 256 + c] = qt[m * dsub:(m + 1) * dsub] . centroids[m, c]. O(d D + 256 D)."""
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
            table[m * k + c] = s


@njit(nogil=True, cache=True)
def _search_range(lo, hi, Q, B, centroids, codes, r16, r32, base_addr, cache_ids, c16, c32, lay, entry, L, W, io_budget, prefetch, out_ids, out_scores, reads, cmps, ns):
    """beam_search queries [lo, hi) of Q (nq, d) float32 (B: the codec's query transform)."""
    M, k, dsub = centroids.shape
    table = np.empty(M * k, np.float32)
    qt = np.empty(M * dsub, np.float32)
    bits = np.zeros((codes.shape[0] + 7) // 8, np.uint8)
    for i in range(lo, hi):
        t0 = monotonic_ns()
        _adc_table(Q[i], B, qt, centroids, table)
        r, c = beam_search(Q[i], table, codes, r16, r32, base_addr, cache_ids, c16, c32, lay, entry, L, W, io_budget, prefetch, bits, out_ids[i], out_scores[i])
        reads[i] = r
        cmps[i] = c
        ns[i] = monotonic_ns() - t0


@dataclass
class SearchStats:
    """Per-query cost of one `Index.search` call: arrays of shape (nq,)."""

    reads: np.ndarray  # int64 sector reads (cache hits excluded)
    pq_comparisons: np.ndarray  # int64 ADC evaluations
    ms: np.ndarray  # float64 wall time per query in its worker thread

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def summary(self) -> dict[str, float]:
        """mean / p50 / p99 of each per-query array."""
        out = {}
        for name in ("reads", "pq_comparisons", "ms"):
            a = np.asarray(self[name], np.float64)
            if a.size:
                out[f"{name}_mean"] = float(a.mean())
                out[f"{name}_p50"] = float(np.percentile(a, 50))
                out[f"{name}_p99"] = float(np.percentile(a, 99))
        return out


class Index:
    """A disk index opened for search; see the module doc. Use `Index.open(dir)`.

    RAM: N x M bytes of PQ codes + small arrays + cache_nodes records.
    """

    def __init__(self, path: Path, threads: int | None, cache_nodes: int, prefetch: bool):
        self.path = path
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
        if self.codec.dim != self.layout.dim:
            raise IndexFormatError(path / ARRAYS_FILE, f"codec dim {self.codec.dim} != record dim {self.layout.dim}")
        n = self.layout.count
        if self.entry_points.size == 0 or self.entry_points.min() < 0 or self.entry_points.max() >= n:
            raise IndexFormatError(path / ARRAYS_FILE, "entry points out of range")

        self._fd = os.open(path / RECORDS_FILE, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
        self._mm.madvise(mmap.MADV_RANDOM)
        self._r8 = np.frombuffer(self._mm, np.uint8)
        self._r16 = self._r8.view(np.uint16)
        self._r32 = self._r8.view(np.int32)
        self._lay = self.layout.as_array()
        self._centroids = np.ascontiguousarray(self.codec.centroids, np.float32)
        self._qtransform = np.ascontiguousarray(self.codec.query_transform, np.float32)
        self.threads = resolve_threads(threads)
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._build_cache(cache_nodes)

    @classmethod
    def open(cls, path: str | os.PathLike, threads: int | None = None, cache_nodes: int = 1024, prefetch: bool = True) -> Index:
        """Open the index folder `path` (raises IndexFormatError if a file is bad).

        threads: search workers (default: all cores); cache_nodes: records kept in RAM,
        taken breadth-first from the entry points; prefetch: madvise(WILLNEED) each beam.
        """
        return cls(Path(path), threads, cache_nodes, prefetch)

    def _build_cache(self, cache_nodes: int) -> None:
        n = self.layout.count
        take = min(max(0, cache_nodes), n)
        order: list[int] = []
        queued = set()
        todo = deque()
        for e in self.entry_points.tolist():
            if e not in queued:
                queued.add(e)
                todo.append(e)
        while todo and len(order) < take:
            u = todo.popleft()
            order.append(u)
            for v in self._neighbours(u).tolist():
                if v not in queued:
                    queued.add(v)
                    todo.append(v)
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
        return self._r32[s : s + deg]

    def __len__(self) -> int:
        return self.layout.count

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def cached_nodes(self) -> int:
        return int(self._cache_ids.size)

    def search(
        self, queries: np.ndarray, k: int, L: int, beam_width: int = 4, io_budget: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """Top-k by inner product for queries (nq, d) float: ids (nq, k) int64, scores
        (nq, k) float32 (exact, from the records), best first, and per-query `SearchStats`.

        L: candidate list size (raised to k if smaller); beam_width: sectors read per step;
        io_budget: max sector reads per query (None: unlimited).
        """
        Q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, np.float32)))
        if Q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {Q.shape[1]}, the index has {self.dim}")
        if k < 1 or beam_width < 1:
            raise ValueError("k and beam_width must be >= 1")
        nq = Q.shape[0]
        L = max(int(L), k)
        ids = np.empty((nq, k), np.int64)
        scores = np.empty((nq, k), np.float32)
        reads = np.zeros(nq, np.int64)
        cmps = np.zeros(nq, np.int64)
        ns = np.zeros(nq, np.int64)
        budget = int(io_budget) if io_budget else 0
        base_addr = self._r8.ctypes.data

        def run(lo: int, hi: int) -> None:
            _search_range(lo, hi, Q, self._qtransform, self._centroids, self.codes, self._r16, self._r32, base_addr,
                          self._cache_ids, self._c16, self._c32, self._lay, self.entry_points, L,
                          int(beam_width), budget, self.prefetch, ids, scores, reads, cmps, ns)

        chunk = max(1, min(32, nq // (4 * self.threads) or 1))
        starts = list(range(0, nq, chunk))
        if self._pool is None or len(starts) == 1:
            run(0, nq)
        else:
            list(self._pool.map(lambda lo: run(lo, min(nq, lo + chunk)), starts))
        return ids, scores, SearchStats(reads, cmps, ns / 1e6)

    def _check_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids, np.int64).ravel()
        if a.size and (a.min() < 0 or a.max() >= len(self)):
            raise IndexError(f"node ids must be in [0, {len(self)})")
        return a

    def vectors(self, ids) -> np.ndarray:
        """fp16 vectors (n, d) of node ids (n,) as stored in their records."""
        a = self._check_ids(ids)
        starts = (self.layout.offset(a) + self.layout.vec_off) // 2
        return self._r16[starts[:, None] + np.arange(self.dim)[None, :]].view(np.float16)

    def metadata(self, ids) -> list[dict]:
        """Metadata dicts of node ids ({} where none was given)."""
        out = []
        mo = self.layout.meta_off
        for u in self._check_ids(ids).tolist():
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

    def close(self) -> None:
        """Release the memory map, file and threads (the object is unusable afterwards)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._mm is not None:
            self._r8 = self._r16 = self._r32 = None
            try:
                self._mm.close()
            except BufferError:  # a view still referenced from a garbage cycle (e.g. a traceback)
                gc.collect()
                self._mm.close()
            self._mm = None
            os.close(self._fd)

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
