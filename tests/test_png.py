"""memescale.decode.png: the fast PNG decode gives Pillow's pixels, or None wherever it might not."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from memescale.decode.png import png_rgb

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def predict(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def filtered(lines: np.ndarray, kinds: list[int], bpp: int) -> bytes:
    """The PNG encoder's side: `lines` (height, stride) filtered with kinds[y] on row y, as
    the specification writes it (the decoder under test undoes it)."""
    out = bytearray()
    prior = np.zeros(lines.shape[1], np.int64)
    for y, kind in enumerate(kinds):
        row = lines[y].astype(np.int64)
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prior
        elif kind == 3:
            pred = (left + prior) // 2
        else:
            pred = np.array([predict(*v) for v in zip(left, prior, upper_left)], np.int64)
        out += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prior = row
    return bytes(out)


def make_png(width: int, height: int, colour: int, stream: bytes, *, before: bytes = b"",
             after: bytes = b"", depth: int = 8, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + before + chunk(b"IDAT", stream) + after
            + chunk(b"IEND", b""))


def random_png(seed: int, width: int, height: int, colour: int, palette_size: int = 256) -> bytes:
    """A PNG whose rows use random filters (every type, the first row included), as adaptive
    encoders mix them: a ramp with noise for even seeds, three levels (where the Paeth
    predictor's distances often tie) for odd ones."""
    rng = np.random.default_rng(seed)
    bpp = CHANNELS[colour]
    ramp = (np.arange(width * bpp)[None, :] + 3 * np.arange(height)[:, None]) % 256
    noise = rng.integers(0, 40 if seed % 2 == 0 else 3, (height, width * bpp))
    lines = (ramp * (seed % 2 == 0) + noise) % 256
    before = b""
    if colour == 3:
        lines %= palette_size
        before = chunk(b"PLTE", rng.integers(0, 256, palette_size * 3, dtype=np.uint8).tobytes())
    kinds = [int(k) for k in rng.integers(0, 5, height)]
    return make_png(width, height, colour, zlib.compress(filtered(lines, kinds, bpp)), before=before)


def pillow_rgb(data: bytes) -> np.ndarray:
    """Pillow's RGB pixels; an image with alpha pasted on white by its alpha."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("LA", "RGBA"):
        return np.asarray(img.convert("RGB"))
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(img.convert("RGBA"), mask=img.getchannel("A"))
    return np.asarray(white)


@pytest.mark.parametrize("colour", [0, 2, 3, 4, 6])
@pytest.mark.parametrize("width", [1, 2, 5, 64, 301])
def test_every_filter_type_gives_pillows_pixels(colour, width):
    for seed in range(4):
        data = random_png(seed, width, 23, colour, palette_size=7 if seed == 2 else 256)
        got = png_rgb(data)
        assert got is not None
        assert got.shape == (23, width, 3) and got.dtype == np.uint8
        assert np.array_equal(got, pillow_rgb(data))


def test_shared_pngs_give_pillows_pixels():
    root = shared_path("images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png")
    fast = 0
    for path in paths:
        data = path.read_bytes()
        got = png_rgb(data)
        if got is not None:
            fast += 1
            assert np.array_equal(got, pillow_rgb(data)), path
    assert len(paths) > 40 and fast >= 40  # the opaque 8-bit still PNGs among them


def test_a_suggested_palette_in_an_rgb_png_is_ignored_as_pillow_does():
    lines = np.random.default_rng(3).integers(0, 256, (4, 9 * 3), dtype=np.uint8)
    stream = zlib.compress(filtered(lines, [4, 1, 2, 3], 3))
    data = make_png(9, 4, 2, stream, before=chunk(b"PLTE", bytes(range(12))))
    assert np.array_equal(png_rgb(data), pillow_rgb(data))


def rgb_stream(width: int = 6, height: int = 5, kinds: tuple = (0, 1, 2, 3, 4)) -> bytes:
    lines = np.random.default_rng(4).integers(0, 256, (height, width * 3), dtype=np.uint8)
    return filtered(lines, list(kinds), 3)


def exif_orientation_6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


REFUSED = {
    "16-bit": lambda: make_png(3, 5, 2, zlib.compress(b"\0" * 19 * 5), depth=16),
    "16-bit RGBA": lambda: make_png(3, 5, 6, zlib.compress(b"\0" * 25 * 5), depth=16),
    "4-bit palette": lambda: make_png(6, 5, 3, zlib.compress(b"\0" * 4 * 5), depth=4,
                                      before=chunk(b"PLTE", bytes(48))),
    "interlaced": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()), interlace=1),
    "transparency": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()), before=chunk(b"tRNS", bytes(6))),
    "animation": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()), before=chunk(b"acTL", bytes(8))),
    "eXIf after the pixels": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()),
                                              after=chunk(b"eXIf", exif_orientation_6())),
    "XMP text": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()),
                                 before=chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta/>")),
    "EXIF profile text": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()),
                                          before=chunk(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(b"x"))),
    "wrong CRC in an ancillary chunk": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()),
                                                        before=chunk(b"tEXt", b"a\0b", crc=1)),
    "no IEND": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream()))[:-12],
    "IDAT chunks apart": lambda: split_idat(zlib.compress(rgb_stream()), chunk(b"tEXt", b"a\0b")),
    "stream ends early": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream())[:-9]),
    "stream without its checksum": lambda: make_png(6, 5, 2, zlib.compress(rgb_stream())[:-4]),
    "more rows than the image": lambda: make_png(6, 4, 2, zlib.compress(rgb_stream())),
    "unknown filter type": lambda: make_png(6, 5, 2, zlib.compress(b"\x05" + rgb_stream()[1:])),
    "index beyond the palette": lambda: make_png(6, 5, 3, zlib.compress(bytes(7 * 5)[:-1] + b"\x09"),
                                                 before=chunk(b"PLTE", bytes(range(9 * 3)))),
    "two palettes": lambda: make_png(6, 5, 3, zlib.compress(bytes(7 * 5)),
                                     before=chunk(b"PLTE", bytes(6)) + chunk(b"PLTE", bytes(6))),
    "palette of a broken length": lambda: make_png(6, 5, 3, zlib.compress(bytes(7 * 5)),
                                                   before=chunk(b"PLTE", bytes(7))),
    "gray with a palette": lambda: make_png(6, 5, 0, zlib.compress(bytes(7 * 5)), before=chunk(b"PLTE", bytes(6))),
    "not a PNG": lambda: b"\xff\xd8\xff\xe0" + bytes(60),
}


def split_idat(stream: bytes, between: bytes) -> bytes:
    whole = make_png(6, 5, 2, stream)
    start = whole.index(b"IDAT") - 4
    end = start + 12 + len(stream)
    half = len(stream) // 2
    return whole[:start] + chunk(b"IDAT", stream[:half]) + between + chunk(b"IDAT", stream[half:]) + whole[end:]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_left_to_pillow(case):
    assert png_rgb(REFUSED[case]()) is None


def test_the_same_pixels_split_over_many_idat_chunks_are_decoded():
    stream = zlib.compress(rgb_stream())
    data = split_idat(stream, b"")
    assert data.count(b"IDAT") == 2
    assert np.array_equal(png_rgb(data), pillow_rgb(data))


def test_bytes_like_input():
    data = random_png(9, 17, 11, 2)
    want = pillow_rgb(data)
    for view in (bytearray(data), memoryview(data)):
        assert np.array_equal(png_rgb(view), want)
