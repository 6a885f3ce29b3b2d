"""Antialiased bicubic resampling of a region of an RGB(X) image to a square, as numba kernels.

`square_bicubic(pixels, box, size)` computes what Pillow's
``Image.resize((size, size), BICUBIC, box=box)`` computes: the same cubic (a = -0.5) whose
support widens with the downscale ratio, the same normalised coefficient table, 22-bit
fixed-point sums, rounding and clamping to 0..255 after each of the two separable passes.
Two things differ:

- the vertical pass always runs first, where Pillow picks an order per call; where the two
  differ a pixel moves by a few levels at most (same quality: PSNR against a LANCZOS
  reference within 0.1 dB);
- speed: each pass is a sweep over whole rows that LLVM vectorises, the horizontal pass
  over the transposed intermediate (pixels packed into uint32 for the transpose), where
  Pillow's inner loops are scalar.

Cost: with K = 4 max(1, ratio) + 1 taps per axis (ratio = box side / size), about
K x size x (box width x channels + size x 4) multiply-adds plus two transposes; memory
O(size x box width). The kernels release the GIL, so decode threads run them in parallel.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit

PRECISION_BITS = 22  # fixed-point fraction bits of the coefficients, as in Pillow
SCRATCH_KEPT = 32 << 20  # bytes of work memory a thread keeps for its next calls
_TILE = 16  # transpose block side
_ALIGN = 64
_local = threading.local()


def square_bicubic(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The region `box` = (left, top, right, bottom) of `pixels` resampled to (size, size, 3).

    `pixels`: C-contiguous uint8 (height, width, 3) RGB or (height, width, 4) RGBX, whose
    fourth channel is ignored (callers composite alpha before). `box` lies within the image,
    in pixel units (fractions allowed); it is normally square. Returns a new C-contiguous
    uint8 array.
    """
    if (pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4)
            or not pixels.flags.c_contiguous):
        raise ValueError(f"need C-contiguous uint8 (h, w, 3 or 4), got {pixels.dtype} {pixels.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    left, top, right, bottom = (float(v) for v in box)
    height, width = pixels.shape[:2]
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"box {box} is not inside a {width}x{height} image")
    rows = _coefficients(height, top, bottom, size)
    cols = _coefficients(width, left, right, size)
    span = cols[0][-1] + cols[1][-1] - cols[0][0]  # the input columns the taps reach
    work = _scratch(size * span * (pixels.shape[2] + 4) + 4 * size * size + 2 * _ALIGN)
    return _square_bicubic(pixels, *rows, *cols, size, work)  # type: ignore[call-arg]


def _scratch(nbytes: int) -> np.ndarray:
    """A uint8 work buffer of at least `nbytes`, kept for this thread's next calls when it is
    at most SCRATCH_KEPT bytes: fresh memory costs a page fault per 4 KiB, which took half
    the time of a typical call when every call allocated its intermediates."""
    buf = getattr(_local, "scratch", None)
    if buf is not None and buf.size >= nbytes:
        return buf
    buf = np.empty(nbytes, np.uint8)
    if nbytes <= SCRATCH_KEPT:
        _local.scratch = buf
    return buf


@njit(cache=True, nogil=True)
def _cubic(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's BICUBIC)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(cache=True, nogil=True)
def _coefficients(in_size, in0, in1, out_size):
    """Per output pixel: its first input pixel, its tap count and fixed-point weights, for
    the span [in0, in1) of an axis of `in_size` pixels mapped onto `out_size` pixels."""
    scale = (in1 - in0) / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.int32)
    raw = np.empty(taps)
    for i in range(out_size):
        centre = in0 + (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        n = min(int(centre + support + 0.5), in_size) - lo
        total = 0.0
        for k in range(n):
            raw[k] = _cubic((k + lo - centre + 0.5) / filter_scale)
            total += raw[k]
        for k in range(n):
            w = raw[k] / total if total != 0.0 else 0.0
            weights[i, k] = int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0.0 else -0.5))
        first[i] = lo
        count[i] = n
    return first, count, weights


@njit(cache=True, nogil=True)
def _rows_pass(src, first, count, weights, out):
    """out[i] = clamp(sum_k weights[i, k] * src[first[i] + k]): rows of uint8 in, rows out."""
    n = out.shape[1]
    acc = np.empty(n, np.int32)
    half = np.int32(1 << (PRECISION_BITS - 1))
    for i in range(out.shape[0]):
        acc[:] = half
        for k in range(count[i]):
            w = weights[i, k]
            row = src[first[i] + k]
            for x in range(n):
                acc[x] += w * np.int32(row[x])
        dst = out[i]
        for x in range(n):
            dst[x] = min(max(acc[x] >> PRECISION_BITS, 0), 255)


@njit(cache=True, nogil=True)
def _transpose(a, out):
    """out = a.T for 2-D arrays, in cache-sized tiles."""
    rows, cols = a.shape
    for i0 in range(0, rows, _TILE):
        for j0 in range(0, cols, _TILE):
            for i in range(i0, min(i0 + _TILE, rows)):
                for j in range(j0, min(j0 + _TILE, cols)):
                    out[j, i] = a[i, j]


@njit(cache=True, nogil=True)
def _transpose_rgb(a, out):
    """out[j, i] = pixel j of row i of `a` (uint8 rows of RGB pixels) packed into a uint32
    (R in the low byte), in cache-sized tiles."""
    rows, cols = out.shape[1], out.shape[0]
    for i0 in range(0, rows, _TILE):
        for j0 in range(0, cols, _TILE):
            for i in range(i0, min(i0 + _TILE, rows)):
                row = a[i]
                for j in range(j0, min(j0 + _TILE, cols)):
                    k = 3 * j
                    out[j, i] = np.uint32(row[k]) | (np.uint32(row[k + 1]) << 8) | (np.uint32(row[k + 2]) << 16)


@njit(cache=True, nogil=True)
def _unpack_transposed(a, out):
    """out[j, i] = the RGB bytes of the packed pixel a[i, j], in cache-sized tiles."""
    rows, cols = a.shape
    for i0 in range(0, rows, _TILE):
        for j0 in range(0, cols, _TILE):
            for i in range(i0, min(i0 + _TILE, rows)):
                for j in range(j0, min(j0 + _TILE, cols)):
                    p = a[i, j]
                    out[j, i, 0] = p & 0xFF
                    out[j, i, 1] = (p >> 8) & 0xFF
                    out[j, i, 2] = (p >> 16) & 0xFF


@njit(cache=True, nogil=True)
def _square_bicubic(pixels, row_first, row_count, row_weights, col_first, col_count, col_weights,
                    size, work):
    """The resampling with both axes' `_coefficients` given, in `work` (uint8, large enough)."""
    height, width, channels = pixels.shape
    c0 = col_first[0]
    c1 = col_first[size - 1] + col_count[size - 1]
    span = c1 - c0
    # vertical pass over the needed columns: (size, span) pixels
    n_tall, n_turned = size * span * channels, span * size * 4
    at_turned = (n_tall + _ALIGN - 1) // _ALIGN * _ALIGN
    at_done = (at_turned + n_turned + _ALIGN - 1) // _ALIGN * _ALIGN
    tall = work[:n_tall].reshape((size, span * channels))
    rows = pixels.reshape(height, width * channels)[:, c0 * channels : c1 * channels]
    _rows_pass(rows, row_first, row_count, row_weights, tall)
    # horizontal pass, as a vertical pass over the transpose: (size, size) transposed
    turned = work[at_turned : at_turned + n_turned].view(np.uint32).reshape((span, size))
    if channels == 4:
        _transpose(tall.view(np.uint32), turned)
    else:
        _transpose_rgb(tall, turned)
    done = work[at_done : at_done + 4 * size * size].reshape((size, size * 4))
    _rows_pass(turned.view(np.uint8), col_first - c0, col_count, col_weights, done)
    out = np.empty((size, size, 3), np.uint8)
    _unpack_transposed(done.view(np.uint32), out)
    return out
