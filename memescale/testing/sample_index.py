"""Synthetic serving indexes for tests, the demo and the load benchmark.

`synthetic_metadata(n)` makes Reddit-like records (titles, subreddits, times, NSFW flags,
quality scores, sizes) with record 7's title an HTML-injection probe (`XSS_TITLE`);
`write_images(folder, n)` writes n small PNGs to serve from a loopback `ImageServer`;
`build_sample_index(out_dir, vectors, metadata)` builds a weighted index of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

XSS_TITLE = "<img src=x onerror=alert(1)>"
XSS_ROW = 7
SUBREDDITS = ("memes", "dankmemes", "pics", "funny", "AdviceAnimals", "me_irl")
WORDS = ("cat", "dog", "when", "the", "monday", "code", "compiles", "me", "irl", "finally", "nobody",
         "literally", "boss", "meeting", "coffee", "weekend", "bug", "deploy", "friday", "pizza")


def random_unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 rows uniform on the sphere."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_metadata(n: int, seed: int = 0, image_base_url: str = "http://127.0.0.1:9/img",
                       start_utc: int = 1_500_000_000, span_s: int = 8 * 365 * 86400) -> list[dict]:
    """n Reddit-like metadata dicts. Every 10th is NSFW; sizes vary so the page's masonry has
    work; record XSS_ROW's title is XSS_TITLE. Image URLs are ``{image_base_url}/{i % 64}.png``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = int(rng.integers(200, 1200))
        h = int(w * rng.choice([0.5, 0.75, 1.0, 1.33, 1.8]))
        sub = SUBREDDITS[i % len(SUBREDDITS)]
        title = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))
        out.append({
            "image_id": int(rng.integers(1, 2**62)),
            "url": f"{image_base_url}/{i % 64}.png",
            "title": XSS_TITLE if i == XSS_ROW else f"{title} #{i}",
            "subreddit": sub,
            "permalink": f"/r/{sub}/comments/x{i:05d}/post/",
            "created_utc": int(start_utc + rng.integers(0, span_s)),
            "score": int(rng.integers(0, 50_000)),
            "over_18": i % 10 == 9,
            "width": w,
            "height": h,
            "meme": float(rng.random()),
            "aesthetic": float(rng.random()),
            "useful": float(rng.random()),
        })
    return out


def write_images(folder: str | os.PathLike, n: int = 64, size: int = 48) -> Path:
    """n small solid-colour PNGs named 0.png .. n-1.png in `folder` (created)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hue = i / max(n, 1)
        rgb = tuple(int(127 + 120 * math.sin(2 * math.pi * (hue + k / 3))) for k in range(3))
        Image.new("RGB", (size, size), rgb).save(folder / f"{i}.png")
    return folder


def build_sample_index(out_dir: str | os.PathLike, vectors: np.ndarray, metadata: list[dict],
                       R: int = 24, L: int = 48, pq_bytes: int = 16, beta: float = 0.2,
                       threads: int | None = None):
    """A weighted index of `vectors` + `metadata` in `out_dir`; returns (BuildStats, Weighting)."""
    from memescale.index import IndexParams
    from memescale.index.weighting import build_weighted_index

    params = IndexParams(R=R, L=L, alpha=1.2, pq_bytes=pq_bytes, seed=0, threads=threads)
    return build_weighted_index(vectors, metadata, out_dir, params, beta)


def sample_corpus(n: int = 300, dim: int = 64, seed: int = 0, image_base_url: str = "http://127.0.0.1:9/img",
                  duplicates_of: tuple[int, ...] = (50, 51), copies: int = 3) -> tuple[np.ndarray, list[dict]]:
    """Random unit vectors + `synthetic_metadata`, with `copies` near-copies (cosine > 0.9999)
    of each row in `duplicates_of` stored at the end: (vectors (n, dim) float32, metadata)."""
    v = random_unit_vectors(n, dim, seed)
    md = synthetic_metadata(n, seed, image_base_url)
    noise = random_unit_vectors(len(duplicates_of) * copies, dim, seed + 1) * 0.003
    row = n - len(duplicates_of) * copies
    for j, src in enumerate(duplicates_of):
        for c in range(copies):
            v[row] = v[src] + noise[j * copies + c]
            md[row] = dict(md[row], over_18=False)
            row += 1
    return v / np.linalg.norm(v, axis=1, keepdims=True), md
