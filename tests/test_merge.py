"""Blockwise merge of shard graphs from disk and border nodes from a member array
(memescale/index/merge.py): equal to the in-RAM algorithms, and bounded in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memescale.index.merge import border_nodes, member_from_shards, merge_shard_files, merge_shard_graphs
from memescale.index.vamana import build_vamana, prune_lists


def _random_member(rng: np.random.Generator, n: int, k: int, overlap: int = 2) -> np.ndarray:
    """(n, overlap) int32: `overlap` distinct shards per node in increasing order; a few nodes
    in one shard only, a few in none (-1 last)."""
    member = np.sort(np.argsort(rng.random((n, k)), axis=1)[:, :overlap], axis=1).astype(np.int32)
    one = rng.random(n) < 0.05
    member[one, 1:] = -1
    member[rng.random(n) < 0.01] = -1
    return member


def _shard_ids(member: np.ndarray, k: int) -> list[np.ndarray]:
    return [np.flatnonzero((member == s).any(axis=1)).astype(np.int64) for s in range(k)]


def _reference_merge(vectors, shards, R, alpha):
    """The in-RAM merge as it was before the blockwise one: an (N, overlap * width) list array
    filled shard by shard, then `prune_lists`."""
    n = len(vectors)
    membership = np.zeros(n, np.int64)
    for ids, _, _ in shards:
        membership[ids] += 1
    width = max(nbrs.shape[1] for _, nbrs, _ in shards)
    lists = np.full((n, width * max(1, int(membership.max()))), -1, np.int32)
    slot = np.zeros(n, np.int64)
    for ids, nbrs, _ in shards:
        glob = np.where(nbrs >= 0, ids[np.maximum(nbrs, 0)], -1).astype(np.int32)
        cols = slot[ids][:, None] * width + np.arange(nbrs.shape[1])[None, :]
        lists[ids[:, None], cols] = glob
        slot[ids] += 1
    return prune_lists(vectors, lists, R, alpha, threads=2)


def _reference_margins(vectors, centroids, shards):
    """Each node's margin as border_nodes defined it, node by node from per-shard id lists."""
    n, k = len(vectors), len(centroids)
    inside = np.zeros((n, k), bool)
    for s, ids in enumerate(shards):
        inside[ids, s] = True
    x = np.asarray(vectors, np.float32)
    sims = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ np.asarray(centroids, np.float32).T
    margin = np.empty(n, np.float32)
    for i in range(n):
        if not inside[i].any():
            margin[i] = -np.inf
        else:
            other = sims[i, ~inside[i]].max() if not inside[i].all() else -np.inf
            margin[i] = sims[i, inside[i]].min() - other
    return margin


def _reference_border_nodes(margin, count):
    """border_nodes' selection as it was: a full stable argsort of the margins."""
    return np.sort(np.argsort(margin, kind="stable")[:count]).astype(np.int64)


def _save(path, array):
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def test_merge_shard_files_equals_the_in_ram_merge(tmp_path):
    rng = np.random.default_rng(7)
    n, d, k = 2500, 16, 5
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    member = _random_member(rng, n, k)
    X = _save(tmp_path / "vectors.npy", x.astype(np.float16))
    M = _save(tmp_path / "member.npy", member)
    shards, on_disk = [], []
    for s, ids in enumerate(_shard_ids(member, k)):
        R_s = 8 if s % 2 else 10  # shards of different widths
        nb, dg, _ = build_vamana(x[ids], R_s, 16, 1.2, seed=s, threads=2, progress=False)
        shards.append((ids, nb, dg))
        on_disk.append((_save(tmp_path / f"ids{s}.npy", ids), _save(tmp_path / f"nb{s}.npy", nb),
                        _save(tmp_path / f"dg{s}.npy", dg)))
    R = 8
    want_nb, want_dg = _reference_merge(x.astype(np.float16), shards, R, 1.2)
    assert (want_dg[(member < 0).all(axis=1)] == 0).all() and want_dg.max() == R
    got_nb, got_dg = merge_shard_graphs(x, shards, R, 1.2, threads=2)
    assert np.array_equal(got_nb, want_nb) and np.array_equal(got_dg, want_dg)
    for block in (777, 1000, n + 5):  # blocks that do not divide N, and one block for all
        nb_out = np.lib.format.open_memmap(tmp_path / f"out{block}.npy", "w+", np.int32, (n, R))
        dg_out = np.lib.format.open_memmap(tmp_path / f"deg{block}.npy", "w+", np.int32, (n,))
        merge_shard_files(X, M, on_disk, R, 1.2, nb_out, dg_out, threads=2, block=block)
        nb_out.flush()
        dg_out.flush()
        assert np.array_equal(np.load(tmp_path / f"out{block}.npy"), want_nb), block
        assert np.array_equal(np.load(tmp_path / f"deg{block}.npy"), want_dg), block

    # a member array that disagrees with the shards' ids is refused
    bad = member.copy()
    row = int(np.flatnonzero(bad[:, 1] >= 0)[0])
    bad[row, 1] = -1
    with pytest.raises(ValueError, match="member"):
        merge_shard_files(X, bad, on_disk, R, 1.2, np.empty((n, R), np.int32), np.empty(n, np.int32), block=600)
    with pytest.raises(ValueError, match="member"):
        merge_shard_files(X, np.roll(member, 1, axis=0), on_disk, R, 1.2, np.empty((n, R), np.int32),
                          np.empty(n, np.int32))


def test_border_nodes_from_member_equals_the_per_shard_algorithm():
    rng = np.random.default_rng(3)
    n, d, k = 1500, 12, 6
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[100:160] = x[40]  # equal vectors with equal shards: tied margins, taken by id
    x[700] = 0.0  # a zero vector: margin 0 - 0
    member = _random_member(rng, n, k)
    member[100:160] = member[40]
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    shards = _shard_ids(member, k)
    x16 = x.astype(np.float16)
    margin = _reference_margins(x16, centroids, shards)
    assert (margin[100:160] == margin[40]).all() and np.isneginf(margin[(member < 0).all(axis=1)]).all()
    before = int((margin < margin[40]).sum())
    for count in (0, 1, 30, 150, 375, before + 30, 750, 1455, 1499, 1500):
        fraction = count / n
        want = _reference_border_nodes(margin, count)
        for block in (333, 65536):
            got = border_nodes(x16, centroids, member, fraction, block=block)
            assert got.dtype == np.int64 and np.array_equal(got, want), (count, block)
    # a count that cuts through the 61 tied nodes takes the lowest ids among them
    got = border_nodes(x16, centroids, member, (before + 30) / n, block=500)
    assert np.intersect1d(got, np.r_[40, 100:160]).tolist() == [40, *range(100, 129)]
    # a single shard: all nodes
    assert np.array_equal(border_nodes(x16, centroids[:1], np.zeros((n, 1), np.int32), 0.1), np.arange(n))
    # the small hand-checked case (margins 1, 1.41, 1, 0.9, 1.2 -> 3, then 0 and 2 tied by id)
    xs = np.array([[1, 0], [0.7, 0.7], [0, 1], [-1, 0.1], [0.6, -0.8]], np.float32)
    cs = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    m = member_from_shards([np.array([0, 1, 4]), np.array([1, 2]), np.array([3])], 5)
    assert border_nodes(xs, cs, m, 0.6).tolist() == [0, 2, 3]
    m = member_from_shards([np.array([0, 1]), np.array([1, 2]), np.array([3])], 5)
    assert border_nodes(xs, cs, m, 0.2).tolist() == [4]  # in no shard: nearest


MEMORY_CHILD = r"""
import json, sys
import numpy as np
from memescale.index.merge import border_nodes, merge_shard_files, merge_shard_graphs
from memescale.memwatch import PeakRssAnon

work, k = sys.argv[1], int(sys.argv[2])
X = np.load(work + "/vectors.npy", mmap_mode="r")
member = np.load(work + "/member.npy", mmap_mode="r")
centroids = np.load(work + "/centroids.npy")
shards = [tuple(np.load(f"{work}/{name}{s}.npy", mmap_mode="r") for name in ("ids", "nb", "dg")) for s in range(k)]
n = len(X)
R = shards[0][1].shape[1]
nb_out = np.lib.format.open_memmap(work + "/merged.npy", "w+", np.int32, (n, R))
dg_out = np.lib.format.open_memmap(work + "/degrees.npy", "w+", np.int32, (n,))

# warm up: compile/load the kernels on a few nodes before measuring
small = [(np.arange(4), np.array([[1, 2], [0, 2], [0, 1], [0, 1]], np.int32), np.full(4, 2, np.int32))]
merge_shard_graphs(np.asarray(X[:4], np.float32), small, 1, 1.2, threads=2)
border_nodes(X[:64], centroids, member[:64], 0.5)

with PeakRssAnon(interval_s=0.002) as merge_mem:
    merge_shard_files(X, member, shards, R, 1.2, nb_out, dg_out, threads=2)
with PeakRssAnon(interval_s=0.002) as border_mem:
    points = border_nodes(X, centroids, member, 0.25)
nb_out.flush()
dg_out.flush()
np.save(work + "/points.npy", points)
print(json.dumps({"merge": merge_mem.growth_bytes, "border": border_mem.growth_bytes}))
"""


def write_memory_case(folder, n: int = 300_000, d: int = 32, k: int = 8, R_s: int = 16) -> None:
    """FOLDER/vectors.npy (n, d) fp16, member.npy (n, 2) int32, centroids.npy, and per shard s
    ids{s}.npy, nb{s}.npy, dg{s}.npy: random valid graphs (distinct neighbours, never the node
    itself, degrees R_s / 2 .. R_s)."""
    rng = np.random.default_rng(0)
    X = np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float16, (n, d))
    for lo in range(0, n, 100_000):
        X[lo:lo + 100_000] = rng.standard_normal((min(n, lo + 100_000) - lo, d))
    X.flush()
    del X
    member = np.sort(np.argsort(rng.random((n, k)), axis=1)[:, :2], axis=1).astype(np.int32)
    np.save(folder / "member.npy", member)
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    np.save(folder / "centroids.npy", centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    for s, ids in enumerate(_shard_ids(member, k)):
        m = len(ids)
        steps = np.sort(rng.integers(0, m - R_s, (m, R_s)), axis=1) + np.arange(R_s)[None, :]  # increasing < m - 1
        nb = ((np.arange(m)[:, None] + 1 + steps) % m).astype(np.int32)
        deg = rng.integers(R_s // 2, R_s + 1, m).astype(np.int32)
        nb[np.arange(R_s)[None, :] >= deg[:, None]] = -1
        np.save(folder / f"ids{s}.npy", ids)
        np.save(folder / f"nb{s}.npy", nb)
        np.save(folder / f"dg{s}.npy", deg)


def test_merge_and_border_nodes_memory_is_bounded(tmp_path):
    """RssAnon growth while merging N nodes' shard graphs from disk and picking border nodes
    stays within 64 MiB plus 24 bytes per node (the merged lists of all nodes in RAM, 128 B
    per node here, or the outputs themselves, 68 B, would exceed it at this N)."""
    n, k, R_s = 300_000, 8, 16
    write_memory_case(tmp_path, n, 32, k, R_s)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(k)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    limit = (64 << 20) + 24 * n
    assert res["merge"] < limit and res["border"] < limit, res
    merged = np.load(tmp_path / "merged.npy", mmap_mode="r")
    deg = np.load(tmp_path / "degrees.npy", mmap_mode="r")
    assert deg.min() >= 1 and deg.max() <= R_s
    rows = merged[:1000]
    assert ((rows >= 0).sum(axis=1) == deg[:1000]).all() and (rows < n).all()
    assert not (rows == np.arange(1000)[:, None]).any()
    points = np.load(tmp_path / "points.npy")
    assert points.size == n // 4 and (np.diff(points) > 0).all()


def test_interleaved_merge_takes_the_shard_lists_in_turn_and_reads_no_vector(tmp_path):
    """merge="interleave": each node's lists from its shards taken position by position
    (first entries, then second entries, ...), without repeats or the node itself, up to R,
    at any block size and thread count; the vectors are never read (a file of NaN rows here)."""
    rng = np.random.default_rng(5)
    n, d, k, R = 2000, 8, 4, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    member = _random_member(rng, n, k)
    shards = []
    for s, ids in enumerate(_shard_ids(member, k)):
        nb, dg, _ = build_vamana(x[ids], 8 if s % 2 else 10, 16, 1.2, seed=s, threads=1, progress=False)
        shards.append((ids, nb, dg))
    want = np.full((n, R), -1, np.int32)
    want_deg = np.zeros(n, np.int32)
    lists: dict[int, list[list[int]]] = {i: [] for i in range(n)}
    for ids, nb, dg in shards:  # shards in increasing order, as each node's lists are laid out
        for j, i in enumerate(ids.tolist()):
            lists[i].append([int(ids[v]) for v in nb[j, :dg[j]]])
    for i in range(n):
        row: list[int] = []
        for t in range(max((len(lst) for lst in lists[i]), default=0)):
            for lst in lists[i]:
                if t < len(lst) and lst[t] != i and lst[t] not in row and len(row) < R:
                    row.append(lst[t])
        want[i, :len(row)] = row
        want_deg[i] = len(row)
    nan_rows = np.lib.format.open_memmap(tmp_path / "v.npy", "w+", np.float16, (n, d))
    nan_rows[:] = np.nan
    for threads, block in ((1, n), (3, 333)):
        out, deg = np.empty((n, R), np.int32), np.empty(n, np.int32)
        merge_shard_files(nan_rows, member, shards, R, 1.2, out, deg, threads=threads, block=block, mode="interleave")
        assert np.array_equal(out, want) and np.array_equal(deg, want_deg)
    assert (want_deg[(member >= 0).sum(axis=1) == 2] == R).mean() > 0.9
    with pytest.raises(ValueError, match="merge mode"):
        merge_shard_files(nan_rows, member, shards, R, 1.2, out, deg, mode="union")
