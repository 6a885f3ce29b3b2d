"""Balanced partition for the sharded build: cohesive clusters under a hard size cap.

1. `balanced_kmeans`: spherical k-means on a sample whose assignment step respects a capacity
   (each cluster at most ceil(n/k * (1 + slack)) sample points), so centroids end up where
   equal-sized, cohesive clusters are -- not random balanced cuts, which waste the overlap.
2. `assign_shards`: every vector goes to its `overlap` (2) most similar centroids among those
   with room, with a hard cap per shard of ceil(overlap * N / k * (1 + slack)). The cap is
   what lets a shard's build task declare its memory up front.

Both use a greedy capacitated assignment: candidate (point, centroid) pairs from each point's
`candidates` nearest centroids, taken in order of decreasing similarity while the point still
needs an assignment and the centroid has room; points left short (rare) take the most
similar centroids that still have room. Time O(N k d) for the similarities plus
O(N c log(N c)) for the sort (c = candidates); memory O(N c).

3. `assign_shards_to_disk`: the same assignment streamed in blocks for corpora that do not fit
   in memory, written as a `DiskPartition` folder. The greedy's outcome is a similarity
   threshold per centroid (the similarity of the last pair it accepted before it was full):
   a point takes its `overlap` most similar centroids among those it clears. The thresholds
   are those of the greedy on a sample (at a cap with half the slack, so the sampling error
   stays within the cap); a first pass over blocks of points takes the centroids each point
   clears, up to half the slack; a second pass gives the points left short (as the greedy's
   fallback) the most similar centroids with room under the hard cap ceil(overlap * N / k *
   (1 + slack)). Time O(N k (d + log k)); memory
   O(block * (k + d) + k) besides the sample, nothing per point in memory (the members
   are written to a memmap, each shard's ids to its own file).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np


@dataclass
class Partition:
    """`centroids` (k, d) float32 unit rows; `shards[s]` sorted int64 ids of shard s."""

    centroids: np.ndarray
    shards: list[np.ndarray]

    @property
    def k(self) -> int:
        return len(self.shards)

    def shard_ids(self, s: int) -> np.ndarray:
        return self.shards[s]

    def sizes(self) -> np.ndarray:
        return np.array([len(s) for s in self.shards])

    def to_disk(self, folder: str | os.PathLike, n: int) -> DiskPartition:
        """This partition of `n` nodes written as a `DiskPartition` folder (for tests and small
        corpora: builds the (n, overlap) member array in memory)."""
        width = max(1, max((int(c) for c in np.bincount(np.concatenate(self.shards), minlength=n)), default=1)) \
            if self.shards and n else 1
        member = np.full((n, width), -1, np.int32)
        slot = np.zeros(n, np.int64)
        for s, ids in enumerate(self.shards):
            member[ids, slot[ids]] = s
            slot[ids] += 1
        return _write_disk_partition(folder, self.centroids, lambda lo, hi: member[lo:hi], n, width,
                                     self.sizes().astype(np.int64))


CENTROIDS = "centroids.npy"
MEMBER = "member.npy"


def shard_ids_file(folder: str | os.PathLike, s: int) -> Path:
    """FOLDER/shard-XXXX.ids.npy: shard s's node ids, sorted int64."""
    return Path(folder) / f"shard-{s:04d}.ids.npy"


class DiskPartition:
    """A partition kept on disk, in a folder:

        centroids.npy         (k, d) float32 unit rows
        member.npy            (N, overlap) int32: each node's shards in increasing order, -1 for none
        shard-XXXX.ids.npy    (n_s,) int64: shard s's node ids, sorted

    `member` is memory-mapped and `shard_ids(s)` maps one shard's ids: opening it costs the
    centroids only. A folder is complete once it exists (it is written under another name and
    renamed)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.centroids = np.load(self.folder / CENTROIDS)
        self.member = np.load(self.folder / MEMBER, mmap_mode="r")

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def overlap(self) -> int:
        return int(self.member.shape[1])

    def __len__(self) -> int:
        return int(self.member.shape[0])

    def shard_ids(self, s: int) -> np.ndarray:
        """Shard s's node ids, (n_s,) int64 sorted, memory-mapped."""
        return np.load(shard_ids_file(self.folder, s), mmap_mode="r")

    def sizes(self) -> np.ndarray:
        """(k,) int64 shard sizes (from the id files' headers)."""
        return np.array([self.shard_ids(s).shape[0] for s in range(self.k)], np.int64)

    def save(self, folder: str | os.PathLike) -> DiskPartition:
        """A copy in `folder` (written under a temporary name and renamed); returns it."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.folder, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return DiskPartition(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DiskPartition:
        """The partition in `folder` (FileNotFoundError when there is none)."""
        if not (Path(folder) / MEMBER).exists():
            raise FileNotFoundError(f"no partition in {folder}")
        return cls(folder)


def _write_disk_partition(folder: str | os.PathLike, centroids: np.ndarray, member_rows, n: int, width: int,
                          sizes: np.ndarray, block: int = 65536) -> DiskPartition:
    """Write a DiskPartition folder: member_rows(lo, hi) gives member[lo:hi] ((hi - lo, width)
    int32, each row's shards increasing, -1 last); sizes (k,) the shard sizes. Two passes over
    the rows in blocks: member.npy, then every shard's sorted ids. Memory O(block * width + k)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    k = len(centroids)
    np.save(tmp / CENTROIDS, np.asarray(centroids, np.float32))
    member = np.lib.format.open_memmap(tmp / MEMBER, mode="w+", dtype=np.int32, shape=(n, width))
    for lo in range(0, n, block):
        member[lo:min(n, lo + block)] = member_rows(lo, min(n, lo + block))
    outs = [np.lib.format.open_memmap(shard_ids_file(tmp, s), mode="w+", dtype=np.int64, shape=(int(sizes[s]),))
            for s in range(k)]
    cursor = np.zeros(k, np.int64)
    for lo in range(0, n, block):
        m = np.asarray(member[lo:lo + block]).reshape(-1)
        rows = lo + np.arange(m.size, dtype=np.int64) // width
        keep = m >= 0
        m, rows = m[keep], rows[keep]
        order = np.argsort(m, kind="stable")  # rows stay increasing within a shard
        m, rows = m[order], rows[order]
        bounds = np.searchsorted(m, np.arange(k + 1))
        for s in np.nonzero(bounds[1:] > bounds[:-1])[0]:
            part = rows[bounds[s]:bounds[s + 1]]
            if cursor[s] + part.size > sizes[s]:
                raise ValueError(f"shard {s} has more members than its size {sizes[s]}")
            outs[s][cursor[s]:cursor[s] + part.size] = part
            cursor[s] += part.size
    if not np.array_equal(cursor, sizes):
        raise ValueError("shard sizes do not match the member array")
    for o in outs:
        o.flush()
    member.flush()
    del outs, member
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return DiskPartition(folder)


def single_shard_partition(folder: str | os.PathLike, n: int, d: int) -> DiskPartition:
    """Every node in one shard (zero centroid), as a DiskPartition folder."""
    return _write_disk_partition(folder, np.zeros((1, d), np.float32), lambda lo, hi: np.zeros((hi - lo, 1), np.int32),
                                 n, 1, np.array([n], np.int64))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _topc(x: np.ndarray, centroids: np.ndarray, c: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `c` most similar centroids: (ids (n, c) int32, sims (n, c) float32), blocked."""
    n = len(x)
    ids = np.empty((n, c), dtype=np.int32)
    sims = np.empty((n, c), dtype=np.float32)
    for lo in range(0, n, block):
        s = np.asarray(x[lo:lo + block], dtype=np.float32) @ centroids.T
        part = np.argpartition(-s, c - 1, axis=1)[:, :c] if c < s.shape[1] else np.tile(np.arange(c), (len(s), 1))
        ids[lo:lo + block] = part
        sims[lo:lo + block] = np.take_along_axis(s, part, axis=1)
    return ids, sims


@numba.njit(cache=True)
def _greedy(order, ids, per_point, cap, out, filled, load):
    c = ids.shape[1]
    for flat in order:
        p = flat // c
        f = filled[p]
        if f == per_point:
            continue
        cid = ids[p, flat % c]
        if load[cid] < cap:
            out[p, f] = cid
            filled[p] = f + 1
            load[cid] += 1


def capacitated_assign(x: np.ndarray, centroids: np.ndarray, per_point: int, cap: int,
                       candidates: int = 8) -> np.ndarray:
    """Assign each row of `x` to `per_point` distinct centroids, each centroid taking at most
    `cap` rows. Returns (n, per_point) int32 centroid ids, most similar first.
    Requires per_point <= k and n * per_point <= k * cap."""
    n, k = len(x), len(centroids)
    if per_point > k or n * per_point > k * cap:
        raise ValueError(f"cannot place {n} x {per_point} assignments in {k} shards of cap {cap}")
    c = min(k, max(candidates, per_point + 1))
    ids, sims = _topc(x, centroids, c)
    order = np.argsort(-sims, axis=None, kind="stable")
    out = np.full((n, per_point), -1, dtype=np.int32)
    filled = np.zeros(n, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    _greedy(order, ids, per_point, cap, out, filled, load)
    for p in np.nonzero(filled < per_point)[0]:
        s = np.asarray(x[p], dtype=np.float32) @ centroids.T
        for cid in np.argsort(-s):
            if filled[p] == per_point:
                break
            if load[cid] < cap and cid not in out[p, : filled[p]]:
                out[p, filled[p]] = cid
                filled[p] += 1
                load[cid] += 1
    return out


def balanced_kmeans(sample: np.ndarray, k: int, iters: int = 12, slack: float = 0.05,
                    seed: int = 0) -> np.ndarray:
    """Spherical k-means with capacitated assignment on `sample` (n, d) -> (k, d) unit centroids."""
    x = _normalise(sample)
    rng = np.random.default_rng(seed)
    n = len(x)
    if n < k:
        raise ValueError(f"sample of {n} vectors is smaller than k={k}")
    # k-means++ seeding on inner-product distance (1 - cos)
    cent = [x[rng.integers(n)]]
    dist = 1.0 - x @ cent[0]
    for _ in range(1, k):
        p = np.maximum(dist, 0) + 1e-12
        cent.append(x[rng.choice(n, p=p / p.sum())])
        dist = np.minimum(dist, 1.0 - x @ cent[-1])
    centroids = np.stack(cent)
    cap = math.ceil(n / k * (1 + slack))
    for _ in range(iters):
        a = capacitated_assign(x, centroids, 1, cap)[:, 0]
        sums = np.zeros_like(centroids)
        np.add.at(sums, a, x)
        empty = np.bincount(a, minlength=k) == 0
        sums[empty] = x[rng.integers(n, size=int(empty.sum()))]
        centroids = _normalise(sums)
    return centroids


def assign_shards(vectors: np.ndarray, centroids: np.ndarray, overlap: int = 2,
                  slack: float = 0.05) -> Partition:
    """Every vector into its `overlap` nearest shards under the hard cap (see module doc)."""
    k = len(centroids)
    overlap = min(overlap, k)
    cap = math.ceil(overlap * len(vectors) / k * (1 + slack))
    a = capacitated_assign(_normalise(vectors), centroids, overlap, cap)
    flat_ids = np.repeat(np.arange(len(vectors), dtype=np.int64), overlap)
    flat_shard = a.reshape(-1)
    order = np.argsort(flat_shard, kind="stable")
    bounds = np.searchsorted(flat_shard[order], np.arange(k + 1))
    shards = [np.sort(flat_ids[order[bounds[s]:bounds[s + 1]]]) for s in range(k)]
    return Partition(centroids=centroids, shards=shards)


def greedy_thresholds(sample: np.ndarray, centroids: np.ndarray, overlap: int, slack: float,
                      block: int = 8192) -> np.ndarray:
    """Per centroid, the least similarity of a pair the capacitated greedy on `sample` accepted
    once that centroid was full (cap ceil(overlap * n / k * (1 + slack))); -inf for the
    centroids that never filled. (k,) float32. Time O(n k d); memory O(n c) on the sample."""
    x = _normalise(sample)
    k = len(centroids)
    cap = math.ceil(overlap * len(x) / k * (1 + slack))
    a = capacitated_assign(x, centroids, overlap, cap)
    thr = np.full(k, np.inf, np.float32)
    for lo in range(0, len(x), block):
        ab = a[lo:lo + block]
        sims = np.take_along_axis(x[lo:lo + block] @ centroids.T, np.maximum(ab, 0), axis=1)
        np.minimum.at(thr, ab[ab >= 0], sims[ab >= 0])
    load = np.bincount(a[a >= 0], minlength=k)
    thr[load < cap] = -np.inf
    return thr


@numba.njit(cache=True, inline="always")
def _surplus(load, cap, m, need):
    """Room the other m points still to place can spare: the room each centroid can still
    give them (at most m each, one pick per point and centroid) minus the `need` picks they
    must make. A row may take a centroid whose room the rest need only within it."""
    surplus = -need
    for c in range(load.shape[0]):
        surplus += min(cap - load[c], m)
    return surplus


@numba.njit(cache=True)
def _assign_rows(sims, thr, overlap, cap, load, todo, out, fill):
    """Each row of sims (B, k) takes its `overlap` most similar centroids c with
    sims >= thr[c] and room (load[c] < cap), and with `fill` then the most similar ones with
    room it lacks: out[i] in increasing centroid order, -1 padded. Updates load. todo =
    [points not yet placed in full, picks still to make] over the corpus, updated (without
    `fill`, a row left short stays counted for `_fill_short`); a centroid whose room the rest
    may need is taken only within the surplus (`_surplus`). Returns the picks missing.

    Without `fill`: the streaming pass of `assign_shards_to_disk`; with it, its fallback, where
    each point takes all its shards at once."""
    k = sims.shape[1]
    missing = 0
    picked = np.empty(overlap, np.int64)
    for i in range(sims.shape[0]):
        m = todo[0] - 1
        surplus = _surplus(load, cap, m, todo[1] - overlap)
        order = np.argsort(-sims[i], kind="mergesort")
        f = 0
        tight = 0
        for pass_no in range(2 if fill else 1):
            for t in range(k):
                if f == overlap:
                    break
                c = order[t]
                room = cap - load[c]
                if room <= 0 or (pass_no == 0 and sims[i, c] < thr[c]) or (room <= m and tight >= surplus):
                    continue
                dup = False
                for q in range(f):
                    if picked[q] == c:
                        dup = True
                if dup:
                    continue
                picked[f] = c
                load[c] += 1
                f += 1
                if room <= m:
                    tight += 1
        todo[1] -= f
        if fill or f == overlap:
            todo[0] -= 1
        srt = np.sort(picked[:f])
        for q in range(overlap):
            out[i, q] = srt[q] if q < f else -1
        missing += overlap - f
    return missing


@numba.njit(cache=True)
def _fill_short(sims, cap, load, out, todo):
    """Rows of out (B, overlap) short of picks take the most similar centroids with room that
    they lack (sims (B, k)); out rows re-sorted, -1 padded. todo = [points still short,
    picks still missing] over the whole corpus, updated. Feasibility is kept for the rest:
    P points missing M picks can all be placed when sum_c min(room_c, P) >= M; taking a
    centroid with room_c <= P costs one unit of that surplus. Returns the picks still missing."""
    k = sims.shape[1]
    overlap = out.shape[1]
    left = 0
    for i in range(sims.shape[0]):
        f = 0
        while f < overlap and out[i, f] >= 0:
            f += 1
        if f == overlap:
            continue
        m, need = todo[0] - 1, todo[1] - (overlap - f)
        surplus = _surplus(load, cap, m, need)
        order = np.argsort(-sims[i], kind="mergesort")
        tight = 0
        for t in range(k):
            if f == overlap:
                break
            c = order[t]
            room = cap - load[c]
            if room <= 0 or (room <= m and tight >= surplus):
                continue
            dup = False
            for q in range(f):
                if out[i, q] == c:
                    dup = True
            if dup:
                continue
            out[i, f] = c
            load[c] += 1
            f += 1
            if room <= m:
                tight += 1
        out[i, :f] = np.sort(out[i, :f])
        todo[0] -= 1
        todo[1] = need + (overlap - f)
        left += overlap - f
    return left


def assign_shards_to_disk(vectors: np.ndarray, centroids: np.ndarray, folder: str | os.PathLike, overlap: int = 2,
                          slack: float = 0.05, sample: np.ndarray | None = None, sample_size: int = 100_000,
                          seed: int = 0, block: int = 32768) -> DiskPartition:
    """Every vector of `vectors` ((N, d), e.g. a memmap) into its `overlap` nearest shards under
    the hard cap ceil(overlap * N / k * (1 + slack)), streamed in blocks (module doc, step 3),
    written to `folder` as a DiskPartition. `sample`: the rows the thresholds are fitted on
    (default: `sample_size` rows drawn with `seed`). A second pass gives the points short of
    centroids they clear the most similar ones with room (only their rows are read again);
    should that leave a point short (its shards with room are ones it is in already), the
    assignment is redone in one pass where each point takes all its shards at once.
    Raises ValueError when the cap cannot hold N * overlap memberships. Memory
    O(block * (k + d) + k + sample); disk N * overlap * 4 bytes (member.npy, written twice)
    + N * overlap * 8 bytes (the shards' id files)."""
    n, k = len(vectors), len(centroids)
    overlap = min(overlap, k)
    cap = math.ceil(overlap * n / k * (1 + slack))
    if n * overlap > k * cap:
        raise ValueError(f"cannot place {n} x {overlap} assignments in {k} shards of cap {cap}")
    cent = np.asarray(centroids, np.float32)
    if sample is None:
        rng = np.random.default_rng(seed)
        sample = np.asarray(vectors[np.sort(rng.choice(n, min(n, sample_size), replace=False))])
    thr = greedy_thresholds(sample, cent, overlap, slack / 2)
    # the first pass fills to half the slack: every shard keeps room for the points it leaves short
    first_cap = min(cap, math.ceil(overlap * n / k * (1 + slack / 2)))
    load = np.zeros(k, np.int64)

    folder = Path(folder)
    # sizes are known only after the member pass: write member.npy first, then the id files
    tmp_member = folder.with_name(folder.name + ".member.tmp.npy")
    member = np.lib.format.open_memmap(tmp_member, mode="w+", dtype=np.int32, shape=(n, overlap))
    missing = 0
    todo = np.array([n, n * overlap], np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        out = np.empty((hi - lo, overlap), np.int32)
        missing += _assign_rows(_normalise(vectors[lo:hi]) @ cent.T, thr, overlap, first_cap, load, todo, out,
                                False)
        member[lo:hi] = out
    left = 0
    for lo in range(0, n if missing else 0, block):
        m = np.asarray(member[lo:lo + block])
        rows = np.nonzero(m[:, -1] < 0)[0]
        if rows.size:
            sub = m[rows]
            left += _fill_short(_normalise(vectors[lo + rows]) @ cent.T, cap, load, sub, todo)
            member[lo + rows] = sub
    if left:  # rare: the points left short own the only shards with room; redo in one pass
        load[:] = 0
        todo = np.array([n, n * overlap], np.int64)
        left = 0
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            out = np.empty((hi - lo, overlap), np.int32)
            left += _assign_rows(_normalise(vectors[lo:hi]) @ cent.T, thr, overlap, cap, load, todo, out, True)
            member[lo:hi] = out
    member.flush()
    try:
        if left:
            raise ValueError(f"{left} memberships found no shard with room (cap {cap})")
        return _write_disk_partition(folder, cent, lambda lo, hi: member[lo:hi], n, overlap, load, block=block)
    finally:
        os.remove(tmp_member)


def cohesion(vectors: np.ndarray, part: Partition | DiskPartition) -> float:
    """Mean cosine of each (vector, shard) membership to that shard's centroid."""
    total, count = 0.0, 0
    for s in range(part.k):
        ids = np.asarray(part.shard_ids(s))
        total += float((_normalise(vectors[ids]) @ part.centroids[s]).sum())
        count += len(ids)
    return total / max(1, count)


def plain_kmeans_partition(vectors: np.ndarray, k: int, overlap: int = 2, iters: int = 12,
                           seed: int = 0) -> Partition:
    """Reference: unconstrained spherical k-means, each vector in its `overlap` nearest
    clusters with no cap (for reporting sizes and cohesion next to the balanced partition)."""
    x = _normalise(vectors)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        a = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, a, x)
        empty = np.bincount(a, minlength=k) == 0
        sums[empty] = x[rng.integers(len(x), size=int(empty.sum()))]
        centroids = _normalise(sums)
    ids, _ = _topc(x, centroids, min(k, overlap))
    shards = [np.nonzero((ids == s).any(axis=1))[0].astype(np.int64) for s in range(k)]
    return Partition(centroids=centroids, shards=shards)
