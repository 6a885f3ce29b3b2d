"""Duplicate clusters: exact (same URL, same content hash) and near (cosine >= t), not O(n^2).

Near duplicates are found with SimHash LSH: each band hashes a vector to the signs of its
projections on `bits` seeded random hyperplanes, packed into one uint64 key. Two vectors at
angle theta agree on one sign with probability p = 1 - theta / pi, on a band with p^bits, and
collide in at least one of `bands` bands with 1 - (1 - p^bits)^bands. `lsh_shape` picks
`bits` so that a pair exactly at the threshold collides in a band with probability ~1/4, or
more bits when N is large, so that buckets hold ~8 unrelated rows on average whatever N is
(otherwise verification grows as N^2 / 2^bits); then enough bands for the requested recall
(at most `max_bands`; `LshShape.collision` gives the recall actually reached). Rows sharing a
band key form a bucket; every pair in a bucket is verified exactly (fp32 inner product of the
stored fp16 vectors), and pairs at or above the threshold are joined in a union-find.
A bucket larger than `max_bucket` (one viral image posted 100k times) is verified against at
most `max_bucket` leaders instead: each member joins the first leader it matches or becomes a
leader while there is room; members that match no leader once the leaders are full are
counted as `unverified` for that band (other bands still see them).

Exact duplicates join the same union-find through their dictionary codes. Each cluster keeps
its best member (highest post score, then earliest, then lowest image_id); every other member
records the kept one in `dup_of`. Clusters are transitive (a chain of near copies is one
cluster). Cost: O(N d bits bands) hashing (a matmul per band block), O(N log N) per band to
sort, O(sum of bucket^2 d) to verify; memory O(N (bands + 2) 8 B) plus one vector block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from memescale.index.kernels import as_fp16, widen

KEY_BYTES_BUDGET = 256 * 2**20  # band keys held at once (bands are hashed in blocks)


@dataclass(frozen=True)
class LshShape:
    bits: int  # hyperplanes per band (<= 64: one uint64 key)
    bands: int

    def collision(self, cosine: float) -> float:
        """Probability that a pair at `cosine` shares at least one band key."""
        p = 1.0 - math.acos(min(1.0, max(-1.0, cosine))) / math.pi
        return 1.0 - (1.0 - p ** self.bits) ** self.bands


def lsh_shape(cosine: float, recall: float, n: int, max_bands: int = 128) -> LshShape:
    """The (bits, bands) that find a pair at `cosine` with probability >= `recall` among `n`
    rows (fewer when `max_bands` caps the bands)."""
    if not (-1.0 < cosine < 1.0) or not (0.0 < recall < 1.0):
        raise ValueError(f"need -1 < cosine < 1 and 0 < recall < 1, got {cosine}, {recall}")
    p = 1.0 - math.acos(cosine) / math.pi
    bits = max(math.floor(math.log(0.25) / math.log(p)), math.ceil(math.log2(max(2, n) / 8)))
    bits = int(min(64, max(4, bits)))
    bands = math.ceil(math.log(1.0 - recall) / math.log(1.0 - p ** bits))
    return LshShape(bits, int(min(max_bands, max(1, bands))))


@dataclass
class DedupReport:
    rows: int = 0
    bits: int = 0
    bands: int = 0
    cosine: float = 0.0
    exact_joins: dict[str, int] = field(default_factory=dict)  # key name -> rows joined
    near_joins: int = 0  # union operations from verified near pairs
    compared: int = 0  # exact inner products computed
    buckets_over_cap: int = 0
    unverified: int = 0
    clusters: int = 0  # clusters of >= 2 rows
    duplicates: int = 0  # rows with dup_of set
    largest_cluster: int = 0


@njit(nogil=True, cache=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(nogil=True, cache=True)
def _union(parent, a, b):
    ra, rb = _find(parent, a), _find(parent, b)
    if ra == rb:
        return False
    if ra < rb:
        parent[rb] = ra
    else:
        parent[ra] = rb
    return True


@njit(nogil=True, cache=True)
def _roots(parent):
    out = np.empty(parent.shape[0], np.int64)
    for i in range(parent.shape[0]):
        out[i] = _find(parent, i)
    return out


@njit(nogil=True, cache=True)
def _join_equal(parent, order, codes):
    """Union rows with equal non-negative codes; `order` sorts `codes`. Returns joins."""
    joins = 0
    for k in range(1, order.shape[0]):
        a, b = order[k - 1], order[k]
        if codes[a] >= 0 and codes[a] == codes[b]:
            joins += _union(parent, a, b)
    return joins


@njit(nogil=True, cache=True, fastmath=True)
def _verify_band(X, rows, order, keys, threshold, max_bucket, parent, buf):
    """Verify every bucket of one band (rows sorted by key in `order`). X: (N, d) uint16 fp16
    bits; rows[i] is the row of X for dedup position i. Returns (compared, joins, over_cap,
    unverified)."""
    n = order.shape[0]
    compared, joins, over_cap, unverified = 0, 0, 0, 0
    start = 0
    while start < n:
        end = start + 1
        while end < n and keys[order[end]] == keys[order[start]]:
            end += 1
        g = end - start
        if g >= 2:
            if g <= max_bucket:
                for a in range(g):
                    widen(X[rows[order[start + a]]], buf[a])
                for a in range(g):
                    ia = order[start + a]
                    for b in range(a + 1, g):
                        ib = order[start + b]
                        if _find(parent, ia) == _find(parent, ib):
                            continue
                        s = np.float32(0.0)
                        for j in range(buf.shape[1]):
                            s += buf[a, j] * buf[b, j]
                        compared += 1
                        if s >= threshold:
                            joins += _union(parent, ia, ib)
            else:
                over_cap += 1
                leaders = np.empty(max_bucket, np.int64)
                nl = 0
                for a in range(g):
                    ia = order[start + a]
                    widen(X[rows[ia]], buf[nl if nl < max_bucket else max_bucket])
                    matched = False
                    for b in range(nl):
                        s = np.float32(0.0)
                        for j in range(buf.shape[1]):
                            s += buf[b, j] * buf[min(nl, max_bucket), j]
                        compared += 1
                        if s >= threshold:
                            joins += _union(parent, leaders[b], ia)
                            matched = True
                            break
                    if not matched:
                        if nl < max_bucket:
                            leaders[nl] = ia
                            nl += 1
                        else:
                            unverified += 1
        start = end
    return compared, joins, over_cap, unverified


def _band_keys(X: np.ndarray, rows: np.ndarray, planes: np.ndarray, bits: int,
               block: int = 16384) -> np.ndarray:
    """(n, nb) uint64 keys of X[rows] for `planes` (d, nb * bits). O(n d nb bits)."""
    nb = planes.shape[1] // bits
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    keys = np.empty((len(rows), nb), np.uint64)
    for lo in range(0, len(rows), block):
        x = np.asarray(X[rows[lo:lo + block]], np.float32)
        signs = (x @ planes > 0).reshape(len(x), nb, bits)
        keys[lo:lo + block] = (signs.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64)
    return keys


def dictionary_codes(values) -> np.ndarray:
    """(n,) int64 codes of a string column (pyarrow array or sequence): equal strings share a
    code; null and "" get -1. O(n) hashing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else pa.array(values, pa.string())
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)
    return pc.fill_null(arr.dictionary_encode().indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def cluster(vectors: np.ndarray, rows: np.ndarray, exact: dict[str, np.ndarray], *, cosine: float,
            recall: float, max_bucket: int, seed: int = 0) -> tuple[np.ndarray, DedupReport]:
    """Union-find parents (n,) over dedup positions 0..n-1 (position i = vectors[rows[i]]).

    `vectors`: (N, d) fp16 L2-normalised (memmap fine); `exact`: key name -> (n,) int64 codes
    (from `dictionary_codes`) of the same positions. See the module docstring for the cost.
    """
    X = as_fp16(vectors)  # a view of fp16 input (memmaps stay mapped), else one fp16 copy
    rows = np.asarray(rows, np.int64)
    n, d = len(rows), X.shape[1]
    parent = np.arange(n, dtype=np.int64)
    shape = lsh_shape(cosine, recall, n)
    rep = DedupReport(rows=n, bits=shape.bits, bands=shape.bands, cosine=cosine)
    for name, codes in exact.items():
        codes = np.asarray(codes, np.int64)
        rep.exact_joins[name] = int(_join_equal(parent, np.argsort(codes, kind="stable"), codes))
    if n < 2:
        return parent, rep
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((d, shape.bits * shape.bands)).astype(np.float32)
    per_block = max(1, min(shape.bands, KEY_BYTES_BUDGET // max(1, 8 * n)))
    buf = np.empty((max_bucket + 1, d), np.float32)
    X16 = X.view(np.uint16)
    bar = tqdm(total=shape.bands, desc="near-duplicate bands", unit="band", disable=None)
    for b0 in range(0, shape.bands, per_block):
        nb = min(per_block, shape.bands - b0)
        keys = _band_keys(X, rows, planes[:, b0 * shape.bits:(b0 + nb) * shape.bits], shape.bits)
        for b in range(nb):
            k = np.ascontiguousarray(keys[:, b])
            order = np.argsort(k, kind="stable")
            c, j, o, u = _verify_band(X16, rows, order, k, np.float32(cosine), max_bucket, parent, buf)
            rep.compared += int(c)
            rep.near_joins += int(j)
            rep.buckets_over_cap += int(o)
            rep.unverified += int(u)
            bar.update(1)
    bar.close()
    return parent, rep


def keep_best(parent: np.ndarray, score: np.ndarray, created: np.ndarray,
              image_id: np.ndarray, rep: DedupReport) -> np.ndarray:
    """(n,) int64: the position each duplicate defers to (its cluster's best member), -1 for
    kept rows. Best: highest score, then earliest created, then lowest image_id. O(n log n)."""
    n = len(parent)
    roots = _roots(parent)
    order = np.lexsort((np.asarray(image_id), np.asarray(created), -np.asarray(score, np.int64), roots))
    first = np.ones(n, bool)
    first[1:] = roots[order][1:] != roots[order][:-1]
    best_of_root = np.empty(n, np.int64)
    best_of_root[roots[order][first]] = order[first]
    dup_of = best_of_root[roots]
    dup_of[dup_of == np.arange(n)] = -1
    sizes = np.bincount(roots, minlength=n)
    rep.clusters = int((sizes >= 2).sum())
    rep.duplicates = int((dup_of >= 0).sum())
    rep.largest_cluster = int(sizes.max()) if n else 0
    return dup_of
