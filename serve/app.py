"""The Ray Serve app: `Encoder` (texts, images -> vectors), `Searcher` (the disk index) and
`Api` (FastAPI ingress: JSON API, the web page, metrics, telemetry).

    serve run serve.app:build_app index=DIR config=configs/tiny.toml [serve.allow_private=true ...]
    serve run -a local serve.app:build_app ...  # a fresh local Ray even when one is running
    serve deploy configs/serve.yaml            # on a running cluster
    python -m serve.app --index DIR --config configs/tiny.toml --port 8000
    base_url = serve.app.start(index_dir, "configs/tiny.toml", "127.0.0.1", 8000)

Request path of `POST /api/search`: Api validates the body (`memescale.search.requests`),
turns the input into a query vector (text -> Encoder; image bytes or an image_url fetched
through the SSRF guard -> decoded here -> Encoder; embedding as given; like -> the item's
stored vector; terms -> each term's vector, weighted, summed, normalised), then Searcher runs the index search, filters, dedup and paging. Encoder
batches concurrent requests (`@serve.batch`); Searcher runs `Index.search` (synchronous,
numba, GIL released) on a small thread pool so one replica serves several requests at once.
Deployment sizes and every limit come from the `[serve]` section of the config.

Endpoints (OpenAPI at /docs and /openapi.json):
    POST /api/search     {text | image | image_url | embedding | like | terms, k, weights, filters,
                         dedup, cursor} -> {results, stats, offset, next_cursor}; terms: [{text |
                         image | image_url | embedding | like, weight}] (weights may be negative)
    GET  /api/info       index size, model, dims, available weights, limits
    POST /api/telemetry  {events: [{type, props, ts}]} -> 202 {stored}
    GET  /metrics        Prometheus text of the replica that answers (Ray's metrics hold all)
    GET  /               the search page (serve/static/ and memescale/web_static/: no build step)
Invalid input is a 422 with a message (types, several inputs, undecodable image, wrong-length
embedding, text over the model's context, refused image_url, bad cursor); a body over
`serve.max_body_bytes` is a 413; a failed backend deployment is a 503. Overload: beyond
`serve.api_max_ongoing_requests` per Api replica plus `serve.max_queued_requests` waiting at
the proxy, a request is refused by the proxy at once with 503 and `Retry-After`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# at runtime, through Serve's ingress wrappers, and must see real types, not strings.
import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import BackpressureConfig

import memescale
from memescale.config import Config, IngestConfig, load_config
from memescale.decode.image import ImageDecodeError, decode_image
from memescale.index.weighting import WEIGHT_MAX, WEIGHT_MIN, WeightError, Weighting
from memescale.ingest.download import SharedDownloader
from memescale.ray_runtime import require_gpus
from memescale.search.cursor import decode_cursor, encode_cursor, query_hash
from memescale.search.engine import SearchEngine, parse_filters
from memescale.search.requests import (
    INPUT_FIELDS,
    MAX_K,
    MAX_TERMS,
    Filters,
    QueryInput,
    SearchInputError,
    SearchRequest,
    SearchResponse,
    decode_base64_image,
    embedding_vector,
)
from serve import bodylimit, prom
from serve.bodylimit import BodyLimitMiddleware
from serve.telemetry import EventTooLarge, TelemetryBatch, TelemetryLog, opted_out

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STATIC = Path(__file__).resolve().parent / "static"
COMMON = Path(memescale.__file__).resolve().parent / "web_static"  # shared with the labelling page
APP_NAME = "memescale"
ROUTES = ("/", "/api/search", "/api/info", "/api/health", "/api/telemetry", "/metrics")
PAGE_HEADERS = {
    # Result images come from any host; scripts, styles and API calls only from this origin.
    "Content-Security-Policy": "default-src 'self'; img-src * data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- Encoder -------------------------------------------------------------------------------


def encoder_threads(setting: int, cpus: float) -> int:
    """torch threads of a CPU Encoder replica from `serve.encoder_threads` (see the config)."""
    if setting < 0:
        return max(1, round(cpus))
    return setting or len(os.sched_getaffinity(0))


@serve.deployment(name="Encoder")
class Encoder:
    """The open_clip model: texts and (decoded, model-sized) images -> L2-normalised vectors."""

    def __init__(self, cfg: Config):
        import torch

        from memescale.embed.encoder import ImageTextEncoder

        if cfg.model.device != "cuda":
            torch.set_num_threads(encoder_threads(cfg.serve.encoder_threads, cfg.serve.encoder_cpus))
        self.enc = ImageTextEncoder(cfg.model, text_only=not cfg.serve.image_queries, text_int8=cfg.serve.text_int8)
        self.context_length = self.enc.context_length
        for method in (self._texts, self._images):
            method.set_max_batch_size(max(1, cfg.serve.encode_batch))  # type: ignore[attr-defined]
            method.set_batch_wait_timeout_s(max(0.0, cfg.serve.encode_batch_wait_s))  # type: ignore[attr-defined]
        # text -> (dim,) float32, least recently used first: repeated queries and every next page
        # of a text search skip the text tower
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = max(0, cfg.serve.text_cache_size)
        self.enc.encode_texts(["warm up"])  # first calls allocate; keep that off the first request
        if not self.enc.text_only:
            self.enc.encode_images(np.zeros((1, self.enc.image_size, self.enc.image_size, 3), np.uint8))

    def info(self) -> dict[str, Any]:
        return {"model": self.enc.model_tag, "dim": self.enc.dim, "image_size": self.enc.image_size,
                "context_length": self.context_length, "device": self.enc.device,
                "image_queries": not self.enc.text_only, "text_int8": self.enc.text_int8}

    async def encode_text(self, text: str) -> np.ndarray:
        """(dim,) float32. SearchInputError when the text is over the model's context."""
        hit = self.cache.get(text)
        if hit is not None:
            self.cache.move_to_end(text)
            prom.REGISTRY.record("memescale_serve_text_cache", outcome="hit")
            return hit
        from memescale.embed.encoder import TextTooLong

        try:
            tokens = self.enc.tokenize(text)
        except TextTooLong as e:
            raise SearchInputError(str(e)) from None
        v = await self._texts(tokens)
        prom.REGISTRY.record("memescale_serve_text_cache", outcome="miss")
        if self.cache_size:
            self.cache[text] = v
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return v

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 at S = image_size -> (dim,) float32. SearchInputError otherwise."""
        if self.enc.text_only:
            raise SearchInputError("image queries are off on this server (serve.image_queries = false)")
        s = self.enc.image_size
        if pixels.shape != (s, s, 3) or pixels.dtype != np.uint8:
            raise SearchInputError(f"expected ({s}, {s}, 3) uint8 pixels")
        return await self._images(pixels)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _texts(self, tokens: list[np.ndarray]) -> list[np.ndarray]:
        prom.REGISTRY.record("memescale_serve_encode_batch_size", len(tokens), kind="text")
        out = await asyncio.to_thread(self.enc.encode_tokens, np.stack(tokens))
        return list(out.astype(np.float32))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        prom.REGISTRY.record("memescale_serve_encode_batch_size", len(images), kind="image")
        out = await asyncio.to_thread(self.enc.encode_images, np.stack(images))
        return list(out.astype(np.float32))


# -- Searcher ------------------------------------------------------------------------------


@serve.deployment(name="Searcher")
class Searcher:
    """One opened index per replica; searches run on `serve.search_threads` threads."""

    def __init__(self, index_dir: str, cfg: Config):
        from memescale.index.live import LiveIndex

        self.index = LiveIndex.open(index_dir, threads=1, io=cfg.serve.index_io)
        self.weighting = self.index.weighting
        self.engine = SearchEngine(self.index, self.weighting, cfg.serve)
        self.pool = ThreadPoolExecutor(max(1, cfg.serve.search_threads), thread_name_prefix="search")
        probe = np.zeros(self.weighting.base_dim, np.float32)
        probe[0] = 1.0
        self.engine.search(probe, None, parse_filters(Filters()), True, 0, 4)  # compile kernels now
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._follow_updates, args=(max(0.05, cfg.serve.refresh_s),),
                                           name="index-refresh", daemon=True)
        self._refresher.start()

    def _follow_updates(self, period: float) -> None:
        """Take in committed inserts, deletes and new generations (`LiveIndex.refresh`);
        searches keep running on the state they started with."""
        while not self._stop.wait(period):
            try:
                if self.index.refresh():
                    log.info("index updated", extra=self.index.counts())
                    prom.REGISTRY.record("memescale_serve_index_refreshes")
            except Exception:  # a half-written file or a transient error: try again next period
                log.exception("index refresh failed")

    def info(self) -> dict[str, Any]:
        w = self.weighting.to_json()
        w.pop("quantiles", None)
        return {"size": self.index.live_count, "index_dim": self.index.dim, "base_dim": self.weighting.base_dim,
                "weighting": w, "build": dict(self.index.state.base.info or {}), "counts": self.index.counts()}

    async def search(self, req: dict[str, Any]) -> dict[str, Any]:
        """One page (`SearchEngine.search`). SearchInputError for an unknown `like` item,
        WeightError for weights the index cannot honour."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._search, req)

    async def vector_of(self, image_id: int) -> np.ndarray:
        """The stored base vector of an indexed image (SearchInputError if none)."""
        return self.engine.vector_of(image_id)

    def _search(self, req: dict[str, Any]) -> dict[str, Any]:
        q = req["vector"] if req.get("like") is None else self.engine.vector_of(int(req["like"]))
        return self.engine.search(q, req["weights"], req["filters"], req["dedup"], req["offset"], req["k"])


# -- Api -----------------------------------------------------------------------------------


api = FastAPI(
    title="memescale",
    version="0.1.0",
    description="Text and image search over images posted to Reddit. POST /api/search with exactly one of "
    "text, image (base64), image_url, embedding, like, or terms (a weighted list of those).",
)
api.add_middleware(BodyLimitMiddleware)  # the limit: bodylimit.set_process_limit in Api.__init__
api.mount("/static", StaticFiles(directory=STATIC), name="static")
api.mount("/common", StaticFiles(directory=COMMON), name="common")


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    path = request.url.path
    route = path if path in ROUTES else ("/static" if path.startswith(("/static/", "/common/")) else "other")
    try:
        response = await call_next(request)
    except Exception:
        prom.REGISTRY.record("memescale_serve_requests", route=route, status="500")
        raise
    prom.REGISTRY.record("memescale_serve_requests", route=route, status=str(response.status_code))
    return response


@api.exception_handler(SearchInputError)
async def _input_error(request: Request, exc: SearchInputError):
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


@api.exception_handler(WeightError)
async def _weight_error(request: Request, exc: WeightError):
    return JSONResponse({"detail": str(exc)}, status_code=422)


@api.exception_handler(EventTooLarge)
async def _event_too_large(request: Request, exc: EventTooLarge):
    return JSONResponse({"detail": str(exc)}, status_code=413)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # The default handler echoes each offending input back, which for a multi-megabyte
    # base64 image is the whole image: report where and what, not the input.
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, "),
               "type": e.get("type", "")} for e in exc.errors()][:20]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


class Unavailable(Exception):
    """A backing deployment failed or is not reachable."""


@contextlib.contextmanager
def _backend_errors():
    """Around calls to the backend deployments: a SearchInputError or WeightError that a
    deployment raised is re-raised as itself (a handle delivers it inside a RayTaskError,
    an instance of its class too, but whose message is the remote traceback; the original
    is its `cause`), one raised here passes unchanged, anything else becomes Unavailable."""
    try:
        yield
    except Exception as e:
        cause = e.cause if isinstance(e, RayTaskError) else e
        if cause is e and isinstance(e, (SearchInputError, WeightError)):
            raise
        if isinstance(cause, (SearchInputError, WeightError)):
            raise cause from e
        raise Unavailable(type(e).__name__) from e


@api.exception_handler(Unavailable)
async def _unavailable(request: Request, exc: Unavailable):
    return JSONResponse({"detail": f"search backend unavailable: {exc}"}, status_code=503)


class InfoResponse(BaseModel):
    size: int = Field(description="images in the index (deleted ones excluded)")
    generation: int = Field(description="the index generation served (a consolidation adds one)")
    model: str
    dim: int = Field(description="embedding width of the model's vectors in the index")
    index_dim: int = Field(description="width of the stored vectors (embedding + weighting dims)")
    encoder_dim: int
    text_search: bool = Field(description="text and image queries work (encoder and index widths agree)")
    image_search: bool = Field(True, description="image and image_url queries are on (serve.image_queries)")
    weights: list[str] = Field(description="weights this index honours; others must be 0")
    weight_range: list[float]
    inputs: list[str]
    max_k: int
    default_k: int
    max_depth: int
    dedup_threshold: float
    context_length: int
    max_body_bytes: int


class TelemetryResult(BaseModel):
    stored: int
    reason: str | None = None


@serve.deployment(name="Api")
@serve.ingress(api)
class Api:
    """HTTP ingress: validation, query vectors, paging; the page and its static files."""

    def __init__(self, encoder, searcher, cfg: Config, telemetry_path: str):
        self.encoder = encoder
        self.searcher = searcher
        self.cfg = cfg
        self.s = cfg.serve
        bodylimit.set_process_limit(self.s.max_body_bytes)
        self.telemetry = TelemetryLog(telemetry_path, self.s.telemetry_max_bytes,
                                      self.s.telemetry_event_max_bytes, self.s.telemetry_enabled)
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()
        # image_url fetches share one HTTP session, opened by the first and closed in __del__.
        self._downloads = SharedDownloader(dataclasses.replace(
            IngestConfig(), allow_private=self.s.allow_private, max_bytes=self.s.max_body_bytes,
            total_timeout_s=self.s.image_url_timeout_s, connect_timeout_s=min(5.0, self.s.image_url_timeout_s),
            read_timeout_s=self.s.image_url_timeout_s, retries=0, download_concurrency=32,
            per_host_concurrency=8, user_agent=cfg.ingest.user_agent))

    async def __del__(self):
        """Replica shutdown (Serve awaits it): close the image_url session."""
        await self._downloads.aclose()

    async def _backend_info(self) -> dict[str, Any]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    try:
                        enc, sea = await asyncio.gather(self.encoder.info.remote(), self.searcher.info.remote())
                    except Exception as e:
                        raise Unavailable(type(e).__name__) from e
                    self._info = {"encoder": enc, "searcher": sea,
                                  "weighting": Weighting.from_json({**sea["weighting"], "quantiles": {}})}
        return self._info

    # -- page ------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    # -- API -------------------------------------------------------------------------------
    @api.get("/api/health")
    async def health(self) -> dict:
        await self._backend_info()
        return {"ok": True}

    @api.get("/api/info", response_model=InfoResponse)
    async def info(self) -> dict:
        i = await self._backend_info()
        enc, sea = i["encoder"], i["searcher"]
        with _backend_errors():  # the index's size and generation change with updates: ask each time
            now = await self.searcher.info.remote()
        return {
            "size": now["size"], "generation": now["counts"]["generation"], "model": enc["model"], "dim": sea["base_dim"], "index_dim": sea["index_dim"],
            "encoder_dim": enc["dim"], "text_search": enc["dim"] == sea["base_dim"],
            "image_search": bool(enc.get("image_queries", True)) and enc["dim"] == sea["base_dim"],
            "weights": list(sea["weighting"]["names"]), "weight_range": [WEIGHT_MIN, WEIGHT_MAX],
            "inputs": [*INPUT_FIELDS, "terms"], "max_terms": MAX_TERMS, "max_k": MAX_K, "default_k": self.s.default_k,
            "max_depth": self.s.max_depth, "dedup_threshold": self.s.dedup_threshold,
            "context_length": enc["context_length"], "max_body_bytes": self.s.max_body_bytes,
        }

    @api.post("/api/search", response_model=SearchResponse, responses={
        413: {"description": "body or image too large"},
        422: {"description": "invalid request: types, ranges, inputs, image, embedding, text length"},
        503: {"description": "a backend deployment is unavailable, or the server is overloaded (with "
                              "Retry-After)"}})
    async def search(self, req: SearchRequest) -> dict:
        t0 = time.perf_counter()
        i = await self._backend_info()
        qhash = query_hash(req)
        offset = decode_cursor(req.cursor, qhash)
        if offset >= self.s.max_depth:
            raise SearchInputError(f"cursor is past the deepest page ({self.s.max_depth} results)")
        k = req.k if "k" in req.model_fields_set else self.s.default_k
        k = max(1, min(k, MAX_K, self.s.max_depth - offset))
        filters = parse_filters(req.filters)
        weights = req.weights.as_dict()
        i["weighting"].check_weights(weights)
        vector, like = await self._query_vector(req, i)
        t1 = time.perf_counter()
        with _backend_errors():
            out = await self.searcher.search.remote({"vector": vector, "like": like, "weights": weights,
                                                     "filters": filters, "dedup": req.dedup,
                                                     "offset": offset, "k": k})
        t2 = time.perf_counter()
        st = out["stats"]
        st["encode_ms"] = round((t1 - t0) * 1000, 3)
        st["total_ms"] = round((t2 - t0) * 1000, 3)
        for stage, ms in (("encode", st["encode_ms"]), ("search", st["search_ms"]),
                          ("metadata", st["metadata_ms"]), ("total", st["total_ms"])):
            prom.REGISTRY.record("memescale_serve_latency_seconds", ms / 1000, stage=stage)
        prom.REGISTRY.record("memescale_serve_index_reads", st["reads"])
        if st.get("corrupt_records"):
            prom.REGISTRY.record("memescale_serve_corrupt_records", st["corrupt_records"])
        nxt = encode_cursor(offset + k, qhash) if out["more"] else None
        return {"results": out["results"], "stats": st, "offset": offset, "next_cursor": nxt}

    async def _query_vector(self, req: SearchRequest, i: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
        """(query vector, None), or (None, image_id) for a single `like` (the Searcher looks it up)."""
        if req.terms is not None:
            vectors = await asyncio.gather(*(self._input_vector(t, i) for t in req.terms))
            q = np.asarray(np.sum([t.weight * v for t, v in zip(req.terms, vectors)], axis=0, dtype=np.float64))
            n = float(np.linalg.norm(q))
            if n < 1e-6:
                raise SearchInputError("the terms cancel out: their weighted sum is a zero vector")
            return (q / n).astype(np.float32), None
        if req.like is not None:
            return None, req.like
        return await self._input_vector(req, i), None

    async def _input_vector(self, inp: QueryInput, i: dict[str, Any]) -> np.ndarray:
        """The (base_dim,) float32 unit vector of one query input."""
        kind = inp.input_kind
        base_dim, enc = i["searcher"]["base_dim"], i["encoder"]
        if kind == "embedding":
            assert inp.embedding is not None  # the request validator: the kind's field is set
            return embedding_vector(inp.embedding, base_dim)
        if kind == "like":
            assert inp.like is not None
            with _backend_errors():
                return np.asarray(await self.searcher.vector_of.remote(int(inp.like)), np.float32)
        if enc["dim"] != base_dim:
            raise SearchInputError(f"this index holds {base_dim}-d vectors but the model encodes {enc['dim']}-d: "
                                   "only `embedding` and `like` queries work here")
        with _backend_errors():
            if kind == "text":
                vector = await self.encoder.encode_text.remote(inp.text)
            elif not enc.get("image_queries", True):
                raise SearchInputError("image queries are off on this server (serve.image_queries = false)")
            else:
                if kind == "image":
                    assert inp.image is not None
                    data = decode_base64_image(inp.image, self.s.max_body_bytes)
                else:
                    assert inp.image_url is not None
                    data = await self._fetch(inp.image_url)
                pixels = await asyncio.to_thread(self._decode, data, enc["image_size"])
                vector = await self.encoder.encode_image.remote(pixels)
        return np.asarray(vector, np.float32)

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        try:
            return decode_image(data, size, self.s.max_image_pixels).pixels
        except ImageDecodeError as e:
            raise SearchInputError(f"image could not be decoded ({e.reason}): {e.detail}") from None

    async def _fetch(self, url: str) -> bytes:
        r = await self._downloads.fetch(url)
        if r.ok:
            assert r.data is not None  # an ok FetchResult holds the body
            return r.data
        if r.reason == "too_large":
            raise SearchInputError(f"image_url: the image is larger than {self.s.max_body_bytes} bytes", 413)
        if r.reason in ("bad_url", "blocked_address"):
            raise SearchInputError(f"image_url refused ({r.reason}): only public http(s) image URLs can be fetched")
        status = f", HTTP {r.status}" if r.status else ""
        raise SearchInputError(f"image_url could not be fetched ({r.reason}{status})")

    @api.post("/api/telemetry", status_code=202, response_model=TelemetryResult,
              responses={413: {"description": "an event is too large"}})
    async def telemetry_events(self, batch: TelemetryBatch, request: Request) -> dict:
        if opted_out(request.headers):
            prom.REGISTRY.record("memescale_serve_telemetry_events", len(batch.events), outcome="opted_out")
            return {"stored": 0, "reason": "opted out (DNT or Sec-GPC header)"}
        if not self.telemetry.enabled:
            prom.REGISTRY.record("memescale_serve_telemetry_events", len(batch.events), outcome="disabled")
            return {"stored": 0, "reason": "telemetry is disabled on this server"}
        lines = self.telemetry.lines(batch)
        n = await asyncio.to_thread(self.telemetry.append, lines)
        prom.REGISTRY.record("memescale_serve_telemetry_events", n, outcome="stored")
        return {"stored": n}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(prom.REGISTRY.render(), media_type="text/plain; version=0.0.4")


# -- building and starting ---------------------------------------------------------------------


def _resolve(path: str) -> Path:
    """A path as given if it exists (relative to the working directory), else relative to the
    project root (so `config=configs/tiny.toml` works from any directory)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = ROOT / p
    return alt.resolve() if alt.exists() else p.resolve()


def _gpus_per_encoder(requested: float, replicas: int = 1) -> float:
    """GPUs per encoder replica: `requested`, checked against the cluster (`MissingGPUs` when it
    has too few: Serve would wait for them forever); below 0: one if the cluster has a GPU."""
    if requested > 0:
        import ray

        if ray.is_initialized():
            require_gpus(requested, replicas, "serve's encoder", "serve.encoder_gpus")
    if requested >= 0:
        return requested
    try:
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    except Exception:
        return 0.0


def admission_limits(ongoing: int, queued: int) -> tuple[int, int]:
    """The Api's Serve max_ongoing_requests and max_queued_requests from the config's (0: eight
    times the CPU count, and a queue as long; -1: no queue limit)."""
    ongoing = ongoing if ongoing > 0 else 8 * len(os.sched_getaffinity(0))
    return ongoing, queued if queued != 0 else ongoing


def app_for(cfg: Config, index_dir: str | os.PathLike):
    """The bound application over `index_dir` with deployment options from `cfg.serve`."""
    index_dir = _resolve(str(index_dir))
    if not (index_dir / "records.bin").exists():
        raise FileNotFoundError(f"{index_dir} is not an index directory (no records.bin)")
    s = cfg.serve
    telemetry_path = str(Path(s.telemetry_path).expanduser().resolve())
    quiet = {"log_level": s.log_level, "enable_access_log": False}
    encoder = Encoder.options(  # type: ignore[attr-defined]
        num_replicas=s.encoder_replicas, max_ongoing_requests=s.max_ongoing_requests, logging_config=quiet,
        ray_actor_options={"num_cpus": s.encoder_cpus, "num_gpus": _gpus_per_encoder(s.encoder_gpus, s.encoder_replicas)},
    ).bind(cfg)
    searcher = Searcher.options(  # type: ignore[attr-defined]
        num_replicas=s.searcher_replicas, max_ongoing_requests=s.max_ongoing_requests, logging_config=quiet,
        ray_actor_options={"num_cpus": s.searcher_cpus},
    ).bind(str(index_dir), cfg)
    ongoing, queued = admission_limits(s.api_max_ongoing_requests, s.max_queued_requests)
    return Api.options(  # type: ignore[attr-defined]
        num_replicas=s.api_replicas, max_ongoing_requests=ongoing, max_queued_requests=queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        logging_config={"log_level": s.log_level, "enable_access_log": s.access_log},
        ray_actor_options={"num_cpus": s.api_cpus},
    ).bind(encoder, searcher, cfg, telemetry_path)


def build_app(args: dict[str, str]):
    """Ray Serve application builder: ``index=DIR`` (required), ``config=FILE`` (TOML; default:
    the built-in defaults) and any ``section.key=value`` config overrides."""
    args = dict(args)
    index = args.pop("index", None)
    if not index:
        raise ValueError("build_app needs index=DIR (an index directory)")
    config = args.pop("config", "")
    overrides = [f"{k}={v}" for k, v in args.items()]
    cfg = load_config(_resolve(config) if config else None, overrides)
    return app_for(cfg, index)


def wait_ready(base_url: str, timeout_s: float = 180.0) -> None:
    """Poll GET /api/health until it answers 200 (TimeoutError after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/api/health", timeout=10) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s: {last}")


def start(index_dir: str | os.PathLike, config_path: str | os.PathLike | None = "configs/tiny.toml",
          host: str = "127.0.0.1", port: int = 8000, overrides: list[str] | tuple[str, ...] = (),
          timeout_s: float = 180.0) -> str:
    """Start (or attach to) Ray, run the app over `index_dir` on host:port and return its
    base URL once it answers. Ray comes from `init_ray(cfg.ray)` unless already initialised."""
    from memescale.ray_runtime import init_ray

    cfg = load_config(_resolve(str(config_path)) if config_path else None, list(overrides))
    init_ray(cfg.ray)
    app = app_for(cfg, index_dir)  # MissingGPUs before anything starts
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name=APP_NAME, route_prefix="/")
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_ready(base_url, timeout_s)
    return base_url


def stop() -> None:
    """Shut Serve down (Ray itself stays up)."""
    serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve an index over HTTP (the API and the page).")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from memescale.ray_runtime import MissingGPUs

    try:
        url = start(a.index, a.config, a.host, a.port, a.set)
    except MissingGPUs as e:
        sys.exit(f"error: {e}")
    print(f"serving {a.index} at {url} (Ctrl-C or SIGTERM to stop)", flush=True)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
        import ray

        ray.shutdown()


if __name__ == "__main__":
    # Run through the package module, so the deployments are `serve.app.*`, not `__main__.*`.
    from serve.app import main as _main

    _main()
