"""Sample inputs for the demo, tests and benchmarks: a loopback image server, a dump maker, and
embedding shards made from given vectors.

`ImageServer` serves a folder over HTTP on 127.0.0.1 (threaded, stdlib only).
`write_sample_dump` writes Reddit-style submission records whose images live on that server:
single-image posts, galleries, preview-only posts, posts with no image and one malformed line,
so a small dump exercises every path of the ingest.
"""

from __future__ import annotations

import functools
import io
import json
import random
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import numpy as np
import zstandard

from memescale.shards.store import ChunkResult, ShardStore, rows_to_shard_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}


class _QuietHandler(SimpleHTTPRequestHandler):
    delay_s = 0.0

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def do_GET(self):
        if self.delay_s:
            time.sleep(self.delay_s)
        if unquote(urlsplit(self.path).path).lstrip("/") in self.server.failing:
            self.send_error(503, "down for this file")
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    failing: set[str] = set()

    def handle_error(self, request, client_address):
        # a client that hung up mid-response (a killed ingest, a timeout) is not an error here
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class ImageServer:
    """`with ImageServer(folder) as srv:` serves `folder` at `srv.base_url` until the block ends.

    `delay_s` holds every response back that long (a slow image host, for resume tests);
    `srv.failing` is a set of file names answered 503 while they are in it (a host that is
    down for them, for retry tests)."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0):
        handler = functools.partial(type("Handler", (_QuietHandler,), {"delay_s": delay_s}),
                                    directory=str(root))
        self.httpd = _Server((host, port), handler)
        self.failing: set[str] = set()
        self.httpd.failing = self.failing
        self.base_url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, name: str) -> str:
        return f"{self.base_url}/{quote(name)}"


def image_files(folder: str | Path) -> list[str]:
    """Names of the image files directly in `folder`, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def sample_records(names: list[str], base_url: str, titles: dict[str, str] | None = None,
                   seed: int = 0) -> list[dict]:
    """Submission records covering every image in `names` exactly once, plus imageless posts.

    Every 7th post with images is a gallery of up to 3 images, every 5th a preview-only post;
    every 4th post is followed by a self post. `created_utc` alternates int/float/str.
    """
    rng = random.Random(seed)
    titles = titles or {}
    subs = ["memes", "dankmemes", "AdviceAnimals", "funny", "pics"]
    records: list[dict] = []
    i = n = 0
    while i < len(names):
        pid = f"t{n:05d}"
        created = 1_600_000_000 + n * 3600
        rec = {
            "id": pid, "subreddit": subs[n % len(subs)], "author": f"user{rng.randrange(1000)}",
            "title": titles.get(names[i], Path(names[i]).stem.replace("-", " ").replace("_", " ")),
            "created_utc": [created, float(created), str(created)][n % 3],
            "score": rng.randrange(0, 5000), "over_18": n % 11 == 10, "is_self": False,
            "permalink": f"/r/{subs[n % len(subs)]}/comments/{pid}/post/",
        }
        if n % 7 == 3 and i + 1 < len(names):
            group = names[i:i + 3]
            ids = [f"m{pid}{k}" for k in range(len(group))]
            rec.update(url=f"https://www.reddit.com/gallery/{pid}", is_gallery=True,
                       gallery_data={"items": [{"media_id": m, "id": k} for k, m in enumerate(ids)]},
                       media_metadata={m: {"status": "valid", "e": "Image", "m": "image/jpeg",
                                           "s": {"u": _amp(f"{base_url}/{quote(g)}?gallery=1"),
                                                 "x": 100, "y": 100}}
                                       for m, g in zip(ids, group)})
            i += len(group)
        elif n % 5 == 2:
            rec.update(url=f"https://imgflip.com/i/{pid}", post_hint="image",
                       preview={"images": [{"source": {"url": _amp(f"{base_url}/{quote(names[i])}?preview=1"),
                                                       "width": 100, "height": 100}}]})
            i += 1
        else:
            rec["url"] = f"{base_url}/{quote(names[i])}"
            i += 1
        records.append(rec)
        if n % 4 == 0:
            records.append({"id": f"s{n:05d}", "subreddit": "AskReddit", "title": "a self post",
                            "created_utc": created, "is_self": True, "author": "someone",
                            "url": f"https://www.reddit.com/r/AskReddit/comments/s{n:05d}/",
                            "permalink": f"/r/AskReddit/comments/s{n:05d}/x/"})
        n += 1
    return records


def _amp(url: str) -> str:
    return url.replace("&", "&amp;")


def write_sample_dump(path: str | Path, records: list[dict], bad_line_every: int = 17) -> Path:
    """Write `records` as NDJSON (or zstd NDJSON when `path` ends in .zst), with one malformed
    line after every `bad_line_every` records (0: none)."""
    lines = []
    for k, rec in enumerate(records):
        lines.append(json.dumps(rec))
        if bad_line_every and k % bad_line_every == bad_line_every - 1:
            lines.append('{"id": "broken", "title": "unterminated')
    data = ("\n".join(lines) + "\n").encode()
    path = Path(path)
    if path.suffix == ".zst":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
    return path


def write_vector_shards(out: str | Path, vectors: np.ndarray, per_file: int = 5000,
                        overrides: dict[str, np.ndarray] | None = None, first_row: int = 0) -> None:
    """Ingest-style Parquet shards of `vectors` with synthetic post metadata (row i: 'post i',
    its own URL and content hash); `overrides` replaces whole columns (arrays of N values).
    `first_row`: row number of vectors[0], so that a large set can be written block by block
    (call after call, first_row a multiple of per_file) without clashing ids or files."""
    store = ShardStore(str(out))
    n = len(vectors)
    overrides = overrides or {}
    if first_row % per_file:
        raise ValueError(f"first_row {first_row} is not a multiple of per_file {per_file}")
    for f, lo in enumerate(range(0, n, per_file), start=first_row // per_file):
        hi = min(n, lo + per_file)
        ids = np.arange(lo, hi) + first_row
        cols = {
            "image_id": ids + 10**12, "post_id": np.array([f"p{i}" for i in ids], dtype=object),
            "image_index": np.zeros(hi - lo, np.int32), "url": np.array([f"https://i.redd.it/{i}.jpg" for i in ids], dtype=object),
            "subreddit": np.array(["memes"] * (hi - lo), dtype=object), "title": np.array([f"post {i}" for i in ids], dtype=object),
            "author": np.array(["a"] * (hi - lo), dtype=object), "created_utc": 1_600_000_000 + ids,
            "score": ids % 100, "over_18": ids % 10 == 0,
            "permalink": np.array([f"https://www.reddit.com/r/memes/comments/p{i}/" for i in ids], dtype=object),
            "final_url": np.array([""] * (hi - lo), dtype=object), "mime": np.array(["image/jpeg"] * (hi - lo), dtype=object),
            "bytes": np.full(hi - lo, 1000), "content_hash": np.array([f"h{i}" for i in ids], dtype=object),
            "width": np.full(hi - lo, 640, np.int32), "height": np.full(hi - lo, 480, np.int32),
            "embedding": vectors[lo:hi], "model": np.array(["m"] * (hi - lo), dtype=object),
        }
        cols.update({k: np.asarray(v)[lo:hi] for k, v in overrides.items()})
        chunk = ChunkResult(dump="RS_test.zst", index=f, first_line=lo + first_row, lines=hi - lo)
        store.write_chunk(chunk, rows_to_shard_table(cols))


def read_node_rows(shards: str | Path) -> tuple[np.ndarray, list[dict]]:
    """Every row of embedding shards as the index takes it (`shards.corpus.node_batches`):
    (vectors (N, d) float32, N metadata dicts). In memory: for tests and benchmarks."""
    from memescale.shards.corpus import node_batches

    it = node_batches(str(shards))
    next(it)
    vs, md = [], []
    for v, t in it:
        vs.append(v)
        md.extend(t.to_pylist())
    return np.concatenate(vs).astype(np.float32), md


REENCODE_KINDS = ("jpeg_q50", "resized", "cropped")


def reencode_variants(data: bytes) -> dict[str, bytes]:
    """Synthetic near-duplicates of an image (first frame, RGB): JPEG quality 50, resized to
    half size (PNG), and cropped by 5% of each side's length (2.5% per edge, PNG)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        rgb = im.convert("RGB")
    w, h = rgb.size
    dx, dy = round(w * 0.025), round(h * 0.025)
    variants = {
        "jpeg_q50": (rgb, "JPEG", {"quality": 50}),
        "resized": (rgb.resize((max(1, w // 2), max(1, h // 2))), "PNG", {}),
        "cropped": (rgb.crop((dx, dy, w - dx, h - dy)), "PNG", {}),
    }
    out = {}
    for kind, (img, fmt, kw) in variants.items():
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[kind] = buf.getvalue()
    return out
