"""Balanced partition: hard caps, overlap, cohesion next to plain k-means."""

from __future__ import annotations

import numpy as np
import pytest

from memescale.index.partition import (
    Partition,
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


def test_partition_save_load_round_trip(tmp_path):
    x = _mixture(n=800)
    part = assign_shards(x, balanced_kmeans(x, 4, seed=0))
    part.save(tmp_path / "partition.npz")
    back = Partition.load(tmp_path / "partition.npz")
    assert np.array_equal(back.centroids, part.centroids) and len(back.shards) == 4
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(back.shards, part.shards))
    assert [p.name for p in tmp_path.iterdir()] == ["partition.npz"]
