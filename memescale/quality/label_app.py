"""The labelling tool: a local web page that shows two images and records pairwise quality labels.

    python -m memescale.label --data SHARDS --db labels.sqlite [--config configs/tiny.toml] \
        [--host 127.0.0.1] [--port 8300] [--rater NAME] [--heads OUT.safetensors] \
        [--import FILE.jsonl] [--export FILE.jsonl] [--pool N] [--seed 0] [--set section.key=value]

Order of work: open (or create) the SQLite store `--db`; `--import` adds a JSONL file to it;
`--export` writes every label of the store (after any import) as JSONL and EXITS without
serving (`--data` is then not needed); otherwise the pool is loaded from `--data` and the page
is served on host:port (loopback by default) until Ctrl-C.

Pool: the rows of the embedding shards (first row of each image_id), or `--pool N` of them
sampled with `--seed`. Memory O(pool x dim) fp16 plus its metadata.

Routes::

    GET  /              the page (memescale/quality/static/ and web_static/: two images, keyboard
                        and buttons)
    GET  /api/pair      {left, right: {image_id, url, title, subreddit, permalink}, source,
                         rater, labelled_count, total_count}; image ids are decimal STRINGS
                         (64-bit hashes do not survive a JavaScript number)
    POST /api/label     {left, right, channel, label}: ids as strings or integers, channel in
                         CHANNELS, label a GRADES name; stored with this server's rater and the
                         source the pair was served with ("manual" for a pair never served).
                         Returns {stored, labelled_count, total_count}. 400 with {"error"} for
                         bad input, 413 past MAX_BODY bytes.
    GET  /api/export    every label of the store as a JSONL download (the labelstore format)

Pair choice (`PairChooser`, seeded): with probability `curate.label_random_share` a uniformly
random ordered pair of distinct rows, otherwise active learning: `curate.label_candidates`
random candidate pairs scored by the ensemble's `disagreement`, the highest one this rater has
not labelled (in either order) is shown. Random pairs also avoid labelled ones (a bounded number
of redraws). Without a model every pair is random. O(candidates x members x dim x hidden).

Training (`Trainer`): once the store holds >= 2 x `curate.label_retrain_every` labels, the
ensemble is retrained (`memescale.quality.train.train_heads`, the config's heads_* parameters, on all
labels of all raters whose images are in the pool) in a background thread after every
`label_retrain_every` new labels; requests never wait for it, and the chooser switches to the
new model when it is done. `--heads OUT` writes each new ensemble there (quantiles fitted over
the pool first). A failed retrain is logged and the previous model stays.

Exit status: 0 done, 2 bad arguments, config, data directory, shards, database or import file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from aiohttp import web

from memescale.config import ConfigError, CurateConfig, load_config
from memescale.logs import setup_logging
from memescale.quality.labels import CHANNELS, GRADES, Label, LabelError, LabelStore
from memescale.search.engine import REDDIT
from memescale.shards.corpus import shard_dataset
from memescale.shards.store import embeddings_of

log = logging.getLogger("memescale.label")

STATIC = Path(__file__).resolve().parent / "static"
COMMON = Path(__file__).resolve().parents[1] / "web_static"  # DOM helpers and theme shared with the search page
POOL_COLUMNS = ["image_id", "url", "final_url", "title", "subreddit", "permalink", "model", "embedding"]
MAX_BODY = 4096  # bytes of a POST /api/label body
ISSUED_MEMORY = 4096  # served pairs whose source is remembered for their labels
RANDOM_REDRAWS = 64  # tries for a random pair this rater has not labelled
ID_PATTERN = re.compile(r"-?[0-9]{1,20}")
INT64 = (-(2**63), 2**63 - 1)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src * data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class UsageError(ValueError):
    """Bad data directory, shards or arguments: `error: ...` and exit status 2."""


class BadInput(ValueError):
    """A request the API refuses with 400 and the message."""


class Heads(Protocol):
    def disagreement(self, emb_left: np.ndarray, emb_right: np.ndarray) -> np.ndarray: ...


# -- the pool ---------------------------------------------------------------------------------
@dataclass
class Pool:
    """The images pairs are drawn from: unique int64 ids, fp16 embeddings, shown metadata."""

    ids: np.ndarray  # (n,) int64, unique
    emb: np.ndarray  # (n, d) float16
    meta: list[dict[str, Any]]  # per row: url, final_url, title, subreddit, permalink
    model: str = ""
    row: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.row = {int(i): k for k, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def card(self, k: int) -> dict[str, Any]:
        """What the page shows of row k: image_id as a decimal string, an absolute permalink."""
        m = self.meta[k]
        permalink = m["permalink"] or ""
        return {"image_id": str(int(self.ids[k])), "url": m["url"] or m["final_url"] or "",
                "title": m["title"] or "", "subreddit": m["subreddit"] or "",
                "permalink": REDDIT + permalink if permalink.startswith("/") else permalink}


def load_pool(data: str, size: int | None = None, seed: int = 0) -> Pool:
    """Read the shards of `data` (a local folder or URI) into a Pool; UsageError when there is
    no such folder, no shard, fewer than 2 images or a mix of embedding models. With `size`
    only a seeded sample of that many rows is read (memory O(size x dim), not the corpus)."""
    if "://" not in data and not Path(data).is_dir():
        raise UsageError(f"data directory {data} does not exist")
    try:
        dataset = shard_dataset(data)
    except FileNotFoundError:
        raise UsageError(f"no embedding shards in {data}") from None
    total = dataset.count_rows()
    if size is not None and size < total:
        picked = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
        table = dataset.take(pa.array(picked), columns=POOL_COLUMNS)
    else:
        table = dataset.to_table(columns=POOL_COLUMNS)
    if table.num_rows == 0:
        raise UsageError(f"no embedding shards in {data}")
    models = sorted(set(table.column("model").to_pylist()) - {None})
    if len(models) > 1:
        raise UsageError(f"{data} mixes embeddings of several models: {models}")
    ids = table.column("image_id").to_numpy().astype(np.int64)
    rows = np.sort(np.unique(ids, return_index=True)[1])
    if len(rows) < 2:
        raise UsageError(f"{data} has {len(rows)} distinct image(s): a pair needs 2")
    table = table.take(rows)
    meta = table.select(["url", "final_url", "title", "subreddit", "permalink"]).to_pylist()
    return Pool(ids[rows], embeddings_of(table), meta, models[0] if models else "")


# -- pair choice ------------------------------------------------------------------------------
def pair_key(a: int, b: int) -> tuple[int, int]:
    """The unordered pair {a, b} (a labelled pair is not shown again in either order)."""
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class Pair:
    left: int  # pool rows
    right: int
    source: str  # "random" | "active"


class PairChooser:
    """Seeded choice of the next pair (see the module docstring). `heads` is swapped in by the
    trainer (None: random pairs only); `labelled` holds this rater's unordered id pairs."""

    def __init__(self, pool: Pool, cfg: CurateConfig, seed: int = 0,
                 labelled: set[tuple[int, int]] | None = None, heads: Heads | None = None):
        self.pool, self.cfg = pool, cfg
        self.rng = np.random.default_rng(seed)
        self.labelled = labelled if labelled is not None else set()
        self.heads = heads

    def next(self) -> Pair:
        heads = self.heads
        if heads is not None and self.rng.random() >= self.cfg.label_random_share:
            pair = self._active(heads)
            if pair is not None:
                return pair
        return self._random()

    def _draw(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """m uniformly random ordered pairs of distinct rows."""
        n = len(self.pool)
        i = self.rng.integers(n, size=m)
        j = self.rng.integers(n - 1, size=m)
        return i, j + (j >= i)

    def _fresh(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        ids = self.pool.ids
        return np.array([pair_key(int(ids[a]), int(ids[b])) not in self.labelled for a, b in zip(i, j)])

    def _random(self) -> Pair:
        i, j = self._draw(RANDOM_REDRAWS)
        fresh = np.flatnonzero(self._fresh(i, j))
        k = fresh[0] if len(fresh) else 0
        return Pair(int(i[k]), int(j[k]), "random")

    def _active(self, heads: Heads) -> Pair | None:
        i, j = self._draw(max(1, self.cfg.label_candidates))
        emb = self.pool.emb
        score = np.asarray(heads.disagreement(emb[i].astype(np.float32), emb[j].astype(np.float32)),
                           np.float64)
        score[~self._fresh(i, j)] = -np.inf
        k = int(np.argmax(score))
        return Pair(int(i[k]), int(j[k]), "active") if np.isfinite(score[k]) else None


# -- background retraining --------------------------------------------------------------------
class Trainer:
    """Retrains the ensemble in a daemon thread; `note_labels` is called from the event loop."""

    def __init__(self, store: LabelStore, pool: Pool, cfg: CurateConfig, chooser: PairChooser,
                 heads_out: str | None = None, seed: int = 0):
        self.store, self.pool, self.cfg, self.chooser = store, pool, cfg, chooser
        self.heads_out, self.seed = heads_out, seed
        self.pending = store.count()  # labels not yet seen by a model: all of them at first
        self.rounds = 0
        self.thread: threading.Thread | None = None

    def note_labels(self, n: int) -> None:
        self.pending += n
        self.maybe_start()

    def maybe_start(self) -> None:
        every = max(1, self.cfg.label_retrain_every)
        if (self.thread is not None and self.thread.is_alive()) or self.pending < every:
            return
        if self.store.count() < 2 * every:
            return
        self.pending = 0
        self.rounds += 1
        self.thread = threading.Thread(target=self._train, args=(self.rounds,), daemon=True,
                                       name=f"label-retrain-{self.rounds}")
        self.thread.start()

    def _train(self, round_: int) -> None:
        try:
            from memescale.quality.train import pairs_from_labels, train_heads

            pairs, skipped = pairs_from_labels(self.store.labels(), self.pool.ids)
            if len(pairs) == 0:
                log.warning("retrain skipped: no label names two pool images", extra={"skipped": skipped})
                return
            c = self.cfg
            heads, report = train_heads(self.pool.emb, pairs, members=c.heads_members, hidden=c.heads_hidden,
                                        holdout=c.heads_holdout, max_epochs=c.heads_max_epochs,
                                        patience=c.heads_patience, seed=self.seed + round_)
            heads.model = self.pool.model
            if self.heads_out:
                heads.fit_quantiles(self.pool.emb)
                heads.save(self.heads_out)
            self.chooser.heads = heads
            log.info("quality heads retrained", extra={"round": round_, "skipped": skipped,
                                                       "heads_out": self.heads_out, "report": report})
        except Exception:  # a background thread: log it, keep serving with the previous model
            log.exception("quality heads retrain failed", extra={"round": round_})


# -- the labelling session --------------------------------------------------------------------
class Labeller:
    """One rater's session over a pool and a store: serves pairs, validates and stores labels."""

    def __init__(self, pool: Pool, store: LabelStore, cfg: CurateConfig, rater: str = "",
                 seed: int = 0, heads_out: str | None = None, heads: Heads | None = None):
        self.pool, self.store, self.rater = pool, store, rater
        mine = [lb for lb in store.labels() if lb.rater == rater]
        self.done = {(lb.left, lb.right, lb.channel) for lb in mine}
        self.chooser = PairChooser(pool, cfg, seed, {pair_key(lb.left, lb.right) for lb in mine}, heads)
        self.trainer = Trainer(store, pool, cfg, self.chooser, heads_out, seed)
        self.issued: OrderedDict[tuple[int, int], str] = OrderedDict()

    def counts(self) -> dict[str, int]:
        return {"labelled_count": len(self.done), "total_count": self.store.count()}

    def next_pair(self) -> dict[str, Any]:
        pair = self.chooser.next()
        left, right = self.pool.card(pair.left), self.pool.card(pair.right)
        self.issued[(int(left["image_id"]), int(right["image_id"]))] = pair.source
        while len(self.issued) > ISSUED_MEMORY:
            self.issued.popitem(last=False)
        return {"left": left, "right": right, "source": pair.source, "rater": self.rater, **self.counts()}

    def parse(self, body: Any) -> Label:
        """A Label from a POST body; BadInput naming the first problem."""
        if not isinstance(body, dict):
            raise BadInput("body must be a JSON object")
        left, right = self._image_id(body, "left"), self._image_id(body, "right")
        if left == right:
            raise BadInput("left and right are the same image")
        if not isinstance(body.get("channel"), str) or body["channel"] not in CHANNELS:
            raise BadInput(f"channel must be one of {list(CHANNELS)}")
        if not isinstance(body.get("label"), str) or body["label"] not in GRADES:
            raise BadInput(f"label must be one of {list(GRADES)}")
        source = self.issued.get((left, right), "manual")
        return Label(left, right, body["channel"], GRADES[body["label"]], self.rater, source, time.time())

    def _image_id(self, body: dict, key: str) -> int:
        v = body.get(key)
        if isinstance(v, str) and ID_PATTERN.fullmatch(v):
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not INT64[0] <= v <= INT64[1]:
            raise BadInput(f"{key} must be an image id (a decimal string or an integer)")
        if v not in self.pool.row:
            raise BadInput(f"{key}: unknown image id {v}")
        return v

    def record(self, label: Label) -> dict[str, Any]:
        self.store.add([label])
        self.done.add((label.left, label.right, label.channel))
        self.chooser.labelled.add(pair_key(label.left, label.right))
        self.trainer.note_labels(1)
        log.info("label stored", extra={"left": label.left, "right": label.right, "channel": label.channel,
                                        "grade": label.grade, "rater": label.rater, "source": label.source})
        stored = dict(label.to_json(), left=str(label.left), right=str(label.right))
        return {"stored": stored, **self.counts()}

    def export_text(self) -> str:
        """Every label of the store as JSONL, as `LabelStore.export_jsonl` writes it."""
        return "".join(json.dumps(lb.to_json(), sort_keys=True) + "\n" for lb in self.store.labels())


# -- HTTP -------------------------------------------------------------------------------------
def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(labeller: Labeller) -> web.Application:
    """The aiohttp application of a session (bodies over MAX_BODY bytes are refused)."""

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def pair(request: web.Request) -> web.Response:
        return web.json_response(labeller.next_pair(), headers={"Cache-Control": "no-store"})

    async def label(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body over {MAX_BODY} bytes")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body is not JSON")
        try:
            return web.json_response(labeller.record(labeller.parse(body)))
        except BadInput as e:
            return _error(400, str(e))

    async def export(request: web.Request) -> web.Response:
        return web.Response(text=await asyncio.to_thread(labeller.export_text), content_type="application/x-ndjson",
                            headers={"Content-Disposition": 'attachment; filename="labels.jsonl"'})

    async def start_training(app: web.Application) -> None:
        labeller.trainer.maybe_start()

    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes([web.get("/", page), web.get("/api/pair", pair), web.post("/api/label", label),
                    web.get("/api/export", export), web.static("/static", STATIC),
                    web.static("/common", COMMON)])
    app.on_startup.append(start_training)
    return app


# -- CLI --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memescale.label", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="embedding shard directory (needed unless --export)")
    p.add_argument("--db", required=True, help="SQLite label store (created when absent)")
    p.add_argument("--config", default=None, help="TOML config (curate.label_* and heads_*)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--rater", default=os.environ.get("USER", ""), help="name stored with each label")
    p.add_argument("--heads", default=None, metavar="OUT.safetensors", help="write each retrained ensemble here")
    p.add_argument("--import", dest="import_path", default=None, metavar="FILE.jsonl",
                   help="add these labels to the store first")
    p.add_argument("--export", dest="export_path", default=None, metavar="FILE.jsonl",
                   help="write the store's labels here and exit (no server)")
    p.add_argument("--pool", type=int, default=None, metavar="N", help="label a seeded sample of N images")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool sample and the pair choice")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field")
    return p


def _prepare(args: argparse.Namespace) -> tuple[LabelStore, CurateConfig]:
    """Config and store, with the import done; raises what main reports as `error:`."""
    cfg = load_config(args.config, args.set).curate
    if args.pool is not None and args.pool < 2:
        raise UsageError("--pool must be at least 2")
    store = LabelStore(args.db)
    if args.import_path:
        n = store.import_jsonl(args.import_path)
        log.info("labels imported", extra={"file": args.import_path, "labels": n})
    return store, cfg


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if not args.export_path and not args.data:
        p.error("--data is required to serve (only --export runs without it)")
    setup_logging()
    try:
        store, cfg = _prepare(args)
        if args.export_path:
            n = store.export_jsonl(args.export_path)
            log.info("labels exported", extra={"file": args.export_path, "labels": n})
            return 0
        pool = load_pool(args.data, args.pool, args.seed)
    except (ConfigError, UsageError, LabelError, OSError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labeller = Labeller(pool, store, cfg, args.rater, args.seed, args.heads)
    log.info("labelling", extra={"pool": len(pool), "labels": store.count(), "rater": args.rater,
                                 "url": f"http://{args.host}:{args.port}/"})
    print(f"labelling {len(pool)} images at http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    web.run_app(make_app(labeller), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
