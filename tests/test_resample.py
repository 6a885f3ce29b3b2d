"""memescale.decode.resample against Pillow's BICUBIC resize, which it reimplements."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from memescale.decode.resample import square_bicubic

# (height, width, box, size): downscales by 1.0-8x, upscales, fractional boxes, boxes at
# the edges, one-pixel rows and columns. Box coordinates are binary fractions, exact in the
# 32-bit floats Pillow keeps them in.
CASES = [
    (125, 167, (20.875, 0.0, 145.75, 124.875), 100),
    (700, 1000, (150.0, 0.0, 850.0, 700.0), 64),
    (1333, 999, (0.0, 167.0, 999.0, 1166.0), 384),
    (40, 60, (10.25, 2.125, 47.875, 39.75), 33),
    (5, 3, (0.0, 1.0, 3.0, 4.0), 384),
    (1, 1, (0.0, 0.0, 1.0, 1.0), 7),
    (300, 2400, (1050.0, 0.0, 1350.0, 300.0), 37),
    (96, 96, (0.0, 0.0, 96.0, 96.0), 96),
]


def rgbx(pixels: np.ndarray, channels: int = 4) -> np.ndarray:
    """`pixels` (RGB) as C-contiguous RGB (channels 3) or RGBX with a noise X channel (4)."""
    if channels == 3:
        return np.ascontiguousarray(pixels)
    x = np.random.default_rng(1).integers(0, 256, pixels.shape[:2] + (1,), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([pixels, x], 2))


def noise_and_ramp(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random noise (red, blue: clamping after each pass matters) and a ramp (green)."""
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    px[..., 1] = (np.arange(width) * 255 // max(width - 1, 1))[None]
    return px


def pillow(pixels: np.ndarray, box, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box))


def random_cases(n: int, seed: int = 3) -> list[tuple]:
    """`n` random images and boxes (square or not, coordinates in 1/64 steps), any size."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        top, bottom = sorted(np.floor(rng.uniform(0, height, 2) * 64) / 64)
        left, right = sorted(np.floor(rng.uniform(0, width, 2) * 64) / 64)
        if bottom > top and right > left:
            cases.append((height, width, (float(left), float(top), float(right), float(bottom)),
                          int(rng.integers(1, 200))))
    return cases


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width, box, size", CASES + random_cases(24))
def test_same_arithmetic_as_pillow(height, width, box, size, channels):
    # Pillow runs the two passes in the order it finds cheaper; square_bicubic runs the
    # vertical one first, and on the transposed image that first pass is the horizontal
    # one. Pillow's result must be one of the two, to the bit.
    px = noise_and_ramp(height, width)
    left, top, right, bottom = box
    vertical_first = square_bicubic(rgbx(px, channels), box, size)
    turned = rgbx(px.transpose(1, 0, 2), channels)
    horizontal_first = square_bicubic(turned, (top, left, bottom, right), size).transpose(1, 0, 2)
    want = pillow(px, box, size)
    assert np.array_equal(vertical_first, want) or np.array_equal(horizontal_first, want)


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width, box, size", CASES)
def test_pass_order_moves_pixels_by_a_few_levels(height, width, box, size, channels):
    px = noise_and_ramp(height, width)
    out = square_bicubic(rgbx(px, channels), box, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    diff = np.abs(out.astype(np.int16) - pillow(px, box, size))
    assert diff.mean() < 0.4  # measured up to 0.25 on this noise
    smooth = np.abs(out[..., 1].astype(np.int16) - pillow(px, box, size)[..., 1])
    assert smooth.max() <= 1  # the ramp does not clamp: rounding only


def test_photo_quality_equals_pillow():
    # On real memes: the same PSNR against a LANCZOS reference as Pillow's BICUBIC.
    def psnr(a, b):
        return 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))

    ours, theirs = [], []
    for path in sorted(shared_path("images", "memes").glob("*.jpg"))[:20]:
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        box = ((img.width - side) / 2, (img.height - side) / 2, (img.width + side) / 2, (img.height + side) / 2)
        ref = np.asarray(img.resize((224, 224), Image.Resampling.LANCZOS, box=box))
        px = np.asarray(img)
        ours.append(psnr(square_bicubic(rgbx(px), box, 224), ref))
        theirs.append(psnr(pillow(px, box, 224), ref))
    assert len(ours) == 20
    assert np.mean(ours) > np.mean(theirs) - 0.2  # measured 47.98 vs 48.07 dB


def test_read_only_input_is_fine():
    px = rgbx(noise_and_ramp(50, 70))
    px.flags.writeable = False
    assert square_bicubic(px, (10, 0, 60, 50), 20).shape == (20, 20, 3)


@pytest.mark.parametrize("bad, box, size, message", [
    (np.zeros((4, 4, 2), np.uint8), (0, 0, 4, 4), 2, "need C-contiguous uint8"),
    (np.zeros((4, 4, 4), np.float32), (0, 0, 4, 4), 2, "need C-contiguous uint8"),
    (np.zeros((4, 8, 4), np.uint8)[:, ::2], (0, 0, 4, 4), 2, "need C-contiguous uint8"),
    (np.zeros((4, 4, 4), np.uint8), (0, 0, 5, 4), 2, "not inside"),
    (np.zeros((4, 4, 4), np.uint8), (2, 0, 2, 4), 2, "not inside"),
    (np.zeros((4, 4, 4), np.uint8), (0, 0, 4, 4), 0, "size must be"),
])
def test_bad_arguments_raise(bad, box, size, message):
    with pytest.raises(ValueError, match=message):
        square_bicubic(bad, box, size)


def test_work_memory_reuse_and_threads_do_not_change_results():
    # Each thread reuses one work buffer across calls of any shape; results must not depend
    # on what ran before or beside.
    jobs = [(noise_and_ramp(h, w, seed), box, size, c) for seed, ((h, w, box, size), c)
            in enumerate((case, c) for case in CASES for c in (3, 4))]
    alone = [square_bicubic(rgbx(px, c), box, size) for px, box, size, c in jobs]
    again = [square_bicubic(rgbx(px, c), box, size) for px, box, size, c in reversed(jobs)][::-1]
    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(lambda job: square_bicubic(rgbx(job[0], job[3]), job[1], job[2]), jobs * 3))
    for i, want in enumerate(alone):
        assert np.array_equal(again[i], want)
        for k in range(3):
            assert np.array_equal(side_by_side[k * len(jobs) + i], want)
