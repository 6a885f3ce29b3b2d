"""memescale.decode.image: hostile files, modes, orientation, bombs, crop geometry, real memes."""

from __future__ import annotations

import io
import multiprocessing
import os
import struct
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image, ImageOps

import memescale.decode.image
from memescale.decode.image import REASONS, ImageDecodeError, content_hash, decode_image

MAX_PIXELS = 64_000_000
SIZE = 64


def encode(img: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def decode_outcome(path: str, size: int) -> tuple:
    """Run in a worker process: ("ok", shape, dtype, cpu_seconds) or ("error", reason, cpu_seconds).

    CPU time of the decoding thread, not wall time: a bomb that is not refused burns CPU, and a
    busy machine does not make a quick refusal look slow."""
    data = open(path, "rb").read()
    start = time.thread_time()
    try:
        out = decode_image(data, size, MAX_PIXELS)
    except ImageDecodeError as e:
        return ("error", e.reason, time.thread_time() - start)
    return ("ok", out.pixels.shape, str(out.pixels.dtype), time.thread_time() - start)


def decode_all_isolated(paths: list[str], size: int) -> dict[str, tuple]:
    """Decode each file in worker processes; a file that kills its worker fails the test."""
    results: dict[str, tuple] = {}
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = {p: pool.submit(decode_outcome, p, size) for p in paths}
        for path, future in futures.items():
            try:
                results[path] = future.result(timeout=60)
            except BrokenProcessPool:
                pytest.fail(f"decoding {os.path.basename(path)} crashed its process")
    return results


def image_files(*parts: str) -> list[str]:
    folder = shared_path(*parts)
    return sorted(str(p) for p in folder.iterdir() if p.suffix != ".jsonl")


# --- the hostile corpus ----------------------------------------------------------------------


def test_every_odd_file_decodes_or_is_rejected_quickly():
    paths = image_files("images", "odd")
    assert len(paths) >= 40
    results = decode_all_isolated(paths, SIZE)
    by_name = {os.path.basename(p): r for p, r in results.items()}
    for name, result in by_name.items():
        assert result[-1] < 5.0, f"{name} took {result[-1]:.1f} CPU seconds"
        if result[0] == "ok":
            assert result[1:3] == ((SIZE, SIZE, 3), "uint8"), name
        else:
            assert result[1] in REASONS, name
    assert by_name["decompression_bomb.gif"][:2] == ("error", "bomb")
    assert by_name["decompression_bomb.ico"][:2] == ("error", "bomb")
    assert by_name["reallybig.bmp"][:2] == ("error", "bomb")
    assert by_name["truncated_jpeg.jpg"][:2] == ("error", "truncated")
    assert by_name["truncated_image.png"][:2] == ("error", "truncated")
    assert by_name["crash-4fb027452e6988530aa5dabee76eecacb3b79f8a.j2k"][:2] == ("error", "unsupported")
    for name in ["hopper.jpg", "hopper.png", "hopper.gif", "hopper.webp", "hopper.bmp", "hopper.tif",
                 "pil_sample_cmyk.jpg", "sugarshack.mpo", "iss634.apng", "iss634.webp", "p_trns_single.png",
                 "16bit.cropped.tif", "hopper_orientation_6.webp", "broken_exif_dpi.jpg"]:
        assert by_name[name][0] == "ok", name


@pytest.mark.parametrize(
    "name", ["pil_sample_cmyk.jpg", "p_trns_single.png", "16bit.cropped.tif", "transparent.png", "1_trns.png"]
)
def test_odd_modes_give_sensible_pixels(name):
    data = shared_path("images", "odd", name).read_bytes()
    px = decode_image(data, SIZE, MAX_PIXELS).pixels
    assert px.max() > 100 and px.std() > 10, f"{name}: flat or black output"


def test_every_meme_decodes():
    paths = image_files("images", "memes")
    assert len(paths) == 257
    for path in paths:
        data = open(path, "rb").read()
        out = decode_image(data, SIZE, MAX_PIXELS)
        assert out.pixels.shape == (SIZE, SIZE, 3) and out.pixels.dtype == np.uint8, path
        with Image.open(io.BytesIO(data)) as img:
            assert (out.width, out.height) in (img.size, img.size[::-1]), path


# --- orientation -----------------------------------------------------------------------------


def two_tone(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    return img.convert(mode)


def with_orientation(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_rotates(fmt):
    data = with_orientation(two_tone(120, 60), fmt, 6)  # displayed rotated 90 degrees clockwise
    out = decode_image(data, SIZE, MAX_PIXELS)
    assert (out.width, out.height) == (60, 120)
    top, bottom = out.pixels[2, SIZE // 2], out.pixels[-3, SIZE // 2]
    assert top[0] > 200 and top[2] < 60, "left (red) half should be on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_3_turns_and_8_rotates_counter_clockwise():
    out = decode_image(with_orientation(two_tone(120, 60), "JPEG", 3), SIZE, MAX_PIXELS)
    assert (out.width, out.height) == (120, 60)
    assert out.pixels[SIZE // 2, -3, 0] > 200, "upside down: red ends on the right"
    out = decode_image(with_orientation(two_tone(120, 60), "JPEG", 8), SIZE, MAX_PIXELS)
    assert (out.width, out.height) == (60, 120)
    assert out.pixels[2, SIZE // 2, 2] > 200, "rotated counter-clockwise: blue ends on top"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_is_ignored():
    data = encode(two_tone(80, 40), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fgarbage")
    out = decode_image(data, SIZE, MAX_PIXELS)
    assert (out.width, out.height) == (80, 40)


# --- modes -----------------------------------------------------------------------------------


def test_cmyk_jpeg_colours():
    img = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red in CMYK
    px = decode_image(encode(img, "JPEG", quality=95), SIZE, MAX_PIXELS).pixels
    r, g, b = px.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_on_white():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(1, (0, 0, 32, 64))
    px = decode_image(encode(img, "PNG", transparency=0), SIZE, MAX_PIXELS).pixels
    assert (px[:, -4:] >= 250).all(), "transparent half must be white, not black"
    assert px[:, :4, 0].min() > 180 and px[:, :4, 1].max() < 30


def test_la_and_rgba_alpha_is_on_white():
    la = Image.new("LA", (64, 64), (0, 255))
    la.paste((0, 0), (32, 0, 64, 64))  # right half fully transparent
    px = decode_image(encode(la, "PNG"), SIZE, MAX_PIXELS).pixels
    assert px[:, :4].max() < 10 and px[:, -4:].min() > 245
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 128))
    px = decode_image(encode(rgba, "PNG"), SIZE, MAX_PIXELS).pixels
    assert np.allclose(px.reshape(-1, 3).mean(axis=0), (127, 127, 255), atol=3)


def test_16_bit_gray_is_stretched_to_8_bits():
    ramp = np.tile(np.linspace(0, 4095, 64, dtype=np.uint16), (64, 1))  # 12 bits used of 16
    img = Image.fromarray(ramp)
    out = decode_image(encode(img, "PNG"), SIZE, MAX_PIXELS)
    assert out.mode == "I;16"
    assert out.pixels[:, 0].max() < 10 and out.pixels[:, -1].min() > 245
    assert (out.pixels[..., 0] == out.pixels[..., 2]).all()


@pytest.mark.parametrize("mode, values", [("I", (-70000, 70000)), ("F", (0.0, 1.0))])
def test_32_bit_int_and_float_images(mode, values):
    ramp = np.tile(np.linspace(*values, 64), (64, 1)).astype(np.int32 if mode == "I" else np.float32)
    out = decode_image(encode(Image.fromarray(ramp), "TIFF"), SIZE, MAX_PIXELS)
    assert out.mode == mode and out.pixels[:, 0].max() < 10 and out.pixels[:, -1].min() > 245


def test_one_bit_and_gray():
    squares = (np.indices((64, 64)).sum(axis=0) // 8 % 2 * 255).astype(np.uint8)
    checker = Image.fromarray(squares).convert("1")
    out = decode_image(encode(checker, "PNG"), SIZE, MAX_PIXELS)
    assert out.mode == "1" and out.pixels.min() < 30 and out.pixels.max() > 225


def test_animation_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in [(250, 0, 0), (0, 0, 250)]]
    for fmt in ["GIF", "WEBP", "PNG"]:
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        r, g, b = decode_image(data, SIZE, MAX_PIXELS).pixels.reshape(-1, 3).mean(axis=0)
        assert r > 200 and b < 50, fmt


# --- PNGs through memescale.decode.png ---------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(pixels: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of big-endian `pixels` (height, width, channels), filter 0 on every row."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def still_pngs() -> dict[str, bytes]:
    """Still PNG kinds; memescale.decode.png takes the 8-bit ones (FAST_PNGS), Pillow the rest."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    gray = noise.convert("L")
    rgb16 = np.random.default_rng(1).integers(0, 65536, (37, 53, 3)).astype(">u2")
    return {
        "rgb": encode(noise, "PNG"), "gray": encode(gray, "PNG"), "one-bit": encode(gray.convert("1"), "PNG"),
        "gray-2-bit": encode(gray.point(lambda v: v // 64 * 85), "PNG", bits=2),
        "palette": encode(noise.convert("P"), "PNG"),
        "palette-4-bit": encode(noise.convert("P", colors=16), "PNG", bits=4),
        "rgb-16-bit": raw_png(rgb16, 16, 2),
        "rgba": encode(Image.merge("RGBA", (*noise.split(), gray)), "PNG"),
        "gray-alpha": encode(Image.merge("LA", (gray, noise.getchannel("R"))), "PNG"),
    }


FAST_PNGS = {"rgb", "gray", "palette", "rgba", "gray-alpha"}


@pytest.mark.parametrize("kind", sorted(still_pngs()))
def test_fast_png_path_decodes_as_pillow_does(kind, monkeypatch):
    data = still_pngs()[kind]
    assert (memescale.decode.image.png_rgb(data) is not None) == (kind in FAST_PNGS)
    fast = decode_image(data, SIZE, MAX_PIXELS)
    monkeypatch.setattr(memescale.decode.image, "png_rgb", lambda data: None)
    pillow = decode_image(data, SIZE, MAX_PIXELS)
    assert np.array_equal(fast.pixels, pillow.pixels)
    assert (fast.width, fast.height, fast.mode) == (pillow.width, pillow.height, pillow.mode)


def test_fast_png_path_and_pillow_agree_on_shared_pngs(monkeypatch):
    paths = [p for p in image_files("images", "memes") + image_files("images", "odd") if p.endswith(".png")]
    fast = {}
    for path in paths:
        try:
            fast[path] = decode_image(open(path, "rb").read(), SIZE, MAX_PIXELS)
        except ImageDecodeError as e:
            fast[path] = e.reason
    monkeypatch.setattr(memescale.decode.image, "png_rgb", lambda data: None)
    for path in paths:
        try:
            pillow = decode_image(open(path, "rb").read(), SIZE, MAX_PIXELS)
        except ImageDecodeError as e:
            assert fast[path] == e.reason, path  # broken files: the same reason either way
            continue
        assert np.array_equal(fast[path].pixels, pillow.pixels), path
    assert len(paths) > 40


def stripes_png(before_pixels: bytes = b"", level: int = 6) -> bytes:
    """An 8 x 4 RGB PNG, left half red, right half blue; `before_pixels`: chunks before IDAT."""
    rows = b"".join(b"\x00" + bytes([200, 10, 10]) * 4 + bytes([10, 10, 200]) * 4 for _ in range(4))
    ihdr = struct.pack(">IIBBBBB", 8, 4, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + before_pixels
            + png_chunk(b"IDAT", zlib.compress(rows, level)) + png_chunk(b"IEND", b""))


def exif_orientation_6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


XMP_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
         b'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
         b"</rdf:RDF></x:xmpmeta>")


def raw_profile_6() -> bytes:
    blob = b"Exif\0\0" + exif_orientation_6()
    return f"\nexif\n{len(blob):8d}\n{blob.hex()}\n".encode()


@pytest.mark.parametrize("where", ["eXIf after the pixels", "XMP in iTXt", "EXIF profile in zTXt"])
def test_png_orientation_wherever_pillow_finds_it(where):
    if where == "eXIf after the pixels":
        plain = stripes_png()
        data = plain[:-12] + png_chunk(b"eXIf", exif_orientation_6()) + plain[-12:]  # before IEND
    elif where == "XMP in iTXt":
        data = stripes_png(png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP_6))
    else:
        data = stripes_png(png_chunk(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(raw_profile_6())))
    out = decode_image(data, SIZE, MAX_PIXELS)
    assert (out.width, out.height) == (4, 8)
    assert out.pixels[2, SIZE // 2, 0] > 150, "left (red) half should be on top"


def test_png_with_a_damaged_chunk_is_corrupt_not_garbage():
    # A flipped byte in stored (level 0) deflate data: the chunk's CRC and zlib's Adler-32
    # are wrong. A decoder that skips both would return the altered pixel; the file must be
    # refused.
    data = bytearray(stripes_png(level=0))
    idat = data.index(b"IDAT")
    data[idat + 4 + 2 + 5 + 1] ^= 0xFF  # zlib header, stored-block header, filter byte
    with pytest.raises(ImageDecodeError) as e:
        decode_image(bytes(data), SIZE, MAX_PIXELS)
    assert e.value.reason == "corrupt"


def test_png_with_two_palettes_gets_pillows_pixels():
    rows = b"".join(b"\x00" + bytes([5]) * 8 for _ in range(4))
    ihdr = struct.pack(">IIBBBBB", 8, 4, 8, 3, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"PLTE", bytes([0, 255, 0]) * 16)
            + png_chunk(b"PLTE", bytes([255, 0, 0]) * 2) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0]
    assert memescale.decode.image.png_rgb(data) is None
    assert (decode_image(data, SIZE, MAX_PIXELS).pixels == want).all()


# --- geometry --------------------------------------------------------------------------------


def test_shortest_side_to_size_then_centre_crop():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = decode_image(encode(img, "PNG"), 32, MAX_PIXELS)
    assert (out.width, out.height) == (300, 100)
    assert (out.pixels[..., 1] > 200).all() and (out.pixels[..., [0, 2]] < 60).all()


@pytest.mark.parametrize("size", [1, 64, 384])
def test_output_contract_and_original_size_for_big_jpeg(size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 2000, 3), dtype=np.uint8))
    out = decode_image(encode(img, "JPEG"), size, MAX_PIXELS)
    assert (out.width, out.height, out.mode) == (2000, 1000, "RGB")
    assert out.pixels.shape == (size, size, 3) and out.pixels.dtype == np.uint8


def gradient_checker(width: int, height: int) -> Image.Image:
    """Red ramps left to right, green top to bottom, blue is a 40 px checkerboard."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // width, y * 255 // height, (x // 40 + y // 40) % 2 * 255]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


T = Image.Transpose
# How an upright image is stored under each EXIF orientation (the inverse of the transform
# a viewer applies).
STORED_AS = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}


# Mean level error limits per case: the right crop measured 1.5-1.8 / 0.7-2.3 / 1.0-1.1,
# cropping the padded decode instead 5.5-5.8 / 3.3-5.6 / 2.5-2.7.
@pytest.mark.parametrize("width, height, size, limit",
                         [(1000, 700, 64, 2.5), (999, 1333, 100, 2.9), (1539, 1027, 384, 1.8)])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_scaled_jpeg_matches_full_decode(width, height, size, limit, orientation):
    # Sizes that are not multiples of the DCT scale (1/8, 1/8, 1/4): the scaled decode's last
    # row and column are part padding, and the crop must follow the image, not the decode.
    # Reference: the same JPEG decoded in full, turned upright, centre square resized.
    upright = gradient_checker(width, height)
    stored = upright.transpose(STORED_AS[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    want = full.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    out = decode_image(data, size, MAX_PIXELS)
    assert (out.width, out.height) == (width, height)
    assert np.abs(out.pixels - np.asarray(want, dtype=np.float64)).mean() < limit


def test_tiny_image_is_upscaled():
    out = decode_image(encode(Image.new("RGB", (3, 5), (10, 200, 30)), "PNG"), SIZE, MAX_PIXELS)
    assert out.pixels.shape == (SIZE, SIZE, 3) and abs(int(out.pixels[30, 30, 1]) - 200) < 3


# --- rejection -------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR for an 8-bit gray width x height image, and a cut-off IDAT."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 1 << 20) + b"IDAT" + b"\x78\x9c"


def test_pixel_limit_is_per_call_and_checked_before_decoding():
    data = encode(Image.new("RGB", (400, 300)), "PNG")
    assert decode_image(data, SIZE, 120_000).width == 400
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, SIZE, 119_999)
    assert e.value.reason == "bomb"
    # Only a header: a decoder would fail as truncated; the limit answers first.
    with pytest.raises(ImageDecodeError) as e:
        decode_image(png_header_only(9000, 8000), SIZE, MAX_PIXELS)
    assert e.value.reason == "bomb" and "9000x8000" in e.value.detail
    with pytest.raises(ImageDecodeError) as e:
        decode_image(png_header_only(8000, 8000), SIZE, MAX_PIXELS)  # within the limit
    assert e.value.reason == "truncated"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "unsupported"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "unsupported"),
        (os.urandom(2048), "unsupported"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt"),
        (b"GIF89a" + b"\x00" * 3, "corrupt"),
    ],
)
def test_garbage_is_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, SIZE, MAX_PIXELS)
    assert e.value.reason == reason and e.value.detail
    assert str(e.value).startswith(reason)


@pytest.mark.parametrize("fmt", ["TGA", "SGI", "PPM", "PCX"])
def test_formats_outside_the_web_set_are_unsupported(fmt):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(encode(two_tone(32, 32), fmt), SIZE, MAX_PIXELS)
    assert e.value.reason == "unsupported"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_downloads(cut):
    for fmt in ["JPEG", "PNG"]:
        noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
        data = encode(Image.fromarray(noise), fmt)
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data[: int(len(data) * cut)], SIZE, MAX_PIXELS)
        assert e.value.reason == "truncated", fmt


def test_content_hash():
    assert content_hash(b"abc") == content_hash(b"abc") != content_hash(b"abd")
    assert len(content_hash(b"")) == 32 and int(content_hash(b"x"), 16) >= 0
