"""Numba kernels: fp16 (or int8) storage, fp32 arithmetic, and the few system calls the
searcher needs.

Numba has no float16 array type on the CPU, so fp16 arrays cross into kernels as their raw
bits (``a.view(np.uint16)``) and `lane_to_float` widens one element with the hardware
conversion (LLVM ``fpext half``, F16C on x86); the same kernels take int8 rows
(`quantize_int8`, half the bytes per distance) where graph construction wants them. Every
kernel here is ``nogil``: parallelism comes from Python threads running kernels on disjoint
slices (`parallel_for`), which works from any number of caller threads (unlike numba's own
parallel layer) and keeps results independent of scheduling.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import threadpool_limits

_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
MADV_WILLNEED = 3


@intrinsic
def lane_to_float(typingctx, lane):
    """float32 value of one stored vector element: uint16 (IEEE half bits, widened exactly)
    or int8 (a scalar-quantized coordinate, `quantize_int8`, returned unscaled)."""
    if lane == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif lane == types.int8:
        def codegen(context, builder, signature, args):
            return builder.sitofp(args[0], ir.FloatType())
    else:
        return None
    return types.float32(lane), codegen


@intrinsic
def prefetch_address(typingctx, addr):
    """Hint the CPU to load the cache line at integer address `addr` (no fault if invalid)."""
    if addr != types.int64:
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.inttoptr(args[0], _I8P)
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@intrinsic
def madvise_willneed(typingctx, addr, length):
    """``madvise(addr, length, MADV_WILLNEED)``: start asynchronous readahead of those pages."""
    if addr != types.int64 or length != types.int64:
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_I32, [_I8P, _I64, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "madvise")
        ptr = builder.inttoptr(args[0], _I8P)
        return builder.call(fn, [ptr, args[1], ir.Constant(_I32, MADV_WILLNEED)])

    return types.int32(types.int64, types.int64), codegen


@intrinsic
def raw_syscall(typingctx, nr, a1, a2, a3, a4, a5):
    """libc ``syscall(nr, a1, ..., a5)``, every argument an integer passed as a 64-bit word:
    the call's result, or -1 on error."""
    argtys = (nr, a1, a2, a3, a4, a5)
    if not all(isinstance(t, types.Integer) for t in argtys):
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_I64, [_I64], var_arg=True)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "syscall")
        words = [context.cast(builder, v, t, types.int64) for v, t in zip(args, argtys)]
        return builder.call(fn, words)

    return types.int64(*argtys), codegen


@intrinsic
def last_errno(typingctx):
    """The calling thread's errno (glibc ``*__errno_location()``), callable without the GIL."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_I32.as_pointer(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.load(builder.call(fn, []))

    return types.int32(), codegen


@intrinsic
def monotonic_ns(typingctx):
    """``clock_gettime(CLOCK_MONOTONIC)`` in nanoseconds, callable without the GIL."""

    def codegen(context, builder, signature, args):
        ts = cgutils.alloca_once(builder, ir.ArrayType(_I64, 2))
        fnty = ir.FunctionType(_I32, [_I32, _I8P])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(_I32, 1), builder.bitcast(ts, _I8P)])
        zero = ir.Constant(_I32, 0)
        sec = builder.load(builder.gep(ts, [zero, zero]))
        nsec = builder.load(builder.gep(ts, [zero, ir.Constant(_I32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(_I64, 1_000_000_000)), nsec)

    return types.int64(), codegen


@njit(nogil=True, cache=True, inline="always")
def prefetch_bytes(addr, nbytes):
    """Prefetch every cache line of ``[addr, addr + nbytes)``."""
    for off in range(0, nbytes, 64):
        prefetch_address(addr + off)


@njit(nogil=True, cache=True, fastmath=True)
def dot_hf(x, q):
    """Inner product of one stored vector (d,) (uint16 fp16 bits, or int8 codes) with one
    float32 vector (d,)."""
    s = np.float32(0.0)
    for i in range(q.shape[0]):
        s += lane_to_float(x[i]) * q[i]
    return s


def _crc32_tables() -> np.ndarray:
    """(4, 256) uint32 slicing-by-4 tables of CRC-32 (IEEE 802.3, reflected, as zlib.crc32)."""
    t = np.zeros((4, 256), np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        t[0, i] = c
    for k in range(1, 4):
        for i in range(256):
            t[k, i] = (int(t[k - 1, i]) >> 8) ^ int(t[0, int(t[k - 1, i]) & 0xFF])
    return t


CRC32_TABLES = _crc32_tables()


@njit(nogil=True, cache=True)
def crc32_words(w32, lo, hi, skip):
    """CRC-32 (the value ``zlib.crc32`` gives) of the little-endian bytes of 32-bit words
    `w32[lo:hi]` (int32 or uint32), with word `skip` (absolute index; outside [lo, hi):
    none) read as zero. Returns int64 in [0, 2^32). Slicing-by-4: four table lookups per
    word, O(hi - lo)."""
    t = CRC32_TABLES
    c = np.int64(0xFFFFFFFF)
    for i in range(lo, hi):
        w = np.int64(0) if i == skip else np.int64(w32[i]) & 0xFFFFFFFF
        c ^= w
        c = (np.int64(t[3, c & 0xFF]) ^ np.int64(t[2, (c >> 8) & 0xFF]) ^ np.int64(t[1, (c >> 16) & 0xFF])
             ^ np.int64(t[0, c >> 24]))
    return c ^ 0xFFFFFFFF


@njit(nogil=True, cache=True)
def record_crcs(w32, record_words, crc_word, n, out):
    """out[i] = the CRC-32 of record i of `w32` (records of `record_words` 32-bit words laid
    end to end), its word `crc_word` read as zero, for i in [0, n). O(n * record_words)."""
    for i in range(n):
        lo = i * record_words
        out[i] = crc32_words(w32, lo, lo + record_words, lo + crc_word)


@njit(nogil=True, cache=True, fastmath=True)
def widen(x, out):
    """Write the float32 values of stored vector `x` (d,) (uint16 fp16 bits, or int8 codes)
    into `out` (d,)."""
    for i in range(out.shape[0]):
        out[i] = lane_to_float(x[i])


@njit(nogil=True, cache=True, fastmath=True)
def squared_norms(X, lo, hi, out):
    """out[i] = ||X[i]||^2 in float32 for i in [lo, hi); X: (N, d) uint16 fp16 bits or int8."""
    for i in range(lo, hi):
        s = np.float32(0.0)
        row = X[i]
        for j in range(row.shape[0]):
            v = lane_to_float(row[j])
            s += v * v
        out[i] = s


def resolve_threads(threads: int | None) -> int:
    """Worker count: `threads` when positive, else every core this process may use."""
    if threads and threads > 0:
        return int(threads)
    return max(1, len(os.sched_getaffinity(0)))


def parallel_for(fn: Callable[[int, int], None], n: int, threads: int, pool: ThreadPoolExecutor | None = None) -> None:
    """Run ``fn(lo, hi)`` over `threads` contiguous slices of range(n) at once.

    `fn` should call a nogil kernel so the slices run on separate cores. Results must not
    depend on which thread runs which slice (each slice writes only its own outputs).
    """
    threads = max(1, min(threads, n))
    if threads == 1:
        fn(0, n)
        return
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    if pool is None:
        with ThreadPoolExecutor(threads) as own:
            list(own.map(fn, bounds[:-1], bounds[1:]))
    else:
        list(pool.map(fn, bounds[:-1], bounds[1:]))


def single_threaded_blas() -> threadpool_limits:
    """Context in which BLAS/LAPACK use one thread each.

    Parallel work here runs on our own threads (`parallel_for`), each calling BLAS on its own
    slice; BLAS's own thread pool on top of that oversubscribes the cores, and on a loaded
    machine its spin-waiting makes even a 384 x 384 SVD take tens of times longer.
    """
    return threadpool_limits(limits=1, user_api="blas")


def matmul_rows(A: np.ndarray, B: np.ndarray, pool: ThreadPoolExecutor | None = None, rows: int = 4096) -> np.ndarray:
    """A @ B as float32 for A (n, k), over fixed slices of `rows` rows (run on `pool`).

    BLAS rounding depends on the shape it is given, so the slices are fixed rather than
    per thread: the result does not depend on the thread count.
    """
    out = np.empty((A.shape[0], B.shape[1]), np.float32)
    Bf = np.ascontiguousarray(B, np.float32)

    def part(lo: int) -> None:
        np.matmul(np.asarray(A[lo : lo + rows], np.float32), Bf, out=out[lo : lo + rows])

    starts = range(0, A.shape[0], rows)
    if pool is not None:
        list(pool.map(part, starts))
    else:
        for lo in starts:
            part(lo)
    return out


def gram(A: np.ndarray, B: np.ndarray, pool: ThreadPoolExecutor | None = None, rows: int = 4096) -> np.ndarray:
    """A.T @ B (float64) for row-aligned A (n, p), B (n, q).

    Summed over fixed slices of `rows` rows in order, so the rounding (and everything
    trained from it) does not depend on the thread count.
    """
    starts = range(0, A.shape[0], rows)

    def part(lo: int) -> np.ndarray:
        return (A[lo : lo + rows].T @ B[lo : lo + rows]).astype(np.float64)

    parts = list(pool.map(part, starts)) if pool is not None else [part(lo) for lo in starts]
    total = np.zeros((A.shape[1], B.shape[1]), np.float64)
    for p in parts:
        total += p
    return total


INT8_CLIP_QUANTILE = 0.9999
INT8_SAMPLE_ROWS = 20_000


def int8_stride(n: int) -> int:
    """Rows [::int8_stride(n)] of n are the sample `int8_scale` is taken from (about
    INT8_SAMPLE_ROWS of them), wherever a graph is built over int8 rows."""
    return max(1, n // INT8_SAMPLE_ROWS)


def int8_scale(sample: np.ndarray) -> float:
    """One scale for `quantize_int8` from a (n, d) float sample: its INT8_CLIP_QUANTILE
    quantile of |x| maps to 127 (the rarer larger coordinates saturate)."""
    a = np.abs(np.asarray(sample, np.float32)).ravel()
    top = float(np.quantile(a, INT8_CLIP_QUANTILE)) if a.size else 0.0
    return top / 127.0 if top > 0.0 else 1.0


def quantize_int8(vectors: np.ndarray, scale: float, out: np.ndarray | None = None, block: int = 65536) -> np.ndarray:
    """round(vectors / scale) clipped to [-127, 127] as (N, d) int8, in blocks of `block` rows
    (vectors may be a float16 memmap; no float copy of more than one block).

    One scale for every coordinate, so squared distances and inner products between
    quantized rows are the originals' times 1 / scale^2, up to rounding: orderings and
    ratio tests (robust pruning's alpha) need no scale at all.
    """
    n, d = vectors.shape
    out = np.empty((n, d), np.int8) if out is None else out
    inv = np.float32(1.0 / scale)
    for lo in range(0, n, block):
        v = np.asarray(vectors[lo:lo + block], np.float32) * inv
        np.clip(np.rint(v, out=v), -127, 127, out=v)
        out[lo:lo + block] = v
    return out


def as_fp16(vectors: np.ndarray) -> np.ndarray:
    """C-contiguous float16 copy/view of a (N, d) float16 or float32 array."""
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, d), got shape {v.shape}")
    if v.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"vectors must be float16 or float32, got {v.dtype}")
    return np.ascontiguousarray(v, dtype=np.float16)


def exact_topk(
    queries: np.ndarray, vectors: np.ndarray, k: int, block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product, best first.

    queries: (nq, d) float; vectors: (N, d) float16/float32. Returns ids (nq, k) int64 and
    scores (nq, k) float32. O(nq * N * d) time (BLAS, fp32), O(nq * (block + k)) memory.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq, n = q.shape[0], vectors.shape[0]
    k_eff = min(k, n)
    best_s = np.full((nq, k_eff), -np.inf, np.float32)
    best_i = np.full((nq, k_eff), -1, np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        s = q @ np.asarray(vectors[lo:hi], dtype=np.float32).T
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, hi), s.shape)], axis=1)
        part = np.argpartition(-all_s, k_eff - 1, axis=1)[:, :k_eff]
        best_s = np.take_along_axis(all_s, part, 1)
        best_i = np.take_along_axis(all_i, part, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    ids = np.take_along_axis(best_i, order, 1)
    scores = np.take_along_axis(best_s, order, 1)
    if k_eff < k:
        ids = np.pad(ids, ((0, 0), (0, k - k_eff)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
    return ids, scores
