"""Kernels and the Vamana graph: fp16 arithmetic, exact search, robust_prune, determinism."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from memescale.index import build_vamana, exact_topk, greedy_search, prune_lists, robust_prune
from memescale.index.kernels import dot_hf, int8_scale, quantize_int8, squared_norms
from memescale.index.vamana import VISIT_TABLE, adc_table, nav_dsub_for, navigation_codes


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_fp16_kernels_match_numpy():
    X = unit_vectors(50, 40)
    q = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    X32 = X.astype(np.float32)
    assert dot_hf(X.view(np.uint16)[3], q) == pytest.approx(float(X32[3] @ q), abs=1e-5)
    norms = np.empty(50, np.float32)
    squared_norms(X.view(np.uint16), 0, 50, norms)
    np.testing.assert_allclose(norms, (X32**2).sum(1), atol=1e-5)
    special = np.array([0.0, -2.5, 65504.0, 6e-8], np.float16)
    got = [dot_hf(special[i : i + 1].view(np.uint16), np.ones(1, np.float32)) for i in range(4)]
    np.testing.assert_array_equal(np.array(got, np.float32), special.astype(np.float32))


def test_exact_topk_is_brute_force():
    X = unit_vectors(1000, 16)
    Q = unit_vectors(7, 16, seed=5).astype(np.float32)
    ids, scores = exact_topk(Q, X, 5, block=300)
    full = Q @ X.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    ids, _ = exact_topk(Q, X[:3], 5)
    assert (ids[:, 3:] == -1).all()


def reachable(neighbours: np.ndarray, degrees: np.ndarray, start: int) -> int:
    seen = {start}
    todo = deque([start])
    while todo:
        u = todo.popleft()
        for v in neighbours[u, : degrees[u]]:
            if v not in seen:
                seen.add(int(v))
                todo.append(int(v))
    return len(seen)


def test_vamana_graph_shape_and_connectivity():
    X = unit_vectors(600, 24)
    nb, deg, medoid = build_vamana(X, R=12, L=24, alpha=1.2, seed=3, threads=2, progress=False)
    assert nb.shape == (600, 12) and nb.dtype == np.int32 and deg.dtype == np.int32
    assert (deg >= 1).all() and (deg <= 12).all()
    for i in range(600):
        row = nb[i, : deg[i]]
        assert (row >= 0).all() and (row < 600).all() and i not in row
        assert len(set(row.tolist())) == len(row)
        assert (nb[i, deg[i] :] == -1).all()
    assert reachable(nb, deg, medoid) == 600


def test_greedy_search_with_L_at_least_N_is_exact():
    X = unit_vectors(300, 16, seed=7)
    nb, deg, medoid = build_vamana(X, R=8, L=16, alpha=1.2, seed=0, threads=1, progress=False)
    Q = unit_vectors(20, 16, seed=8).astype(np.float32)
    gt, _ = exact_topk(Q, X, 10)
    norms = (X.astype(np.float32) ** 2).sum(1)
    vis = np.zeros(VISIT_TABLE, np.int64)
    for i, q in enumerate(Q):
        ids, d, vis = greedy_search(X.view(np.uint16), norms, nb, deg, medoid, q, np.float32(q @ q), 300, vis, i + 1)
        assert len(ids) == 300
        top = ids[np.argsort(d, kind="stable")[:10]]
        assert set(top.tolist()) == set(gt[i].tolist())


def test_robust_prune_keeps_closest_and_respects_alpha():
    X = unit_vectors(200, 8, seed=11)
    X16 = X.view(np.uint16)
    X32 = X.astype(np.float32)
    norms = (X32**2).sum(1)
    p = 0
    cand = np.arange(1, 200, dtype=np.int32)
    d = ((X32[cand] - X32[p]) ** 2).sum(1).astype(np.float32)
    out = np.full(10, -1, np.int32)
    for alpha in (1.0, 1.5):
        deg = robust_prune(X16, norms, cand, d, alpha, 10, out)
        chosen = out[:deg]
        assert 1 <= deg <= 10
        assert chosen[0] == cand[np.argmin(d)]
        # no chosen point is occluded by an earlier chosen one
        for a in range(deg):
            for b in range(a + 1, deg):
                dab = ((X32[chosen[a]] - X32[chosen[b]]) ** 2).sum()
                assert alpha * dab > ((X32[chosen[b]] - X32[p]) ** 2).sum() - 1e-5
    # a larger alpha prunes less: at least as many neighbours kept
    small = robust_prune(X16, norms, cand, d, 1.0, 50, np.empty(50, np.int32))
    large = robust_prune(X16, norms, cand, d, 2.0, 50, np.empty(50, np.int32))
    assert large >= small


def test_build_is_deterministic_across_runs_and_thread_counts():
    X = unit_vectors(1500, 16, seed=2)
    a = build_vamana(X, R=10, L=20, alpha=1.2, seed=5, threads=2, max_batch=200, progress=False)
    b = build_vamana(X, R=10, L=20, alpha=1.2, seed=5, threads=1, max_batch=200, progress=False)
    c = build_vamana(X, R=10, L=20, alpha=1.2, seed=6, threads=2, max_batch=200, progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_int8_quantization_scales_clips_and_streams():
    X = unit_vectors(3000, 64, seed=4).astype(np.float32)
    X[0, 0] = 5.0  # one outlier coordinate saturates instead of coarsening every other one
    s = int8_scale(X)
    assert s < 0.5 / 127
    Q = quantize_int8(X, s, block=700)
    assert Q.dtype == np.int8 and Q.shape == X.shape and Q[0, 0] == 127 and Q.min() >= -127
    inside = np.abs(X) <= 127 * s
    assert inside.mean() > 0.999
    assert np.abs(Q * s - X)[inside].max() <= s / 2 + 1e-7  # rounding, nothing more
    np.testing.assert_array_equal(quantize_int8(X.astype(np.float16), s, block=64),
                                  quantize_int8(X.astype(np.float16).astype(np.float32), s))
    norms = np.empty(3000, np.float32)
    squared_norms(Q, 0, 3000, norms)
    np.testing.assert_allclose(norms, (Q.astype(np.float32) ** 2).sum(1), rtol=1e-6)
    assert dot_hf(Q[1], X[2]) == pytest.approx(float(Q[1].astype(np.float32) @ X[2]), rel=1e-5)


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.25 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def graph_recall(X: np.ndarray, nb: np.ndarray, deg: np.ndarray, medoid: int, Q: np.ndarray, L: int) -> float:
    """recall@10 of greedy search over `nb` with exact fp16 distances."""
    gt, _ = exact_topk(Q, X, 10)
    X16 = X.astype(np.float16)
    norms = (X16.astype(np.float32) ** 2).sum(1)
    vis = np.zeros(VISIT_TABLE, np.int64)
    hits = 0
    for i, q in enumerate(Q):
        ids, d, vis = greedy_search(X16.view(np.uint16), norms, nb, deg, medoid, q, np.float32(q @ q), L, vis, i + 1)
        hits += len(set(ids[np.argsort(d, kind="stable")[:10]].tolist()) & set(gt[i].tolist()))
    return hits / (10 * len(Q))


def test_int8_graph_is_as_good_as_fp16_and_deterministic():
    X = clustered(6000, 16, seed=1)
    Q = clustered(200, 16, seed=2)
    X8 = quantize_int8(X, int8_scale(X))
    g16 = build_vamana(X, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False)
    g8 = build_vamana(X8, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False)
    again = build_vamana(X8, R=16, L=32, alpha=1.2, seed=0, threads=1, progress=False)
    np.testing.assert_array_equal(g8[0], again[0])
    r16 = graph_recall(X, *g16, Q, 40)
    r8 = graph_recall(X, *g8, Q, 40)
    assert r16 > 0.75
    assert r8 >= r16 - 0.02, (r8, r16)


def test_navigation_codes_give_the_distance_to_their_reconstruction():
    X = clustered(3000, 36, seed=3)  # 36 = 4 subspaces of 8 plus 4 zero-padded dimensions
    X8 = quantize_int8(X, int8_scale(X))
    codes, cb_t, cnorm = navigation_codes(X8, dsub=8, seed=1, threads=2)
    assert codes.shape == (3000, 5) and codes.dtype == np.uint8 and cb_t.shape == (5, 8, 256)
    again = navigation_codes(X8, dsub=8, seed=1, threads=1)
    np.testing.assert_array_equal(codes, again[0])
    recon = np.concatenate([cb_t[m].T[codes[:, m]] for m in range(5)], axis=1)[:, :36]  # (N, 36) reconstructions
    q = X8[7].astype(np.float32)
    table = np.empty((5, 256), np.float32)
    adc_table(q, cb_t, cnorm, table)
    adc = (q @ q) + table[np.arange(5), codes].sum(1)
    np.testing.assert_allclose(adc, ((recon - q) ** 2).sum(1), rtol=1e-4, atol=1e-2 * (q @ q))
    exact = ((X8.astype(np.float32) - q) ** 2).sum(1)
    assert np.corrcoef(adc, exact)[0, 1] > 0.95  # a usable ranking, not the exact one
    with pytest.raises(ValueError, match="at least 256"):
        navigation_codes(X8[:200])


def low_rank(n: int, d: int, seed: int, rank: int = 16) -> np.ndarray:
    """Unit vectors in 64 clusters, each a centre plus a rank-`rank` spread and a little noise
    (the shape of real embeddings: a local intrinsic dimension far below d)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    spread = rng.standard_normal((64, rank, d)).astype(np.float32) / np.sqrt(rank)
    r = np.random.default_rng(seed)
    c = r.integers(0, 64, n)
    x = centres[c] + 0.5 * np.einsum("nr,nrd->nd", r.standard_normal((n, rank)).astype(np.float32), spread[c])
    x += 0.05 * r.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_graph_navigated_on_codes_is_as_good_as_exact_and_deterministic():
    n, d = 17_000, 256
    X = low_rank(n, d, seed=4)
    Q = low_rank(300, d, seed=5)
    X8 = quantize_int8(X, int8_scale(X))
    dsub = nav_dsub_for(d, 32)  # index.build_pq_bytes = 32
    assert dsub == 8 and nav_dsub_for(d, 0) == 0 and nav_dsub_for(d, 10_000) == 1
    assert nav_dsub_for(d, 32, n) == 8 and nav_dsub_for(d, 32, 255) == 0  # too few rows for 256 centroids
    nav = build_vamana(X8, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False, nav_dsub=dsub)
    again = build_vamana(X8, R=16, L=32, alpha=1.2, seed=0, threads=1, progress=False, nav_dsub=dsub)
    exact = build_vamana(X8, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False)
    np.testing.assert_array_equal(nav[0], again[0])  # deterministic at any thread count
    assert not np.array_equal(nav[0], exact[0])
    r_nav, r_exact = graph_recall(X, *nav, Q, 12), graph_recall(X, *exact, Q, 12)
    assert r_exact > 0.9
    assert r_nav >= r_exact - 0.02, (r_nav, r_exact)
    with pytest.raises(ValueError, match="nav_dsub"):
        build_vamana(X8[:100], R=8, L=16, nav_dsub=8)


def test_one_pass_build_is_a_deterministic_graph_close_to_two_passes():
    n, d = 6_000, 64
    X = low_rank(n, d, seed=6)
    Q = low_rank(200, d, seed=7)
    one = build_vamana(X, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False, passes=1)
    again = build_vamana(X, R=16, L=32, alpha=1.2, seed=0, threads=1, progress=False, passes=1)
    two = build_vamana(X, R=16, L=32, alpha=1.2, seed=0, threads=2, progress=False)
    np.testing.assert_array_equal(one[0], again[0])
    assert not np.array_equal(one[0], two[0])
    assert ((one[1] >= 1) & (one[1] <= 16)).all()
    r_one, r_two = graph_recall(X, *one, Q, 12), graph_recall(X, *two, Q, 12)
    assert r_two > 0.9 and r_one >= r_two - 0.05, (r_one, r_two)
    with pytest.raises(ValueError, match="passes"):
        build_vamana(X[:100], R=8, L=16, passes=3)


def test_prune_lists_merges_shard_graphs():
    X = unit_vectors(800, 16, seed=12)
    halves = [np.arange(0, 500), np.arange(300, 800)]  # overlapping "shards"
    union = np.full((800, 20), -1, np.int32)
    for s, ids in enumerate(halves):
        nb, deg, _ = build_vamana(X[ids], R=10, L=20, seed=s, threads=2, progress=False)
        glob = np.where(nb >= 0, ids[np.maximum(nb, 0)], -1)
        union[ids, s * 10 : s * 10 + 10] = glob
    neighbours, degrees = prune_lists(X, union, R=10, alpha=1.2, threads=2)
    assert neighbours.shape == (800, 10) and (degrees <= 10).all() and (degrees >= 1).all()
    for i in range(800):
        row = neighbours[i, : degrees[i]]
        assert i not in row and len(set(row.tolist())) == len(row) and (neighbours[i, degrees[i] :] == -1).all()
        assert set(row.tolist()) <= set(union[i][union[i] >= 0].tolist())
    short = np.full((800, 3), -1, np.int32)
    short[:, 0] = (np.arange(800) + 1) % 800
    nb3, deg3 = prune_lists(X, short, R=10)
    assert (deg3 == 1).all() and (nb3[:, 0] == short[:, 0]).all()


def test_batches_are_bounded_whatever_n(monkeypatch):
    """A batch's out-lists and reverse edges take O(batch * R) memory: build and refinement
    never insert more than MAX_BATCH points at once (at N / 50 per batch they would be O(N))."""
    from memescale.index import vamana
    from memescale.index.vamana import refine_graph

    sizes = []
    real = vamana._batches

    def spy(n, max_batch, grow):
        out = real(n, max_batch, grow)
        sizes.extend(hi - lo for lo, hi in out)
        return out

    monkeypatch.setattr(vamana, "MAX_BATCH", 300)
    monkeypatch.setattr(vamana, "_batches", spy)
    X = unit_vectors(2000, 16, seed=8)
    nb, deg, medoid = build_vamana(X, R=8, L=16, threads=2, progress=False)
    refine_graph(X, nb, deg, medoid, L=16, threads=2, progress=False)
    assert sizes and max(sizes) == 300  # N / 50 = 40 would be lifted to 1000 points without the cap
