"""The HTTP API's request and response models (pydantic) and the checks that turn a
client's query input into something the engine takes.

    req = SearchRequest.model_validate(json_body)          # types, ranges, exactly one input
    q = embedding_vector(req.embedding, dim)                # (dim,) float32, L2-normalised
    raw = decode_base64_image(req.image, max_bytes)         # the image file's bytes

Every check that fails raises `SearchInputError`, whose `status` is the HTTP status to
answer with (422 unless said otherwise).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memescale.index.weighting import WEIGHT_MAX, WEIGHT_MIN

INPUT_FIELDS = ("text", "image", "image_url", "embedding", "like")
MAX_K = 1000
MAX_EMBEDDING = 8192
MAX_SUBREDDITS = 50
MAX_TERMS = 8
TERM_WEIGHT_MAX = 10.0


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
    `subreddits`: keep only these (case-insensitive, without the r/ prefix);
    `exclude_subreddits`: drop these; `min_score`: the post's score at least this."""

    model_config = ConfigDict(extra="forbid", strict=True)
    nsfw: bool = False
    after: TimeBound | None = Field(default=None, union_mode="left_to_right")
    before: TimeBound | None = Field(default=None, union_mode="left_to_right")
    subreddits: list[str] | None = Field(default=None, max_length=MAX_SUBREDDITS)
    exclude_subreddits: list[str] | None = Field(default=None, max_length=MAX_SUBREDDITS)
    min_score: int | None = Field(default=None, description="the post's Reddit score at least this")


class QueryInput(BaseModel):
    """The query inputs: `text`, `image` (base64 bytes of an image file), `image_url` (fetched
    by the server through the same SSRF guard as ingest), `embedding` (a vector of the model's
    width) and `like` (a result's `image_id`: that image's stored vector; stable across index
    updates and rebuilds)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = Field(default=None, max_length=4096)
    image: str | None = Field(default=None, description="base64 (standard or URL-safe) of an image file")
    image_url: str | None = Field(default=None, max_length=2048)
    embedding: list[float] | None = Field(default=None, max_length=MAX_EMBEDDING)
    like: str | None = Field(default=None, pattern=r"^[0-9]{1,19}$",
                             description="a result's image_id (decimal string): more images like it")

    def _check_one(self, fields: tuple[str, ...]) -> None:
        given = [f for f in fields if getattr(self, f) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"give exactly one of {', '.join(fields)} (got {what})")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")

    @property
    def input_kind(self) -> str:
        return next(f for f in (*INPUT_FIELDS, "terms") if getattr(self, f, None) is not None)


class Term(QueryInput):
    """One term of a multi-term query: exactly one input and its weight (negative: away from it)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": [f]} for f in INPUT_FIELDS]})
    weight: float = Field(default=1.0, ge=-TERM_WEIGHT_MAX, le=TERM_WEIGHT_MAX, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_input(self) -> Term:
        self._check_one(INPUT_FIELDS)
        if self.weight == 0:
            raise ValueError("a term's weight must not be 0")
        return self


class SearchRequest(QueryInput):
    """POST /api/search. Exactly one of the inputs (`QueryInput`) or `terms`, a list of
    weighted inputs whose query vector is the weighted sum of theirs, normalised."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": [f]} for f in (*INPUT_FIELDS, "terms")]})  # exactly one input, in the published schema
    terms: list[Term] | None = Field(default=None, min_length=1, max_length=MAX_TERMS,
                                     description="weighted inputs: the query is their weighted sum")
    k: int = Field(default=24, ge=1, le=MAX_K, description="results per page (omitted: the server's default_k)")
    weights: Weights = Field(default_factory=Weights)
    filters: Filters = Field(default_factory=Filters)
    dedup: bool = Field(default=True, description="drop results within the dedup threshold of a better one")
    cursor: str | None = Field(default=None, max_length=256, description="next_cursor of the previous page")

    @model_validator(mode="after")
    def _exactly_one_input(self) -> SearchRequest:
        self._check_one((*INPUT_FIELDS, "terms"))
        return self


class SearchResult(BaseModel):
    id: int = Field(description="the item's position in this index generation (changes with updates)")
    image_id: str | None = Field(description="the ingest's stable image id (decimal; use it as `like`)")
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
    plan: str = Field(default="graph", description="graph (no filter), graph-filtered (filters inside the "
                      "traversal) or scan (a selective subreddit filter's members scored directly)")
    filter_share: float = Field(default=1.0, description="estimated share of the index the filters match")
    candidates: int = Field(description="candidates the index returned and the filters examined")
    dropped_filter: int
    dropped_dedup: int
    L: int
    passes: int
    encode_ms: float = Field(0.0, description="Api: validation and query vector (the encoder round trip)")
    search_ms: float = Field(0.0, description="Searcher: index search passes")
    metadata_ms: float = Field(0.0, description="Searcher: records' metadata and vectors for filters, dedup, results")
    total_ms: float = Field(0.0, description="Api: the whole request handler")
    corrupt_records: int = Field(0, description="damaged index records met and skipped (failed their "
                                 "checksum): never returned, logged with their node ids")


class SearchResponse(BaseModel):
    results: list[SearchResult]
    stats: SearchStats
    offset: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at the end")


# -- input checks --------------------------------------------------------------------------


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
