"""Decode downloaded image bytes into a fixed-size RGB array for the image encoder.

`decode_image` trusts nothing about its input: the format is identified by Pillow from the
bytes, restricted to `ALLOWED_FORMATS` (formats the web serves; decoders of exotic formats
such as JPEG 2000, SGI or EPS are never reached), and the pixel count read from the header
is checked against a per-call limit before any pixel is decoded. Every failure raises one
type, `ImageDecodeError`, whose `reason` is one of `REASONS`.

Cost: a JPEG is decoded at the smallest DCT scale (1/1..1/8) that still covers the target
(draft mode); 8-bit PNGs are decoded by `memescale.decode.png` (zlib-ng and numba kernels, with
Pillow's pixels), the rest by Pillow; the crop and resize are one bicubic
resampling of the centre square (`memescale.decode.resample`, Pillow's filter in vectorised
kernels), and EXIF rotation is applied to the (size, size) result, not to the source.
Animations contribute their first frame only.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from memescale.decode.png import SIGNATURE as PNG_SIGNATURE
from memescale.decode.png import png_rgb
from memescale.decode.resample import square_bicubic

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "ICO", "TIFF")
REASONS = ("bomb", "truncated", "unsupported", "corrupt")
WHITE = (255, 255, 255)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transform that brings the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Signatures of the main web formats (JPEG covers MPO): such data that Pillow cannot open is
# a broken image ("corrupt"), anything else is not an image at all ("unsupported").
_WEB_MAGIC = (PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageDecodeError(Exception):
    """The bytes are not a decodable image. `reason` is in `REASONS`, `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """`pixels`: uint8 (size, size, 3) RGB. `width`, `height`: the source image's size after
    EXIF rotation (not the decoded draft size). `mode`: the source's Pillow mode."""

    pixels: np.ndarray
    width: int
    height: int
    mode: str


def content_hash(data: bytes) -> str:
    """blake2b-128 of `data` as 32 hex digits (placeholder detection, exact dedup)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_image(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """Decode `data` to RGB, shortest side scaled to `size`, centre-cropped to (size, size).

    Rejects sources of more than `max_pixels` pixels (width x height from the header) as
    ``bomb`` before decoding; sources beyond Pillow's own global guard are ``bomb`` too.
    Alpha is composited on white; 16-bit and float images are stretched to 8 bits; EXIF
    orientation is applied (corrupt EXIF is ignored). `data` is any bytes-like object.
    Raises ImageDecodeError for every problem with the data (ValueError only for size < 1).
    Time O(decoded pixels) (about size^2..4 size^2 for JPEGs), memory likewise.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as e:
        head = bytes(data[:12])
        if head.startswith(_WEB_MAGIC) or (head.startswith(b"RIFF") and head[8:] == b"WEBP"):
            raise ImageDecodeError("corrupt", "broken PNG/JPEG/GIF/WebP header") from e
        raise ImageDecodeError("unsupported", f"not one of {'/'.join(ALLOWED_FORMATS)}") from e
    except Exception as e:
        raise _decode_error(e) from e
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageDecodeError("corrupt", f"image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError("bomb", f"{width}x{height} exceeds {max_pixels} pixels")
        try:
            return _decode_opened(img, data, size)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise _decode_error(e) from e


def _decode_opened(img: Image.Image, data: bytes, size: int) -> DecodedImage:
    """Decode the opened, size-checked `img` (its first frame), read from `data`, into a
    DecodedImage."""
    mode = img.mode
    width, height = img.size
    source: tuple[float, float, float, float] = (0, 0, width, height)  # the image's extent in decoded pixels
    orientation = 1  # png_rgb only takes PNGs without an orientation
    pixels = png_rgb(data) if img.format == "PNG" else None
    if pixels is None:
        # JPEG only: DCT scaling, the result still covers (size, size). A scaled decode
        # rounds its size up, so its last row and column may be partly padding.
        drafted = img.draft("RGB", (size, size))
        if drafted:
            source = drafted[1]
        img.load()
        orientation = _orientation(img)
        img = _to_rgb_or_rgba(img)
        if img.mode == "RGBA":
            img = _on_white(img)
        pixels = _rgbx(img)
    pixels = square_bicubic(pixels, _centre_square(source), size)
    if orientation in _TRANSPOSE:  # the centre square commutes with the transform
        pixels = np.asarray(Image.fromarray(pixels).transpose(_TRANSPOSE[orientation]))
        if orientation >= 5:
            width, height = height, width
    return DecodedImage(pixels=pixels, width=width, height=height, mode=mode)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of a loaded image; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    """`img` as RGB, or RGBA when it has alpha or palette transparency."""
    if img.mode in _HIGH_DEPTH_MODES:
        return _stretch_to_l(img).convert("RGB")
    target = "RGBA" if img.mode in _ALPHA_MODES or "transparency" in img.info else "RGB"
    if img.mode == target:
        return img
    try:
        return img.convert(target)
    except ValueError as e:
        raise ImageDecodeError("unsupported", f"cannot convert mode {img.mode}: {e}") from e


def _rgbx(img: Image.Image) -> np.ndarray:
    """An RGB image's pixels as uint8 (height, width, 4) RGBX, Pillow's own layout: a
    read-only view of Pillow's buffer (through its Arrow export) when the image is one memory
    block, a copy when it spans several (images over Pillow's 16 MiB block size)."""
    try:
        flat = pa.array(img).flatten().to_numpy(zero_copy_only=True)
    except ValueError:
        flat = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint8)
    return flat.reshape(img.height, img.width, 4)


def _stretch_to_l(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float single-channel image linearly mapped onto 0..255 ("L").

    The observed [min, max] is stretched to [0, 255] (the bit depth such files declare rarely
    matches the range they use); a constant image becomes black. NaN counts as 0.
    """
    values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))


def _centre_square(source: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The centre square of the box `source`: resampling it to (size, size) scales the
    shortest side of `source` to `size` and centre-crops the other."""
    x0, y0, x1, y1 = source
    side = min(x1 - x0, y1 - y0)
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    return (left, top, left + side, top + side)


def _on_white(img: Image.Image) -> Image.Image:
    """An RGBA image composited over a white background, as RGB."""
    background = Image.new("RGB", img.size, WHITE)
    background.paste(img, mask=img.getchannel("A"))
    return background


def _decode_error(e: Exception) -> ImageDecodeError:
    """Map an exception raised by Pillow while opening or decoding onto an ImageDecodeError."""
    detail = f"{type(e).__name__}: {e}"[:300]
    if isinstance(e, (Image.DecompressionBombError, MemoryError)):
        return ImageDecodeError("bomb", detail)
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return ImageDecodeError("truncated", detail)
    return ImageDecodeError("corrupt", detail)
