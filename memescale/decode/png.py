"""Fast decode of the common PNG: 8-bit, not interlaced, still, without a transparent colour.

`png_rgb(data)` returns the pixels of an 8-bit gray, RGB, palette, gray+alpha or RGBA PNG
exactly as `memescale.decode.image` gets them from Pillow (alpha composited on white with Pillow's
paste arithmetic), or None for every other PNG and for every file Pillow might read
differently, which then goes to Pillow. None is returned for:

- other bit depths, interlacing, animations (acTL) and transparent colours (tRNS);
- any chunk whose CRC is wrong, data that ends before IEND, IDAT chunks that are not
  consecutive, a deflate stream that fails, ends early or holds more than the image;
- palettes: more than one PLTE, or an index beyond the palette;
- an EXIF orientation source (eXIf, or a text chunk with EXIF or XMP), so callers need not
  look for one.

Why: most of Pillow's PNG decode is zlib's inflate. Here zlib-ng inflates (faster than
zlib) and numba kernels undo the row filters, with the left
neighbour of the costly Paeth filter kept in registers for RGB and RGBA. Time O(len(data) +
decoded bytes); memory: the inflated rows and the (height, width, 3) result.
"""

from __future__ import annotations

import struct

import numpy as np
from numba import njit
from zlib_ng import zlib_ng

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> samples per pixel: gray, RGB, palette, gray+alpha, RGBA
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_NO_PALETTE = np.zeros((0, 3), np.uint8)
_REFUSED = frozenset({b"tRNS", b"acTL", b"fcTL", b"fdAT", b"eXIf"})
# Text chunks Pillow reads EXIF orientation from (keyword and its NUL)
_ORIENTATION_TEXT = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")


def png_rgb(data: bytes) -> np.ndarray | None:
    """The RGB pixels of PNG `data` (any bytes-like), uint8 (height, width, 3), or None
    when `data` is outside the set in the module doc. The caller has checked the pixel count
    (Pillow's header read does): the inflate is bounded by the header's image size."""
    view = memoryview(data)
    header = _header(view)
    if header is None:
        return None
    width, height, colour = header
    chunks = _chunks(view, colour)
    if chunks is None:
        return None
    idat, palette = chunks
    channels = _CHANNELS[colour]
    stride = width * channels
    expected = height * (stride + 1)
    inflater = zlib_ng.decompressobj()
    try:
        raw = inflater.decompress(idat, expected + 1)
    except zlib_ng.error:  # type: ignore[misc]  # the stub declares `error` an instance
        return None
    if len(raw) != expected or not inflater.eof:
        return None
    lines = np.empty((height, stride), np.uint8)
    if not _unfilter(np.frombuffer(raw, np.uint8), height, stride, channels, lines):
        return None
    if colour == 2:
        return lines.reshape(height, width, 3)
    rgb = np.empty((height, width, 3), np.uint8)
    return rgb if _to_rgb(lines.reshape(height, width, channels), colour, palette, rgb) else None


def _header(view: memoryview) -> tuple[int, int, int] | None:
    """(width, height, colour type) from the IHDR of an 8-bit, non-interlaced PNG; None for
    anything else."""
    if len(view) < 33 or bytes(view[:8]) != SIGNATURE or bytes(view[8:16]) != b"\0\0\0\rIHDR":
        return None
    width, height, depth, colour, method, filtering, interlace = struct.unpack_from(">IIBBBBB", view, 16)
    if depth != 8 or colour not in _CHANNELS or method or filtering or interlace or not width or not height:
        return None
    return width, height, colour


def _chunks(view: memoryview, colour: int) -> tuple[bytes | memoryview, np.ndarray] | None:
    """(the deflate stream of the IDAT run, the palette as uint8 (entries, 3), empty but for
    colour type 3) after walking every chunk up to IEND; None where the module doc says.
    O(len(view))."""
    pos, idat, palettes, run_ended = 8, [], [], False
    while pos + 12 <= len(view):
        length, kind = struct.unpack_from(">I4s", view, pos)
        end = pos + 8 + length
        if end + 4 > len(view) or zlib_ng.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", view, end)[0]:
            return None
        body = view[pos + 8 : end]
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            if run_ended:
                return None
            idat.append(body)
        else:
            run_ended = bool(idat)
            if kind in _REFUSED or (kind in (b"tEXt", b"zTXt", b"iTXt")
                                    and bytes(body[:22]).startswith(_ORIENTATION_TEXT)):
                return None
            if kind == b"PLTE":
                palettes.append(body)
        pos = end + 4
    else:
        return None  # no IEND
    if not idat or len(palettes) > 1 or (colour in (0, 3, 4) and len(palettes) != (colour == 3)):
        return None  # RGB(A) may suggest a palette; gray has none, palette images one
    palette = _NO_PALETTE
    if colour == 3:
        if not len(palettes[0]) or len(palettes[0]) % 3:
            return None
        palette = np.frombuffer(palettes[0], np.uint8).reshape(-1, 3)
    return (idat[0] if len(idat) == 1 else b"".join(idat)), palette


@njit(cache=True, nogil=True, boundscheck=False)
def _unfilter(raw, height, stride, bpp, lines):
    """Undo the row filters of `raw` (height rows of a filter byte and `stride` bytes) into
    `lines` (height, stride), `bpp` bytes per pixel. False on an unknown filter type."""
    zero = np.zeros(stride, np.uint8)
    for y in range(height):
        start = y * (stride + 1) + 1
        kind = raw[start - 1]
        src = raw[start : start + stride]
        up = lines[y - 1] if y else zero
        row = lines[y]
        if kind == 0:
            row[:] = src
        elif kind == 1:
            row[:bpp] = src[:bpp]
            for x in range(bpp, stride):
                row[x] = src[x] + row[x - bpp]
        elif kind == 2:
            for x in range(stride):
                row[x] = src[x] + up[x]
        elif kind == 3:
            for x in range(bpp):
                row[x] = src[x] + (up[x] >> 1)
            for x in range(bpp, stride):
                row[x] = src[x] + np.uint8((np.uint16(row[x - bpp]) + up[x]) >> 1)
        elif kind == 4:
            if bpp >= 3:
                _paeth_pixels(src, up, row, bpp)
            else:
                _paeth(src, up, row, bpp)
        else:
            return False
    return True


@njit(inline="always")
def _predict(a, b, c):
    """The Paeth predictor of left `a`, up `b` and upper-left `c` (int32)."""
    p = b - c
    q = a - c
    pa, pb, pc = abs(p), abs(q), abs(p + q)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


@njit(cache=True, nogil=True, boundscheck=False)
def _paeth(src, up, row, bpp):
    """One Paeth-filtered row, any `bpp`; the left neighbour is read back from `row`."""
    for x in range(bpp):
        row[x] = src[x] + up[x]
    for x in range(bpp, len(row)):
        row[x] = src[x] + np.uint8(_predict(np.int32(row[x - bpp]), np.int32(up[x]), np.int32(up[x - bpp])))


@njit(cache=True, nogil=True, boundscheck=False)
def _paeth_pixels(src, up, row, bpp):
    """One Paeth-filtered RGB (`bpp` 3) or RGBA (4) row, read as (pixels, bpp) so every index
    is a loop counter and a constant (no negative-index wraparound per access), with each
    channel's left and upper-left neighbours in registers, so no store and reload sits on
    the chain from one pixel to the next (faster than `_paeth`, which reloads them)."""
    src, up, row = src.reshape((-1, bpp)), up.reshape((-1, bpp)), row.reshape((-1, bpp))
    a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = np.int32(0)
    for i in range(row.shape[0]):
        b0, b1, b2 = np.int32(up[i, 0]), np.int32(up[i, 1]), np.int32(up[i, 2])
        a0 = (np.int32(src[i, 0]) + _predict(a0, b0, c0)) & 255
        a1 = (np.int32(src[i, 1]) + _predict(a1, b1, c1)) & 255
        a2 = (np.int32(src[i, 2]) + _predict(a2, b2, c2)) & 255
        row[i, 0], row[i, 1], row[i, 2] = a0, a1, a2
        c0, c1, c2 = b0, b1, b2
        if bpp == 4:  # loop-invariant: LLVM compiles one loop per case
            b3 = np.int32(up[i, 3])
            a3 = (np.int32(src[i, 3]) + _predict(a3, b3, c3)) & 255
            row[i, 3] = a3
            c3 = b3


@njit(cache=True, nogil=True, boundscheck=False)
def _to_rgb(pixels, colour, palette, rgb):
    """`pixels` (height, width, samples) of colour type 0, 3, 4 or 6 as RGB into `rgb`: gray
    repeated, palette indices looked up, alpha composited on white as Pillow's paste does
    (out = DIV255(255 (255 - alpha) + value alpha), DIV255(v) = (t + (t >> 8)) >> 8 with
    t = v + 128). False when an index is beyond the palette."""
    for y in range(pixels.shape[0]):
        for x in range(pixels.shape[1]):
            if colour == 3:
                index = pixels[y, x, 0]
                if index >= len(palette):
                    return False
                for k in range(3):
                    rgb[y, x, k] = palette[index, k]
            elif colour == 0:
                for k in range(3):
                    rgb[y, x, k] = pixels[y, x, 0]
            else:
                alpha = np.int32(pixels[y, x, pixels.shape[2] - 1])
                for k in range(3):
                    value = np.int32(pixels[y, x, k if colour == 6 else 0])
                    t = 255 * (255 - alpha) + value * alpha + 128
                    rgb[y, x, k] = ((t >> 8) + t) >> 8
    return True
