"""Shared test fixtures: where the shared real-data folder is, and skipping when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEMESCALE_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the calling test with a reason when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data {p} is absent (set MEMESCALE_SHARED_DATA to its folder)")
    return p


def write_fake_shards(out, vectors: np.ndarray, per_file: int = 5000) -> None:
    """Ingest-style Parquet shards of `vectors` with synthetic post metadata (row i: 'post i')."""
    from memescale.store import ChunkResult, ShardStore, rows_to_shard_table

    store = ShardStore(str(out))
    n = len(vectors)
    for f, lo in enumerate(range(0, n, per_file)):
        hi = min(n, lo + per_file)
        ids = np.arange(lo, hi)
        cols = {
            "image_id": ids + 10**12, "post_id": np.array([f"p{i}" for i in ids], dtype=object),
            "image_index": np.zeros(hi - lo, np.int32), "url": np.array([f"https://i.redd.it/{i}.jpg" for i in ids], dtype=object),
            "subreddit": np.array(["memes"] * (hi - lo), dtype=object), "title": np.array([f"post {i}" for i in ids], dtype=object),
            "author": np.array(["a"] * (hi - lo), dtype=object), "created_utc": 1_600_000_000 + ids,
            "score": ids % 100, "over_18": ids % 10 == 0,
            "permalink": np.array([f"https://www.reddit.com/r/memes/comments/p{i}/" for i in ids], dtype=object),
            "final_url": np.array([""] * (hi - lo), dtype=object), "mime": np.array(["image/jpeg"] * (hi - lo), dtype=object),
            "bytes": np.full(hi - lo, 1000), "content_hash": np.array(["h"] * (hi - lo), dtype=object),
            "width": np.full(hi - lo, 640, np.int32), "height": np.full(hi - lo, 480, np.int32),
            "embedding": vectors[lo:hi], "model": np.array(["m"] * (hi - lo), dtype=object),
        }
        store.write_chunk(ChunkResult(dump="RS_test.zst", index=f, first_line=lo, lines=hi - lo), rows_to_shard_table(cols))
