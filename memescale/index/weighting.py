"""Quality scores and time as extra dimensions, so that user weights steer the graph traversal.

Every base vector x (L2-normalised, d columns) gets m appended columns, one per available
signal in `WEIGHT_NAMES` (meme, aesthetic, useful, recency), each the signal quantile-
normalised to [0, 1] over the corpus and multiplied by `beta`; recency is `created_utc`;
an item without a value gets 0.5. A query q gets ``beta * scale * w`` appended for the user's
weights w in [-2, 2], so

    <q_ext, x_ext> = <q, x> + scale * beta^2 * sum_i w_i s_i(x)

and a search by inner product over the extended vectors ranks by similarity plus the
weighted scores *during* the traversal, not in a re-rank afterwards.

One more column balances the norms: the extended base vectors would have norms between 1 and
sqrt(1 + m beta^2), and a graph built on Euclidean distance (as Vamana's is) orders neighbours
by ``|x|^2 - 2 <q, x>``, not by inner product. The last column is
``sqrt(1 + m beta^2 - |x_ext|^2)`` (0 for queries), which makes every base vector's norm
sqrt(1 + m beta^2): Euclidean and inner-product orders then coincide again (the standard
reduction of maximum inner product search to nearest neighbour search).

The index directory records what was appended in ``weighting.json`` (`Weighting.save`), so a
server knows how to extend queries and which weights exist. An index without that file (or
with no names) accepts only zero weights. Pure numpy; the index build and the server share it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WEIGHT_NAMES = ("meme", "aesthetic", "useful", "recency")
# The metadata keys each signal is read from, first present wins (the index build stores the
# curate step's quality scores under their plain names, see memescale/shards/corpus.py).
SOURCE_KEYS = {
    "meme": ("meme", "meme_score"),
    "aesthetic": ("aesthetic", "aesthetic_score"),
    "useful": ("useful", "useful_score"),
    "recency": ("created_utc",),
}
WEIGHT_MIN, WEIGHT_MAX = -2.0, 2.0
DEFAULT_BETA = 0.2
DEFAULT_KNOTS = 257
MISSING = 0.5  # the normalised value of an item without the signal
WEIGHTING_FILE = "weighting.json"
FORMAT_VERSION = 1


class WeightError(ValueError):
    """Weights the index cannot honour: an unknown name, a value out of range, or a non-zero
    weight for a signal the index was built without."""


def _as_float(value: Any) -> float:
    """A metadata value as float; NaN when absent or not numeric (int, float, numeric str)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _lookup(meta: Mapping[str, Any] | None, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if meta and meta.get(key) is not None:
            return meta[key]
    return None


def signal_values(metadata: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    """(n,) float64 raw values of signal `name` (see SOURCE_KEYS); NaN where missing."""
    keys = SOURCE_KEYS[name]
    return np.fromiter((_as_float(_lookup(m, keys)) for m in metadata), np.float64, len(metadata))


def fit_quantiles(values: np.ndarray, n_knots: int = DEFAULT_KNOTS) -> tuple[list[float], list[float]]:
    """Quantile knots of the finite `values`: (xs strictly increasing, levels in [0, 1]).

    `apply_quantiles(v, xs, levels)` then maps a value to its (interpolated) quantile level.
    Tied values share the mean level of their tie, so a constant signal maps to 0.5.
    Empty when no value is finite. O(n log n).
    """
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [], []
    levels = np.linspace(0.0, 1.0, max(2, n_knots))
    xs = np.quantile(v, levels)
    uniq, inverse = np.unique(xs, return_inverse=True)
    mean_levels = np.bincount(inverse, weights=levels) / np.bincount(inverse)
    return uniq.tolist(), mean_levels.tolist()


def apply_quantiles(values: np.ndarray, xs: Sequence[float], levels: Sequence[float]) -> np.ndarray:
    """(n,) float32 in [0, 1]: each value's quantile level; MISSING for NaN or without knots."""
    v = np.asarray(values, np.float64)
    out = np.full(v.shape, MISSING, np.float64)
    ok = np.isfinite(v)
    if len(xs) == 1:
        out[ok] = 0.5
    elif len(xs) > 1:
        out[ok] = np.interp(v[ok], np.asarray(xs), np.asarray(levels))
    return out.astype(np.float32)


@dataclass(frozen=True)
class Weighting:
    """Which extra dimensions an index's vectors carry and how queries are extended.

    base_dim: d, the model's embedding width. names: the signals appended, in column order.
    beta: their scale. balance: whether a norm-balancing last column follows them.
    quantiles: per name, (knot values, levels) of its normalisation, so later items (and
    other shards of a build) are normalised exactly like the corpus it was fitted on.
    """

    base_dim: int
    names: tuple[str, ...] = ()
    beta: float = DEFAULT_BETA
    balance: bool = True
    quantiles: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    @property
    def extra_dims(self) -> int:
        return len(self.names) + (1 if self.balance and self.names else 0)

    @property
    def dim(self) -> int:
        """Width of the extended vectors stored in the index."""
        return self.base_dim + self.extra_dims

    def scores(self, metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(n, len(names)) float32 in [0, 1]: the normalised signals of `metadata`."""
        cols = [apply_quantiles(signal_values(metadata, nm), *self.quantiles.get(nm, ([], [])))
                for nm in self.names]
        return np.stack(cols, axis=1) if cols else np.zeros((len(metadata), 0), np.float32)

    def extend_base(self, vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(n, base_dim) L2-normalised vectors + their metadata -> (n, dim) float32."""
        x = np.asarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.base_dim:
            raise ValueError(f"expected (n, {self.base_dim}) vectors, got {x.shape}")
        if len(metadata) != x.shape[0]:
            raise ValueError(f"{len(metadata)} metadata entries for {x.shape[0]} vectors")
        if not self.names:
            return x.copy()
        extra = self.scores(metadata) * np.float32(self.beta)
        parts = [x, extra]
        if self.balance:
            full = 1.0 + len(self.names) * self.beta**2
            norm2 = np.einsum("ij,ij->i", x, x) + np.einsum("ij,ij->i", extra, extra)
            parts.append(np.sqrt(np.maximum(full - norm2, 0.0)).astype(np.float32)[:, None])
        return np.concatenate(parts, axis=1)

    def check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        """The non-zero weights as {name: float}; WeightError for what the index cannot honour."""
        out: dict[str, float] = {}
        for name, w in (weights or {}).items():
            if name not in WEIGHT_NAMES:
                raise WeightError(f"unknown weight {name!r}; known: {', '.join(WEIGHT_NAMES)}")
            w = float(w)
            if not (WEIGHT_MIN <= w <= WEIGHT_MAX):
                raise WeightError(f"weight {name}={w} is outside [{WEIGHT_MIN:g}, {WEIGHT_MAX:g}]")
            if w == 0.0:
                continue
            if name not in self.names:
                have = ", ".join(self.names) or "none"
                raise WeightError(f"this index was built without the {name!r} signal "
                                  f"(available weights: {have}); set it to 0")
            out[name] = w
        return out

    def extend_queries(self, queries: np.ndarray, weights: Mapping[str, float] | None = None,
                       scale: float = 1.0) -> np.ndarray:
        """(nq, base_dim) queries -> (nq, dim) float32 with ``beta * scale * w`` appended.

        The balancing column is 0 for queries. Raises WeightError (see `check_weights`).
        """
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.base_dim:
            raise ValueError(f"expected (nq, {self.base_dim}) queries, got {q.shape}")
        w = self.check_weights(weights)
        if not self.names:
            return q.copy()
        extra = np.zeros((q.shape[0], self.extra_dims), np.float32)
        for j, name in enumerate(self.names):
            extra[:, j] = self.beta * scale * w.get(name, 0.0)
        return np.concatenate([q, extra], axis=1)

    def index_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries at the index width: (nq, dim) as given, or (nq, base_dim) plain model
        embeddings extended with neutral (zero) weights by `extend_queries`, so their scores
        are the plain inner products. (nq, dim) float32; ValueError for any other width."""
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.ndim == 2 and q.shape[1] == self.dim:
            return q
        if q.ndim == 2 and q.shape[1] == self.base_dim:
            return self.extend_queries(q)
        width = q.shape[1] if q.ndim == 2 else q.shape
        plain = f" (or {self.base_dim}: model embeddings, extended with neutral weights)" if self.extra_dims else ""
        raise ValueError(f"queries have dimension {width}, the index has {self.dim}{plain}")

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "base_dim": self.base_dim,
            "names": list(self.names),
            "beta": self.beta,
            "balance": self.balance,
            "source_keys": {nm: list(SOURCE_KEYS[nm]) for nm in self.names},
            "quantiles": {nm: {"x": xs, "level": lv} for nm, (xs, lv) in self.quantiles.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Weighting:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported weighting format {data.get('format_version')!r}")
        names = tuple(data.get("names", ()))
        unknown = set(names) - set(WEIGHT_NAMES)
        if unknown:
            raise ValueError(f"unknown weighting signals {sorted(unknown)}")
        q = {nm: (list(v["x"]), list(v["level"])) for nm, v in data.get("quantiles", {}).items()}
        return cls(int(data["base_dim"]), names, float(data["beta"]), bool(data.get("balance", True)), q)

    def save(self, index_dir: str | os.PathLike) -> Path:
        """Write ``weighting.json`` into `index_dir` (atomically) and return its path."""
        path = Path(index_dir) / WEIGHTING_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, index_dir: str | os.PathLike, base_dim: int | None = None) -> Weighting:
        """The weighting recorded in `index_dir`; without the file, a plain one of `base_dim`
        (no extra dimensions). ValueError if neither is available."""
        path = Path(index_dir) / WEIGHTING_FILE
        if path.exists():
            return cls.from_json(json.loads(path.read_text()))
        if base_dim is None:
            raise ValueError(f"{path} is absent and the base dimension is unknown")
        return cls(int(base_dim), (), DEFAULT_BETA, False, {})


def fit_weighting(metadata: Sequence[Mapping[str, Any]], base_dim: int, beta: float = DEFAULT_BETA,
                  names: Sequence[str] = WEIGHT_NAMES, n_knots: int = DEFAULT_KNOTS,
                  balance: bool = True) -> Weighting:
    """Fit the normalisation of each signal in `names` that at least one item has.

    `metadata` may be a sample of the corpus (the quantiles are then estimates). O(n log n).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    kept, quantiles = [], {}
    for nm in names:
        if nm not in SOURCE_KEYS:
            raise ValueError(f"unknown signal {nm!r}")
        xs, levels = fit_quantiles(signal_values(metadata, nm), n_knots)
        if xs:
            kept.append(nm)
            quantiles[nm] = (xs, levels)
    return Weighting(base_dim, tuple(kept), float(beta), balance, quantiles)


def weight_vectors(vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]],
                   beta: float = DEFAULT_BETA, names: Sequence[str] = WEIGHT_NAMES) -> tuple[np.ndarray, Weighting]:
    """Fit on the whole corpus and extend it: ((n, dim) float32 vectors, their Weighting)."""
    w = fit_weighting(metadata, np.asarray(vectors).shape[1], beta, names)
    return w.extend_base(vectors, metadata), w


def build_weighted_index(vectors: np.ndarray, metadata: list[dict], out_dir: str | os.PathLike,
                         params: Any, beta: float = DEFAULT_BETA) -> tuple[Any, Weighting]:
    """Fit the weighting on `metadata`, build the index of the extended vectors into `out_dir`
    (`memescale.index.build_index` with `params`, an IndexParams) and write weighting.json.

    A query sample in `params.queries` at the base width is extended with zero weights.
    Returns (BuildStats, Weighting).
    """
    import dataclasses

    from memescale.index import build_index

    w = fit_weighting(metadata, np.asarray(vectors).shape[1], beta)
    queries = getattr(params, "queries", None)
    if queries is not None and np.asarray(queries).shape[1] == w.base_dim:
        params = dataclasses.replace(params, queries=w.extend_queries(queries))
    stats = build_index(w.extend_base(vectors, metadata), metadata, out_dir, params)
    w.save(out_dir)
    return stats, w
