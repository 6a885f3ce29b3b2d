"""Page cursors: an offset into a query's ranked result list, bound to that query.

    qhash = query_hash(req)                  # 12 bytes: input, weights, filters, dedup
    offset = decode_cursor(req.cursor, qhash)   # 0 without a cursor
    next_cursor = encode_cursor(offset + k, qhash)

A cursor is the URL-safe base64 (unpadded) of version (u8), offset (u32) and the query hash;
decoding one issued for another query, or a malformed one, raises `SearchInputError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from typing import Any

import numpy as np

from memescale.search.requests import QueryInput, SearchInputError, SearchRequest

_CURSOR = struct.Struct("<BI12s")
_CURSOR_VERSION = 1


def _input_value(q: QueryInput) -> str:
    """A short string standing for one query input's value."""
    if q.embedding is not None:
        return hashlib.sha256(np.asarray(q.embedding, np.float64).tobytes()).hexdigest()
    if q.image is not None:
        return hashlib.sha256(q.image.encode()).hexdigest()
    return next(getattr(q, f) for f in ("text", "image_url", "like") if getattr(q, f) is not None)


def query_hash(req: SearchRequest) -> bytes:
    """12 bytes identifying everything that orders the result list (not k, not the cursor)."""
    value: Any
    if req.terms is not None:
        value = [[t.input_kind, _input_value(t), t.weight] for t in req.terms]
    else:
        value = _input_value(req)
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
