"""The search logic behind the HTTP API, free of Ray: filters, dedup and paging over one
opened index. Request models and input checks are in `requests`, cursors in `cursor`;
`serve/app.py` wires them into Ray Serve deployments.

    req = SearchRequest.model_validate(json_body)          # pydantic: types and ranges
    offset = decode_cursor(req.cursor, query_hash(req))     # page position (0 without a cursor)
    q = embedding_vector(req.embedding, dim)                # or the encoder's output
    engine = SearchEngine(index, weighting, serve_cfg)      # once per index replica
    page = engine.search(q, req.weights.as_dict(), parse_filters(req.filters), req.dedup,
                         offset, req.k)

Ranking: the index ranks by the inner product of the weight-extended vectors (see
`memescale.index.weighting`); `similarity` in a result is the plain cosine of the base parts.
Filters (NSFW, time range, subreddits, score) are planned per query from the index's labels
(`memescale.index.labels`): inside the graph traversal for broad filters, a scan of the
matching nodes for selective ones (`SearchEngine._plan`; `stats.plan`); the exact values are
checked on the candidates. A first pass asks for a few more than the page needs; when too
few survive it searches again with ``L * filter_L_multiplier`` and takes every candidate
(`stats.deepened`). Dedup drops a result
whose base vector is within `dedup_threshold` (cosine) of a better-ranked kept result.
A page is the slice [offset, offset + k) of the ranked, filtered, deduplicated list; the
cursor carries the offset and a hash of the query, so it cannot be replayed on another query.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple, Protocol

import numpy as np

from memescale.config import ServeConfig
from memescale.index.labels import MONTH_ANY, NO_FILTER, as_int, is_nsfw
from memescale.index.weighting import Weighting
from memescale.search.requests import Filters, SearchInputError, TimeBound

REDDIT = "https://www.reddit.com"
# A member scan may score this many times the PQ codes a filtered traversal would: one of its
# expansions (a read, R PQ scores, an exact score) costs about 2 to 3 R member scores
# (bench/filters.py's forced plans at 1M: 2.1 at a 4% month range, 3.2 at a 10% subreddit)
SCAN_OVER_TRAVERSAL = 3.0
# A filtered traversal's list: L / share ** FILTER_L_EXPONENT (bench/filters.py at 1M: with
# filter_mismatch, exponent 1 spends 2.5x the reads of 0.6 at a 10% filter for +0.02 recall@10)
FILTER_L_EXPONENT = 0.6
FILTER_STARTS = 64  # a filtered traversal also enters the graph at up to this many matching nodes
MATCHING_FIRST = 16.0  # a mismatch penalty beyond any score gap of unit vectors: matching candidates first
FIRST_PASS_SLACK = 1.25  # first pass of a filtered/deduplicated search: need x this (+ 8)


# -- filters -------------------------------------------------------------------------------

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
            return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SearchInputError(f"filters.{name}: {value!r} is neither unix seconds nor an ISO 8601 date") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


@dataclass(frozen=True)
class FilterSpec:
    """Normalised hard filters; `active` when any of them can drop a result."""

    nsfw: bool = False
    after: int | None = None
    before: int | None = None
    subreddits: frozenset[str] | None = None
    exclude_subreddits: frozenset[str] | None = None
    min_score: int | None = None

    @property
    def active(self) -> bool:
        return (not self.nsfw or self.after is not None or self.before is not None or self.subreddits is not None
                or self.exclude_subreddits is not None or self.min_score is not None)

    def keep(self, meta: Mapping[str, Any]) -> bool:
        if not self.nsfw and is_nsfw(meta):
            return False
        if self.after is not None or self.before is not None:
            t = as_int(meta.get("created_utc"))
            if t is None or (self.after is not None and t < self.after) or (
                    self.before is not None and t >= self.before):
                return False
        sub = str(meta.get("subreddit", "")).lower()
        if self.subreddits is not None and sub not in self.subreddits:
            return False
        if self.exclude_subreddits is not None and sub in self.exclude_subreddits:
            return False
        if self.min_score is not None:
            score = as_int(meta.get("score"))
            if score is None or score < self.min_score:
                return False
        return True


def parse_filters(f: Filters) -> FilterSpec:
    """Filters -> FilterSpec. SearchInputError for bad dates, names or an empty time range."""
    after, before = _parse_time(f.after, "after"), _parse_time(f.before, "before")
    if after is not None and before is not None and after >= before:
        raise SearchInputError("filters.after must be earlier than filters.before")
    return FilterSpec(f.nsfw, after, before, _names(f.subreddits, "subreddits"),
                      _names(f.exclude_subreddits, "exclude_subreddits"), f.min_score)


def _names(given: list[str] | None, field: str) -> frozenset[str] | None:
    if given is None:
        return None
    names = [s.strip().removeprefix("/r/").removeprefix("r/") for s in given]
    bad = [s for s in names if not _SUBREDDIT.match(s)]
    if bad:
        raise SearchInputError(f"filters.{field}: not a subreddit name: {bad[0][:80]!r}")
    return frozenset(s.lower() for s in names) or None


# -- the engine ----------------------------------------------------------------------------


class Plan(NamedTuple):
    """How one search runs (`SearchEngine._plan`)."""

    name: str  # "graph", "graph-filtered" or "scan"
    flt: Any  # the index's `LabelFilter`
    members: np.ndarray | None  # scan: the node ids to score
    starts: np.ndarray | None  # graph-filtered: extra entry points among the matching nodes
    share: float  # estimated share of the nodes the filter matches
    member_flt: Any = None  # scan: what of `flt` the members still need checked (None: all of it)


NO_PLAN = Plan("graph", NO_FILTER, None, None, 1.0)


def _unsettled(flt: Any, posting: str) -> Any:
    """The part of label filter `flt` that the members of the posting it was planned on
    ("sub": the included subreddits, "month": the months in its range, "score": the buckets
    from its lowest) do not settle by being in it; inactive when nothing is left to check."""
    if posting == "sub" and flt.sub_mode == 1:
        flt = flt._replace(sub_mode=0, sub_ids=flt.sub_ids[:0])
    elif posting == "month" and flt.month_lo >= 0:  # a range from an unknown month (-1) on is no posting's
        flt = flt._replace(month_lo=MONTH_ANY[0], month_hi=MONTH_ANY[1])
    elif posting == "score":
        flt = flt._replace(min_bucket=0)
    active = (not flt.allow_nsfw or flt.sub_mode != 0 or flt.min_bucket > 0
              or (flt.month_lo, flt.month_hi) != MONTH_ANY)
    return flt._replace(active=active)


def _union(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, exact scores) of two searches' results together, each id once, best first."""
    ids = np.concatenate([a[0], b[0]])
    scores = np.concatenate([a[1], b[1]])
    order = np.argsort(-scores, kind="stable")
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)
    keep = np.sort(first)
    return ids[keep], scores[keep]


def _spread(lists: list[np.ndarray], m: int) -> np.ndarray:
    """Up to m node ids (int64) evenly spaced over the concatenation of `lists` (posting lists,
    memory-mapped: only the m chosen entries are read, nothing is concatenated)."""
    sizes = np.array([a.shape[0] for a in lists], np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    at = np.unique(np.linspace(0, total - 1, min(m, total)).astype(np.int64))
    ends = np.cumsum(sizes)
    which = np.searchsorted(ends, at, side="right")
    offs = at - (ends - sizes)[which]
    return np.array([lists[w][o] for w, o in zip(which.tolist(), offs.tolist())], np.int64)


class IndexLike(Protocol):
    """What the engine needs of `memescale.index.Index`."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    # the third item: per-query stats indexable by name (`SearchStats`, or a dict of arrays)
    def search(self, queries: np.ndarray, k: int, L: int, beam_width: int = 4,
               io_budget: int | None = None) -> tuple[np.ndarray, np.ndarray, Any]: ...

    def metadata(self, ids: np.ndarray) -> list[dict]: ...

    def nodes_of(self, image_ids: np.ndarray) -> np.ndarray: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...


def result_fields(i: int, meta: Mapping[str, Any], similarity: float) -> dict[str, Any]:
    """One response result from an index record's metadata."""
    permalink = str(meta.get("permalink") or "")
    if permalink.startswith("/"):
        permalink = REDDIT + permalink
    return {
        "id": int(i),
        "image_id": None if as_int(meta.get("image_id")) is None else str(as_int(meta.get("image_id"))),
        "url": str(meta.get("url") or meta.get("final_url") or ""),
        "title": str(meta.get("title") or ""),
        "subreddit": str(meta.get("subreddit") or ""),
        "permalink": permalink,
        "created_utc": as_int(meta.get("created_utc")),
        "width": as_int(meta.get("width")),
        "height": as_int(meta.get("height")),
        "score": as_int(meta.get("score")),
        "nsfw": is_nsfw(meta),
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
    search is called concurrently from the Searcher's threads). An index that changes while
    it serves (`memescale.index.live.LiveIndex`) is read through one `snapshot()` per call,
    so the node ids of a search and the records read for them belong to the same state."""

    def __init__(self, index: IndexLike, weighting: Weighting, cfg: ServeConfig):
        if weighting.dim != index.dim:
            raise ValueError(f"index vectors have {index.dim} dims, its weighting says {weighting.dim}")
        self.index = index
        self.weighting = weighting
        self.cfg = cfg

    def _view(self) -> contextlib.AbstractContextManager:
        snap = getattr(self.index, "snapshot", None)
        return snap() if snap is not None else contextlib.nullcontext(self.index)

    @staticmethod
    def _size(ix: IndexLike) -> int:
        """Searchable items (an updated index's count changes while it serves)."""
        live = getattr(ix, "live_count", None)
        return int(live) if live is not None else len(ix)

    def _plan(self, ix: IndexLike, filters: FilterSpec, L: int) -> Plan:
        """How to run a filtered search. Plans:

        - "graph": no filter, or an index without labels (post-filter only);
        - "graph-filtered": the filter inside the traversal, list size L / share **
          FILTER_L_EXPONENT up to filter_L_max, non-matching candidates ranked
          `filter_mismatch` lower, entered also at up to FILTER_STARTS matching nodes spread
          over the smallest candidate set; when it comes up short, a second pass expands
          matching candidates first, so a filter whose nodes sit far from the query's
          neighbourhood is still reached, and the two are merged (`search`);
        - "scan": the smallest of the included subreddits', the time range's and the score
          range's members, when at most filter_scan_max and within SCAN_OVER_TRAVERSAL of the
          traversal's PQ scores, scored directly and filtered on their labels.
        """
        labels = getattr(ix, "labels", None)
        if not filters.active or labels is None:
            return Plan("graph", NO_FILTER, None, None, 1.0)
        flt = labels.filter(filters.nsfw, filters.after, filters.before, filters.subreddits,
                            filters.exclude_subreddits, filters.min_score)
        share = labels.selectivity(flt)
        # cost in PQ scores: a scan scores every member; the filtered traversal expands about
        # its list size of nodes (at most filter_L_max) of R neighbours each, plus a read each
        traversal = min(L / max(share, 1e-9) ** FILTER_L_EXPONENT, max(self.cfg.filter_L_max, L)) * getattr(
            ix, "degree", 64)
        # candidate sets a scan can take: the included subreddits' members, the months' members
        sizes: dict[str, int] = {}
        if flt.sub_mode == 1:
            sizes["sub"] = int(labels.sub_counts[flt.sub_ids].sum())
        if flt.month_lo > MONTH_ANY[0] or flt.month_hi < MONTH_ANY[1]:
            sizes["month"] = int(labels.month_members(flt.month_lo, flt.month_hi).shape[0])
        if flt.min_bucket:
            sizes["score"] = int(labels.score_members(flt.min_bucket).shape[0])
        if not sizes:  # exclusions and NSFW only: broad, the index's entry points serve
            return Plan("graph-filtered", flt, None, None, share)
        best = min(sizes, key=sizes.__getitem__)
        size = sizes[best]

        if best == "sub":
            lists = [labels.members(int(s)) for s in flt.sub_ids]
        elif best == "month":
            lists = [labels.month_members(flt.month_lo, flt.month_hi)]
        else:
            lists = [labels.score_members(flt.min_bucket)]
        if size <= self.cfg.filter_scan_max and size <= SCAN_OVER_TRAVERSAL * traversal:
            members = np.concatenate(lists) if lists else np.zeros(0, np.int64)
            return Plan("scan", flt, members, None, share, _unsettled(flt, best))
        return Plan("graph-filtered", flt, None, _spread(lists, FILTER_STARTS), share)

    def _run(self, ix: IndexLike, q: np.ndarray, k: int, L: int, plan: Plan = NO_PLAN, mismatch: float = 0.0,
             ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        k = max(1, min(k, self._size(ix)))
        L = max(L, k)
        budget = self.cfg.io_budget or None
        if plan.name == "scan":
            ids, scores, st = ix.scan(q, plan.members, k, plan.flt, member_flt=plan.member_flt)  # type: ignore[attr-defined]
        elif plan.name == "graph-filtered":
            ids, scores, st = ix.search(q, k, L, beam_width=self.cfg.beam_width, io_budget=budget,  # type: ignore[call-arg]
                                        flt=plan.flt, starts=plan.starts, mismatch=mismatch)
        else:
            ids, scores, st = ix.search(q, k, L, beam_width=self.cfg.beam_width, io_budget=budget)
        ids, scores = np.asarray(ids[0], np.int64), np.asarray(scores[0], np.float32)
        ok = ids >= 0
        stats = {}
        for key in ("reads", "pq_comparisons", "ms", "corrupt"):
            try:
                stats[key] = float(np.asarray(st[key]).reshape(-1)[0])
            except (KeyError, AttributeError, IndexError):
                pass
        return ids[ok], scores[ok], stats

    def _base_vectors(self, ix: IndexLike, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros((0, self.weighting.base_dim), np.float32)
        v = np.asarray(ix.vectors(ids), np.float32)[:, : self.weighting.base_dim]
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.maximum(n, 1e-12)

    def search(self, query: np.ndarray, weights: Mapping[str, float] | None, filters: FilterSpec,
               dedup: bool, offset: int, k: int) -> dict[str, Any]:
        """One page: results [offset, offset + k) of the ranked list, plus stats.

        query: (base_dim,) float32, L2-normalised. Returns {"results": [...], "stats": {...},
        "more": bool}. Raises WeightError for weights the index cannot honour.
        """
        with self._view() as ix:
            return self._search(ix, query, weights, filters, dedup, offset, k)

    def _search(self, ix: IndexLike, query: np.ndarray, weights: Mapping[str, float] | None, filters: FilterSpec,
                dedup: bool, offset: int, k: int) -> dict[str, Any]:
        cfg = self.cfg
        size = self._size(ix)
        t0 = time.perf_counter()
        q = self.weighting.extend_queries(np.asarray(query, np.float32)[None, :], weights, cfg.extra_dim_scale)
        need = min(offset + k, cfg.max_depth) + 1  # one more: is there a next page?
        base_L = max(cfg.search_L, 1)
        post = filters.active or dedup
        k1 = math.ceil(need * FIRST_PASS_SLACK) + 8 if post else need
        totals = {"reads": 0.0, "pq_comparisons": 0.0, "ms": 0.0, "corrupt": 0.0}
        passes, deepened = 0, False
        meta_ms = 0.0
        L = max(base_L, k1)
        plan = self._plan(ix, filters, L)
        if plan.name == "graph-filtered":
            L = min(max(L, math.ceil(L / max(plan.share, 1e-9) ** FILTER_L_EXPONENT)), max(cfg.filter_L_max, L))
        mismatch = cfg.filter_mismatch
        previous: tuple[np.ndarray, np.ndarray] | None = None
        while True:
            ids, scores, st = self._run(ix, q, k1, L, plan, mismatch)
            passes += 1
            for key in totals:
                totals[key] += st.get(key, 0.0)
            # fewer than asked: none left, unless a filtered traversal stopped at its list size
            exhausted = ids.size < min(k1, size) and plan.name != "graph-filtered"
            if previous is not None:
                ids, scores = _union(previous, (ids, scores))
            tm = time.perf_counter()
            metas: list[dict] | None = None
            keep = np.ones(ids.size, bool)
            if filters.active and ids.size:
                metas = ix.metadata(ids)
                keep = np.fromiter((filters.keep(m) for m in metas), bool, ids.size)
            cand = np.flatnonzero(keep)
            vecs = None
            if dedup and cand.size:
                vecs = self._base_vectors(ix, ids[cand])
                order, examined = dedup_order(vecs, cfg.dedup_threshold, need)
            else:
                order = np.arange(min(cand.size, need))
                examined = order.size
            meta_ms += (time.perf_counter() - tm) * 1000
            if order.size >= need or exhausted or not post or deepened or ids.size >= size:
                break
            # Too few survived the filters/dedup: search again, deeper, and take everything.
            deepened = True
            if plan.name == "graph-filtered":  # keep this pass's finds; the next one goes matching-first
                previous, mismatch = (ids, scores), MATCHING_FIRST
            L = max(L, base_L) * max(cfg.filter_L_multiplier, 1)
            k1 = L if plan.name != "scan" else k1 * max(cfg.filter_L_multiplier, 1)
        tm = time.perf_counter()
        page_rows = order[offset: offset + k]
        rows = cand[page_rows]
        page_ids = ids[rows]
        page_vecs = vecs[page_rows] if vecs is not None else self._base_vectors(ix, page_ids)
        sims = page_vecs @ np.asarray(query, np.float32)
        if metas is None:
            page_meta = ix.metadata(page_ids) if page_ids.size else []
        else:
            page_meta = [metas[r] for r in rows]
        results = [result_fields(int(i), m, s) for i, m, s in zip(page_ids, page_meta, sims)]
        meta_ms += (time.perf_counter() - tm) * 1000
        stats = {
            "reads": int(totals["reads"]), "pq_comparisons": int(totals["pq_comparisons"]),
            "ms": round(totals["ms"], 3), "filtered": filters.active, "deepened": deepened,
            "candidates": int(ids.size), "dropped_filter": int(ids.size - cand.size),
            "dropped_dedup": int(examined - order.size), "L": int(L), "passes": passes,
            "plan": plan.name, "filter_share": round(plan.share, 6),
            "search_ms": round((time.perf_counter() - t0) * 1000 - meta_ms, 3),
            "metadata_ms": round(meta_ms, 3), "corrupt_records": int(totals["corrupt"]),
        }
        more = order.size > offset + k and offset + k < cfg.max_depth
        return {"results": results, "stats": stats, "more": bool(more)}

    def vector_of(self, image_id: int) -> np.ndarray:
        """The base vector of the indexed image `image_id` (a result's `image_id`): (base_dim,) float32."""
        with self._view() as ix:
            node = int(ix.nodes_of(np.asarray([image_id], np.int64))[0])
            if node < 0:
                raise SearchInputError(f"like: no image {image_id} in this index")
            return self._base_vectors(ix, np.asarray([node], np.int64))[0]
