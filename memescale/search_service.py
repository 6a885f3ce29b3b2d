"""The search logic behind the HTTP API, free of Ray: request models, query vectors, filters,
dedup and cursors. `serve/app.py` wires it into Ray Serve deployments.

    req = SearchRequest.model_validate(json_body)          # pydantic: types and ranges
    offset = decode_cursor(req.cursor, query_hash(req))     # page position (0 without a cursor)
    q = embedding_vector(req.embedding, dim)                # or the encoder's output
    engine = SearchEngine(index, weighting, serve_cfg)      # once per index replica
    page = engine.search(q, req.weights.as_dict(), parse_filters(req.filters), req.dedup,
                         offset, req.k)

Ranking: the index ranks by the inner product of the weight-extended vectors (see
`memescale.weighting`); `similarity` in a result is the plain cosine of the base parts.
Filters (NSFW, time range, subreddits) post-filter the index's candidates: a first pass asks
for a few more than the page needs; when too few survive it searches again with
``L * filter_L_multiplier`` and takes every candidate (`stats.deepened`). Dedup drops a result
whose base vector is within `dedup_threshold` (cosine) of a better-ranked kept result.
A page is the slice [offset, offset + k) of the ranked, filtered, deduplicated list; the
cursor carries the offset and a hash of the query, so it cannot be replayed on another query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import struct
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memescale.config import ServeConfig
from memescale.weighting import WEIGHT_MAX, WEIGHT_MIN, Weighting

INPUT_FIELDS = ("text", "image", "image_url", "embedding", "like")
MAX_K = 1000
MAX_EMBEDDING = 8192
MAX_SUBREDDITS = 50
REDDIT = "https://www.reddit.com"
FIRST_PASS_SLACK = 1.25  # first pass of a filtered/deduplicated search: need x this (+ 8)


class SearchInputError(ValueError):
    """A request the server understood but cannot serve (HTTP 422 with this message)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# -- request and response models ---------------------------------------------------------

_Weight = Field(default=0.0, ge=WEIGHT_MIN, le=WEIGHT_MAX, allow_inf_nan=False)


class Weights(BaseModel):
    """How much each signal steers the search, -2..2 (0: ignore it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    meme: float = _Weight
    aesthetic: float = _Weight
    useful: float = _Weight
    recency: float = _Weight

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.model_dump().items()}


TimeBound = int | str


class Filters(BaseModel):
    """Hard filters. `nsfw`: include NSFW results (default: excluded). `after` (inclusive)
    and `before` (exclusive): unix seconds or an ISO 8601 date / date-time (UTC if no zone).
    `subreddits`: keep only these (case-insensitive, without the r/ prefix)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    nsfw: bool = False
    after: TimeBound | None = Field(default=None, union_mode="left_to_right")
    before: TimeBound | None = Field(default=None, union_mode="left_to_right")
    subreddits: list[str] | None = Field(default=None, max_length=MAX_SUBREDDITS)


class SearchRequest(BaseModel):
    """POST /api/search. Exactly one of `text`, `image` (base64 bytes of an image file),
    `image_url` (fetched by the server through the same SSRF guard as ingest), `embedding`
    (a vector of the model's width) and `like` (a result's `id`: search by that image's
    stored vector) is the query."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": [f]} for f in INPUT_FIELDS]})  # exactly one input, in the published schema
    text: str | None = Field(default=None, max_length=4096)
    image: str | None = Field(default=None, description="base64 (standard or URL-safe) of an image file")
    image_url: str | None = Field(default=None, max_length=2048)
    embedding: list[float] | None = Field(default=None, max_length=MAX_EMBEDDING)
    like: int | None = Field(default=None, ge=0, description="a result's id: more images like it")
    k: int = Field(default=24, ge=1, le=MAX_K, description="results per page (omitted: the server's default_k)")
    weights: Weights = Field(default_factory=Weights)
    filters: Filters = Field(default_factory=Filters)
    dedup: bool = Field(default=True, description="drop results within the dedup threshold of a better one")
    cursor: str | None = Field(default=None, max_length=256, description="next_cursor of the previous page")

    @model_validator(mode="after")
    def _exactly_one_input(self) -> SearchRequest:
        given = [f for f in INPUT_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"give exactly one of {', '.join(INPUT_FIELDS)} (got {what})")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        return self

    @property
    def input_kind(self) -> str:
        return next(f for f in INPUT_FIELDS if getattr(self, f) is not None)


class SearchResult(BaseModel):
    id: int = Field(description="the item's position in this index (use it as `like`)")
    image_id: str | None = Field(description="the ingest's stable image id (decimal), when recorded")
    url: str
    title: str
    subreddit: str
    permalink: str
    created_utc: int | None
    width: int | None
    height: int | None
    score: int | None = Field(description="the post's Reddit score")
    nsfw: bool
    similarity: float = Field(description="cosine of the query and the image, weights aside")


class SearchStats(BaseModel):
    reads: int = Field(description="sector reads of the index")
    pq_comparisons: int
    ms: float = Field(description="index search time")
    filtered: bool = Field(description="hard filters post-filtered the candidates")
    deepened: bool = Field(description="a second, deeper search (L x filter_L_multiplier) ran")
    candidates: int = Field(description="candidates the index returned and the filters examined")
    dropped_filter: int
    dropped_dedup: int
    L: int
    passes: int
    encode_ms: float = Field(0.0, description="Api: validation and query vector (the encoder round trip)")
    search_ms: float = Field(0.0, description="Searcher: index search passes")
    metadata_ms: float = Field(0.0, description="Searcher: records' metadata and vectors for filters, dedup, results")
    total_ms: float = Field(0.0, description="Api: the whole request handler")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    stats: SearchStats
    offset: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at the end")


# -- parsing helpers -----------------------------------------------------------------------

_SUBREDDIT = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _parse_time(value: TimeBound | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text)
            return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp())
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SearchInputError(f"filters.{name}: {value!r} is neither unix seconds nor an ISO 8601 date") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


@dataclass(frozen=True)
class FilterSpec:
    """Normalised hard filters; `active` when any of them can drop a result."""

    nsfw: bool = False
    after: int | None = None
    before: int | None = None
    subreddits: frozenset[str] | None = None

    @property
    def active(self) -> bool:
        return not self.nsfw or self.after is not None or self.before is not None or self.subreddits is not None

    def keep(self, meta: Mapping[str, Any]) -> bool:
        if not self.nsfw and (_truthy(meta.get("over_18")) or _truthy(meta.get("nsfw"))):
            return False
        if self.after is not None or self.before is not None:
            t = _as_int(meta.get("created_utc"))
            if t is None or (self.after is not None and t < self.after) or (
                    self.before is not None and t >= self.before):
                return False
        if self.subreddits is not None and str(meta.get("subreddit", "")).lower() not in self.subreddits:
            return False
        return True


def parse_filters(f: Filters) -> FilterSpec:
    """Filters -> FilterSpec. SearchInputError for bad dates, names or an empty time range."""
    after, before = _parse_time(f.after, "after"), _parse_time(f.before, "before")
    if after is not None and before is not None and after >= before:
        raise SearchInputError("filters.after must be earlier than filters.before")
    subs = None
    if f.subreddits is not None:
        names = [s.strip().removeprefix("r/").removeprefix("/r/") for s in f.subreddits]
        bad = [s for s in names if not _SUBREDDIT.match(s)]
        if bad:
            raise SearchInputError(f"filters.subreddits: not a subreddit name: {bad[0][:80]!r}")
        subs = frozenset(s.lower() for s in names) or None
    return FilterSpec(f.nsfw, after, before, subs)


def _truthy(v: Any) -> bool:
    return v is True or v == 1 or (isinstance(v, str) and v.lower() in ("true", "1", "yes"))


def _as_int(v: Any) -> int | None:
    """An int from an int, a numeric string or a float (exact for 64-bit ints); else None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    """The bytes of a base64 (standard or URL-safe, padding optional, data: URL allowed) image."""
    s = data.strip()
    if s.startswith("data:"):
        s = s.split(",", 1)[1] if "," in s else ""
    s = re.sub(r"\s+", "", s)
    if len(s) * 3 // 4 > max_bytes:
        raise SearchInputError(f"image is larger than {max_bytes} bytes", status=413)
    s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise SearchInputError("image is not valid base64") from None
    if not raw:
        raise SearchInputError("image is empty")
    return raw


def embedding_vector(values: Sequence[float], dim: int) -> np.ndarray:
    """A client's query embedding -> (dim,) float32, L2-normalised. SearchInputError if the
    length is not `dim`, a value is not finite, or the vector is zero."""
    v = np.asarray(values, np.float64)
    if v.shape != (dim,):
        raise SearchInputError(f"embedding has {v.size} values; this index's model produces {dim}")
    if not np.all(np.isfinite(v)):
        raise SearchInputError("embedding contains a non-finite value")
    n = float(np.linalg.norm(v))
    if n == 0.0 or not math.isfinite(n):
        raise SearchInputError("embedding is a zero vector")
    return (v / n).astype(np.float32)


def token_count(tokenizer: Any, text: str) -> int | None:
    """Tokens `text` takes in the model's context, start/end tokens included; None if unknown."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return len(tokenizer.encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        clean = getattr(tokenizer, "clean_fn", lambda t: t)
        return len(hf(clean(text), truncation=False)["input_ids"])
    return None


# -- cursors -------------------------------------------------------------------------------

_CURSOR = struct.Struct("<BI12s")
_CURSOR_VERSION = 1


def query_hash(req: SearchRequest) -> bytes:
    """12 bytes identifying everything that orders the result list (not k, not the cursor)."""
    value: Any
    if req.embedding is not None:
        value = hashlib.sha256(np.asarray(req.embedding, np.float64).tobytes()).hexdigest()
    elif req.image is not None:
        value = hashlib.sha256(req.image.encode()).hexdigest()
    else:
        value = next(getattr(req, f) for f in ("text", "image_url", "like") if getattr(req, f) is not None)
    body = {"input": req.input_kind, "value": value, "weights": req.weights.model_dump(),
            "filters": req.filters.model_dump(), "dedup": req.dedup}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()[:12]


def encode_cursor(offset: int, qhash: bytes) -> str:
    return base64.urlsafe_b64encode(_CURSOR.pack(_CURSOR_VERSION, offset, qhash)).decode().rstrip("=")


def decode_cursor(cursor: str | None, qhash: bytes) -> int:
    """The offset a cursor points at (0 for None). SearchInputError if it is malformed or was
    issued for a different query."""
    if cursor is None:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, offset, h = _CURSOR.unpack(raw)
    except (binascii.Error, ValueError, struct.error):
        raise SearchInputError("cursor is malformed") from None
    if version != _CURSOR_VERSION:
        raise SearchInputError("cursor is malformed")
    if h != qhash:
        raise SearchInputError("cursor belongs to a different query (text, weights, filters or dedup changed)")
    return offset


# -- the engine ----------------------------------------------------------------------------


class IndexLike(Protocol):
    """What the engine needs of `memescale.index.Index`."""

    dim: int

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, L: int, beam_width: int = 4,
               io_budget: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]: ...

    def metadata(self, ids: np.ndarray) -> list[dict]: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...


def result_fields(i: int, meta: Mapping[str, Any], similarity: float) -> dict[str, Any]:
    """One response result from an index record's metadata."""
    permalink = str(meta.get("permalink") or "")
    if permalink.startswith("/"):
        permalink = REDDIT + permalink
    return {
        "id": int(i),
        "image_id": None if _as_int(meta.get("image_id")) is None else str(_as_int(meta.get("image_id"))),
        "url": str(meta.get("url") or meta.get("final_url") or ""),
        "title": str(meta.get("title") or ""),
        "subreddit": str(meta.get("subreddit") or ""),
        "permalink": permalink,
        "created_utc": _as_int(meta.get("created_utc")),
        "width": _as_int(meta.get("width")),
        "height": _as_int(meta.get("height")),
        "score": _as_int(meta.get("score")),
        "nsfw": (_truthy(meta.get("over_18")) or _truthy(meta.get("nsfw"))),
        "similarity": round(float(similarity), 6),
    }


def dedup_order(vectors: np.ndarray, threshold: float, limit: int) -> tuple[np.ndarray, int]:
    """Greedy near-duplicate removal in rank order.

    vectors: (n, d) float32 unit rows, best first. Keeps row i unless its cosine with a kept
    row is >= threshold; stops once `limit` rows are kept. Returns (kept row indices int64,
    rows examined). O(examined x kept x d).
    """
    n = vectors.shape[0]
    kept: list[int] = []
    kept_mat = np.empty((min(n, limit), vectors.shape[1]), np.float32)
    i = 0
    while i < n and len(kept) < limit:
        if kept and float(np.max(kept_mat[: len(kept)] @ vectors[i])) >= threshold:
            i += 1
            continue
        kept_mat[len(kept)] = vectors[i]
        kept.append(i)
        i += 1
    return np.asarray(kept, np.int64), i


class SearchEngine:
    """Runs searches against one opened index. Thread-safe if the index is (a shared Index's
    search is called concurrently from the Searcher's threads)."""

    def __init__(self, index: IndexLike, weighting: Weighting, cfg: ServeConfig):
        if weighting.dim != index.dim:
            raise ValueError(f"index vectors have {index.dim} dims, its weighting says {weighting.dim}")
        self.index = index
        self.weighting = weighting
        self.cfg = cfg
        self.size = len(index)

    def _run(self, q: np.ndarray, k: int, L: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        k = max(1, min(k, self.size))
        L = max(L, k)
        budget = self.cfg.io_budget or None
        ids, scores, st = self.index.search(q, k, L, beam_width=self.cfg.beam_width, io_budget=budget)
        ids, scores = np.asarray(ids[0], np.int64), np.asarray(scores[0], np.float32)
        ok = ids >= 0
        stats = {}
        for key in ("reads", "pq_comparisons", "ms"):
            try:
                stats[key] = float(np.asarray(st[key]).reshape(-1)[0])
            except (KeyError, AttributeError, IndexError):
                pass
        return ids[ok], scores[ok], stats

    def _base_vectors(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros((0, self.weighting.base_dim), np.float32)
        v = np.asarray(self.index.vectors(ids), np.float32)[:, : self.weighting.base_dim]
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.maximum(n, 1e-12)

    def search(self, query: np.ndarray, weights: Mapping[str, float] | None, filters: FilterSpec,
               dedup: bool, offset: int, k: int) -> dict[str, Any]:
        """One page: results [offset, offset + k) of the ranked list, plus stats.

        query: (base_dim,) float32, L2-normalised. Returns {"results": [...], "stats": {...},
        "more": bool}. Raises WeightError for weights the index cannot honour.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        q = self.weighting.extend_queries(np.asarray(query, np.float32)[None, :], weights, cfg.extra_dim_scale)
        need = min(offset + k, cfg.max_depth) + 1  # one more: is there a next page?
        base_L = max(cfg.search_L, 1)
        post = filters.active or dedup
        k1 = math.ceil(need * FIRST_PASS_SLACK) + 8 if post else need
        totals = {"reads": 0.0, "pq_comparisons": 0.0, "ms": 0.0}
        passes, deepened = 0, False
        meta_ms = 0.0
        L = max(base_L, k1)
        while True:
            ids, scores, st = self._run(q, k1, L)
            passes += 1
            for key in totals:
                totals[key] += st.get(key, 0.0)
            exhausted = ids.size < min(k1, self.size)
            tm = time.perf_counter()
            metas: list[dict] | None = None
            keep = np.ones(ids.size, bool)
            if filters.active and ids.size:
                metas = self.index.metadata(ids)
                keep = np.fromiter((filters.keep(m) for m in metas), bool, ids.size)
            cand = np.flatnonzero(keep)
            vecs = None
            if dedup and cand.size:
                vecs = self._base_vectors(ids[cand])
                order, examined = dedup_order(vecs, cfg.dedup_threshold, need)
            else:
                order = np.arange(min(cand.size, need))
                examined = order.size
            meta_ms += (time.perf_counter() - tm) * 1000
            if order.size >= need or exhausted or not post or deepened or ids.size >= self.size:
                break
            # Too few survived the filters/dedup: search again, deeper, and take everything.
            deepened = True
            L = max(L, base_L) * max(cfg.filter_L_multiplier, 1)
            k1 = L
        tm = time.perf_counter()
        page_rows = order[offset: offset + k]
        rows = cand[page_rows]
        page_ids = ids[rows]
        page_vecs = vecs[page_rows] if vecs is not None else self._base_vectors(page_ids)
        sims = page_vecs @ np.asarray(query, np.float32)
        if metas is None:
            page_meta = self.index.metadata(page_ids) if page_ids.size else []
        else:
            page_meta = [metas[r] for r in rows]
        results = [result_fields(int(i), m, s) for i, m, s in zip(page_ids, page_meta, sims)]
        meta_ms += (time.perf_counter() - tm) * 1000
        stats = {
            "reads": int(totals["reads"]), "pq_comparisons": int(totals["pq_comparisons"]),
            "ms": round(totals["ms"], 3), "filtered": filters.active, "deepened": deepened,
            "candidates": int(ids.size), "dropped_filter": int(ids.size - cand.size),
            "dropped_dedup": int(examined - order.size), "L": int(L), "passes": passes,
            "search_ms": round((time.perf_counter() - t0) * 1000 - meta_ms, 3),
            "metadata_ms": round(meta_ms, 3),
        }
        more = order.size > offset + k and offset + k < cfg.max_depth
        return {"results": results, "stats": stats, "more": bool(more)}

    def vector_of(self, item: int) -> np.ndarray:
        """The base vector of indexed item `item` (a result's `id`): (base_dim,) float32."""
        if not (0 <= item < self.size):
            raise SearchInputError(f"like: no item {item} in this index (0..{self.size - 1})")
        return self._base_vectors(np.asarray([item], np.int64))[0]
