"""Balanced partition: hard caps, overlap, cohesion next to plain k-means."""

from __future__ import annotations

import numpy as np
import pytest

from memescale.index.partition import (
    DiskPartition,
    assign_shards,
    balanced_kmeans,
    capacitated_assign,
    cohesion,
    plain_kmeans_partition,
)


def _mixture(n=6000, d=32, k=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    sizes = rng.dirichlet(np.ones(k) * 0.7) * n  # deliberately unequal clusters
    x = np.concatenate([centers[i] + 0.35 * rng.normal(size=(max(1, int(s)), d)) for i, s in enumerate(sizes)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_every_vector_in_two_shards_under_the_cap():
    x = _mixture()
    cent = balanced_kmeans(x[::3], 8, seed=1)
    part = assign_shards(x, cent, overlap=2, slack=0.05)
    cap = int(np.ceil(2 * len(x) / 8 * 1.05))
    assert part.sizes().max() <= cap
    counts = np.bincount(np.concatenate(part.shards), minlength=len(x))
    assert (counts == 2).all()
    assert all(len(np.unique(s)) == len(s) for s in part.shards)


def test_cohesion_close_to_unconstrained_kmeans_and_far_above_random():
    x = _mixture(seed=3)
    bal = assign_shards(x, balanced_kmeans(x, 8, seed=0))
    plain = plain_kmeans_partition(x, 8)
    rng = np.random.default_rng(0)
    rand_cent = x[rng.choice(len(x), 8, replace=False)]
    rand = assign_shards(x, rand_cent)
    assert cohesion(x, bal) > cohesion(x, plain) - 0.05
    assert cohesion(x, bal) > cohesion(x, rand)
    assert plain.sizes().max() > bal.sizes().max()  # plain k-means is not balanced here


def test_infeasible_assignment_is_refused():
    x = _mixture(n=100)
    with pytest.raises(ValueError, match="cannot place"):
        capacitated_assign(x, x[:4], per_point=2, cap=10)


def test_partition_to_disk_round_trip(tmp_path):
    x = _mixture(n=800)
    part = assign_shards(x, balanced_kmeans(x, 4, seed=0))
    back = DiskPartition.load(part.to_disk(tmp_path / "partition", len(x)).folder)
    assert np.array_equal(back.centroids, part.centroids) and back.k == 4
    assert all(np.array_equal(back.shard_ids(s), part.shards[s]) for s in range(4))
    assert np.array_equal(back.sizes(), part.sizes())


def test_disk_partition_streams_under_the_cap_with_the_in_memory_cohesion(tmp_path):
    """The streamed assignment (blocks of 500 rows; the mixture is ordered by cluster) keeps
    the hard cap, puts every node in exactly 2 distinct shards, and is within 0.01 of the
    in-memory greedy's cohesion on the same centroids."""
    from memescale.index.partition import assign_shards_to_disk

    for seed in (0, 3, 5):
        x = _mixture(seed=seed)
        cent = balanced_kmeans(x[::3], 8, seed=1)
        ram = assign_shards(x, cent, overlap=2, slack=0.05)
        disk = assign_shards_to_disk(x, cent, tmp_path / f"p{seed}", overlap=2, slack=0.05, block=500)
        cap = int(np.ceil(2 * len(x) / 8 * 1.05))
        assert disk.sizes().max() <= cap and disk.k == 8 and disk.sizes().sum() == 2 * len(x)
        member = np.asarray(disk.member)
        assert member.shape == (len(x), 2) and (member[:, 0] < member[:, 1]).all() and member.min() >= 0
        for s in range(8):
            ids = np.asarray(disk.shard_ids(s))
            assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()
            assert np.array_equal(ids, np.nonzero((member == s).any(axis=1))[0])
        assert abs(cohesion(x, disk) - cohesion(x, ram)) < 0.01, (seed, cohesion(x, disk), cohesion(x, ram))
        back = DiskPartition.load(disk.save(tmp_path / f"copy{seed}").folder)
        assert np.array_equal(back.centroids, disk.centroids) and np.array_equal(back.sizes(), disk.sizes())


def test_in_memory_partition_to_disk_round_trip(tmp_path):
    x = _mixture(n=800)
    part = assign_shards(x, balanced_kmeans(x, 4, seed=0))
    disk = part.to_disk(tmp_path / "partition", len(x))
    assert disk.k == 4 and np.array_equal(disk.sizes(), part.sizes())
    assert all(np.array_equal(disk.shard_ids(s), part.shards[s]) for s in range(4))
