"""PQ codec: encode/decode error bounds, ADC consistency, save/load, query-aware training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import shared_path

from memescale.index import IndexFormatError, PQCodec, query_weighted_error, train_pq
from memescale.index.kernels import exact_topk
from memescale.index.pq import (
    ETA_CHOICES,
    ETA_HOLDOUT,
    ETA_MARGIN,
    ETA_MIN_HOLDOUT,
    SCORE_AWARE_ETA,
    adc_score,
    choose_eta,
    fit_query_predictor,
    split_queries,
)


def clustered(n: int, d: int, centres: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(centres, size=n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pq_is_exact_when_subspaces_have_few_distinct_values():
    X = clustered(3000, 32, 40)
    codec = train_pq(X, 8, opq_iters=0, kmeans_iters=20, train_size=3000, threads=2, progress=False)
    codes = codec.encode(X, threads=2)
    assert codes.shape == (3000, 8) and codes.dtype == np.uint8
    np.testing.assert_allclose(codec.decode(codes), X, atol=1e-4)


@pytest.mark.parametrize("opq_iters, with_queries", [(0, False), (3, False), (3, True)])
def test_pq_error_bounds_and_adc(opq_iters, with_queries):
    rng = np.random.default_rng(1)
    X = clustered(4000, 48, 300, noise=0.3)
    Q = clustered(300, 48, 20, seed=2, noise=0.5)
    codec = train_pq(X, 12, queries=Q if with_queries else None, opq_iters=opq_iters, kmeans_iters=8,
                     train_size=2000, threads=2, progress=False)
    np.testing.assert_allclose(codec.base_transform @ codec.query_transform.T, np.eye(48), atol=1e-4)
    codes = codec.encode(X, threads=2)
    Xh = codec.decode(codes)
    # quantisation keeps most of the signal: residual energy well below the data's
    assert ((X - Xh) ** 2).sum(1).mean() < 0.35 * (X**2).sum(1).mean()
    # ADC scores are exactly q . x_hat, and |q . x - ADC| <= |q B| |x A - x_hat A| (Cauchy-Schwarz)
    qs = rng.standard_normal((5, 48)).astype(np.float32)
    adc = codec.scores(qs, codes)
    np.testing.assert_allclose(adc, qs @ Xh.T, atol=2e-4)
    qn = np.linalg.norm(qs @ codec.query_transform, axis=1)[:, None]
    yerr = np.linalg.norm(X @ codec.base_transform - Xh @ codec.base_transform, axis=1)[None, :]
    assert (np.abs(qs @ X.T - adc) <= qn * yerr + 1e-4).all()


def test_codec_save_load_round_trip(tmp_path):
    X = clustered(1000, 16, 50, noise=0.2)
    codec = train_pq(X, 4, opq_iters=2, kmeans_iters=4, threads=1, progress=False)
    codec.save(tmp_path / "codec.bin")
    back = PQCodec.load(tmp_path / "codec.bin")
    for a, b in zip(codec.to_arrays().values(), back.to_arrays().values()):
        np.testing.assert_array_equal(a, b)
    raw = bytearray((tmp_path / "codec.bin").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "codec.bin").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="codec.bin.*checksum"):
        PQCodec.load(tmp_path / "codec.bin")


def test_query_aware_pq_beats_plain_pq_on_ood_queries():
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:10000]
    ood = np.load(shared_path("ann", "pypi-minilm", "queries_ood.npy"))
    train_q, eval_q = ood[:1000], ood[1000:]  # disjoint query samples
    plain = train_pq(base, 48, opq_iters=0, kmeans_iters=10, train_size=10000, threads=2, progress=False)
    aware = train_pq(base, 48, queries=train_q, opq_iters=10, kmeans_iters=10, train_size=10000, threads=2,
                     progress=False)
    e_plain = query_weighted_error(plain, base, eval_q)
    e_aware = query_weighted_error(aware, base, eval_q)
    assert e_aware < 0.8 * e_plain, (e_aware, e_plain)


def test_score_aware_encoding_lowers_the_error_on_each_querys_best_vectors():
    """eta > 1 trades error along each vector's own direction for error across it: the ADC
    scores of every query's true top-10 (the ones navigation must rank right) get closer."""
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:10000].astype(np.float32)
    ood = np.load(shared_path("ann", "pypi-minilm", "queries_ood.npy"))[:300].astype(np.float32)
    codec = train_pq(base, 24, opq_iters=4, kmeans_iters=8, train_size=10000, threads=2, progress=False)
    exact = ood @ base.T
    top = np.argsort(-exact, axis=1)[:, :10]
    rows = np.arange(len(ood))[:, None]
    errors = {}
    for eta in (1.0, 4.0):
        adc = codec.scores(ood, codec.encode(base, threads=2, eta=eta))
        errors[eta] = float(np.abs(adc[rows, top] - exact[rows, top]).mean())
    assert errors[4.0] < 0.8 * errors[1.0], errors


def test_query_predictor_learns_where_the_queries_of_a_vector_lie():
    """Queries planted at 0.8 x + g around base vectors x: the fitted h(x) = x P + b lands
    nearer each vector's query than x does by far, and the codec saves and loads it."""
    rng = np.random.default_rng(4)
    X = clustered(5000, 16, 200, noise=0.3)
    g = rng.standard_normal(16).astype(np.float32) * 0.3
    picks = rng.choice(len(X), 800, replace=False)
    Q = 0.8 * X[picks] + g + 0.02 * rng.standard_normal((800, 16)).astype(np.float32)
    P = fit_query_predictor(X, Q, np.random.default_rng(0), k=1, ridge=0.01)
    assert P.shape == (17, 16) and P.dtype == np.float32
    h = X[picks] @ P[:16] + P[16]
    assert ((h - Q) ** 2).sum(1).mean() < 0.15 * ((X[picks] - Q) ** 2).sum(1).mean()
    codec = train_pq(X, 4, queries=Q, opq_iters=1, kmeans_iters=2, threads=1, progress=False)
    assert codec.query_predictor is not None
    assert PQCodec.from_arrays(codec.to_arrays()).query_predictor.shape == (17, 16)
    assert train_pq(X, 4, opq_iters=1, kmeans_iters=2, threads=1, progress=False).query_predictor is None


def test_query_aware_encoding_lowers_the_error_on_ood_queries_best_vectors():
    """Score-aware codes along the predicted query direction rank held-out OOD queries' true
    top-10 better than codes along each vector's own direction, with the same codebooks."""
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:10000].astype(np.float32)
    ood = np.load(shared_path("ann", "pypi-minilm", "queries_ood.npy")).astype(np.float32)
    train_q, eval_q = ood[:1000], ood[1000:1300]
    codec = train_pq(base, 24, queries=train_q, opq_iters=4, kmeans_iters=8, train_size=10000, threads=2,
                     progress=False)
    exact = eval_q @ base.T
    top = np.argsort(-exact, axis=1)[:, :10]
    rows = np.arange(len(eval_q))[:, None]
    errors = {}
    for name, c in (("predicted", codec), ("own", dataclasses.replace(codec, query_predictor=None))):
        adc = c.scores(eval_q, c.encode(base, threads=2, eta=SCORE_AWARE_ETA))
        errors[name] = float(((adc[rows, top] - exact[rows, top]) ** 2).mean())
    assert errors["predicted"] < 0.85 * errors["own"], errors


def _reference_score_aware(Y, Z, cent, eta, sweeps):
    """The coordinate descent of `pq._score_aware`, written plainly in float64."""
    M, K, dsub = cent.shape
    codes = np.empty((len(Y), M), np.uint8)
    for i, (y, z) in enumerate(zip(Y.astype(np.float64), Z.astype(np.float64))):
        ys, zs = y.reshape(M, dsub), z.reshape(M, dsub)
        c = np.array([np.argmin(((cent[m] - ys[m]) ** 2).sum(1)) for m in range(M)])
        w = (eta - 1.0) / (z @ z)
        for _ in range(sweeps):
            for m in range(M):
                r = ys - cent[np.arange(M), c]
                others = np.delete(np.arange(M), m)
                rr, rz = (r[others] ** 2).sum(), (r[others] * zs[others]).sum()
                cand = ys[m] - cent[m]  # (K, dsub): r_m for each candidate
                loss = rr + (cand ** 2).sum(1) + w * (rz + cand @ zs[m]) ** 2
                if loss.min() < loss[c[m]] - 1e-9:
                    c[m] = int(np.argmin(loss))
        codes[i] = c
    return codes


def test_score_aware_codes_follow_the_plain_coordinate_descent_at_any_thread_count():
    """The GEMM-fed kernel (y.c and z.c for every centroid, then the losses from running sums)
    picks the codes a plain float64 coordinate descent picks, lowers the weighted loss below
    the nearest codes', and does not depend on the thread count."""
    from concurrent.futures import ThreadPoolExecutor

    from memescale.index.pq import SCORE_AWARE_ROWS, assign_subspaces, score_aware_codes

    rng = np.random.default_rng(7)
    M, K, dsub, n = 6, 256, 5, 3 * SCORE_AWARE_ROWS + 11
    cent = rng.standard_normal((M, K, dsub)).astype(np.float32)
    Y = rng.standard_normal((n, M * dsub)).astype(np.float32)
    Z = (Y + 0.5 * rng.standard_normal((n, M * dsub))).astype(np.float32)
    got = score_aware_codes(Y, Z, cent, 4.0, 2)
    want = _reference_score_aware(Y, Z, cent.astype(np.float64), 4.0, 2)
    assert (got == want).mean() >= 0.995
    with ThreadPoolExecutor(3) as pool:
        assert np.array_equal(score_aware_codes(Y, Z, cent, 4.0, 2, pool), got)
    assert np.array_equal(score_aware_codes(Y, Z, cent, 4.0, 0), assign_subspaces(Y, cent, 1)[0])

    def loss(codes):
        r = Y - np.concatenate([cent[m][codes[:, m]] for m in range(M)], axis=1)
        return float(((r ** 2).sum(1) + 3.0 * (r * Z).sum(1) ** 2 / (Z ** 2).sum(1)).mean())

    assert loss(got) < 0.9 * loss(assign_subspaces(Y, cent, 1)[0])


@pytest.mark.parametrize("M", [1, 5, 8, 48, 72])
def test_adc_score_sums_one_table_entry_per_subspace(M):
    from numba import njit

    @njit(cache=False)
    def all_scores(table, codes):
        out = np.empty(codes.shape[0], np.float32)
        for u in range(codes.shape[0]):
            out[u] = adc_score(table, codes, u)
        return out

    rng = np.random.default_rng(M)
    table = rng.standard_normal((M, 256)).astype(np.float32)
    codes = rng.integers(0, 256, (300, M), dtype=np.uint8)
    codes[0] = 255  # the largest code: an unsigned index, never read as negative
    want = table[np.arange(M)[None, :], codes].astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(all_scores(table, codes), want, rtol=1e-5, atol=1e-4)



def _gap_set(d: int = 128, nq: int = 400, seed: int = 1):
    """Clustered unit "images" and "texts" made from other images through a fixed random map
    plus noise (the cross-modal case, small): base (8000, d), training texts (nq, d), fresh
    texts (600, d)."""
    X = clustered(8000 + nq + 600, d, 64, noise=0.8, seed=seed)
    rng = np.random.default_rng(seed + 1)
    G = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)

    def texts(s: np.ndarray) -> np.ndarray:
        t = 0.3 * s + 0.3 * s @ G.T + 0.9 * rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(d)
        return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)

    return X[:8000], texts(X[8000:8000 + nq]), texts(X[-600:])


def _ranked_in_top(codec: PQCodec, base: np.ndarray, queries: np.ndarray, eta: float, width: int = 40) -> float:
    """Share of each query's exact top-10 among its `width` best ADC scores with codes of `eta`."""
    top, _ = exact_topk(queries, base, 10)
    est = codec.scores(queries, codec.encode(base, threads=2, eta=eta))
    best = np.argpartition(-est, width - 1, axis=1)[:, :width]
    return float(np.mean([len(set(best[i]) & set(top[i])) / 10 for i in range(len(queries))]))


def test_the_chosen_eta_ranks_fresh_cross_modal_queries_better_than_the_fixed_one():
    """The query predictor, fitted on a few hundred texts, points the score-aware codes the
    wrong way for texts it has not seen; the weight chosen on held-out texts ranks fresh ones
    better than SCORE_AWARE_ETA would have, and the codec codes with it by default."""
    base, train_q, fresh = _gap_set()
    codec = train_pq(base, 16, queries=train_q, opq_iters=2, kmeans_iters=6, threads=2, progress=False)
    assert codec.eta in ETA_CHOICES and codec.eta != SCORE_AWARE_ETA
    chosen, fixed = (_ranked_in_top(codec, base, fresh, e) for e in (codec.eta, SCORE_AWARE_ETA))
    assert chosen > fixed + 0.01, (codec.eta, chosen, fixed)
    assert np.array_equal(codec.encode(base[:500], threads=2), codec.encode(base[:500], threads=2, eta=codec.eta))
    again = PQCodec.from_arrays(codec.to_arrays())
    assert again.eta == codec.eta
    older = {k: v for k, v in codec.to_arrays().items() if k != "eta"}  # a codec file from before the choice
    assert PQCodec.from_arrays(older).eta == SCORE_AWARE_ETA


def test_choose_eta_measures_each_choice_on_the_held_out_queries_top_k():
    """The measure of each choice is the share of the queries' exact top-10 (over the drawn
    sample) within its codes' best 10 and 40 ADC scores; the best wins when it beats the
    first choice (the default) by the margin, else the first stays."""
    base, train_q, fresh = _gap_set(d=64, nq=300, seed=3)
    codec = train_pq(base, 8, queries=train_q, opq_iters=1, kmeans_iters=4, threads=2, progress=False)
    eta, ranked = choose_eta(codec, base, fresh[:100], np.random.default_rng(5), sample=3000, threads=2)
    rows = np.sort(np.random.default_rng(5).choice(len(base), size=3000, replace=False))
    sample = base[rows]
    top, _ = exact_topk(fresh[:100], sample, 10)
    assert list(ranked) == list(ETA_CHOICES)
    for e, measure in ranked.items():
        est = codec.scores(fresh[:100], codec.encode(sample, threads=2, eta=e))
        order = np.argsort(-est, axis=1, kind="stable")
        shares = [np.mean([len(set(order[i, :w]) & set(top[i])) / 10 for i in range(100)]) for w in (10, 40)]
        assert measure == pytest.approx(np.mean(shares), abs=0.011), (e, measure, shares)  # ties at the cut aside
    best = max(ranked, key=lambda e: (ranked[e], -list(ETA_CHOICES).index(e)))
    first = ETA_CHOICES[0]
    assert eta == (best if ranked[best] >= ranked[first] + ETA_MARGIN else first), (eta, ranked)
    for margin, expect in ((0.0, best), (1.0, first)):  # no margin: the best; an impossible one: the first
        got, _ = choose_eta(codec, base, fresh[:100], np.random.default_rng(5), sample=3000, margin=margin, threads=2)
        assert got == expect, (margin, got, ranked)


def test_a_small_query_sample_is_not_split():
    """Held out, a quarter of fewer than 4 x ETA_MIN_HOLDOUT queries is too few to choose by:
    every query trains the codec and eta stays SCORE_AWARE_ETA."""
    q = clustered(4 * ETA_MIN_HOLDOUT - 1, 16, 8, seed=6)
    fit, held = split_queries(q, np.random.default_rng(0))
    assert held is None and fit is q
    q = clustered(400, 16, 8, seed=6, noise=0.3)
    fit, held = split_queries(q, np.random.default_rng(0))
    assert len(held) == int(400 * ETA_HOLDOUT) and len(fit) + len(held) == 400
    assert len({r.tobytes() for r in fit} & {r.tobytes() for r in held}) == 0
    X = clustered(3000, 16, 50, noise=0.3)
    codec = train_pq(X, 4, queries=clustered(150, 16, 8, seed=7), opq_iters=1, kmeans_iters=2, threads=1,
                     progress=False)
    assert codec.eta == SCORE_AWARE_ETA


def test_build_info_takes_query_awareness_and_eta_from_the_codec():
    """A consolidation rewrites an index with the codec it has and no query sample: the
    build information must still say the codec is query-aware, with its eta."""
    from memescale.index.build import IndexParams, build_info

    base, train_q, _ = _gap_set(d=32, nq=240, seed=8)
    aware = train_pq(base, 4, queries=train_q, opq_iters=1, kmeans_iters=2, threads=1, progress=False)
    plain = train_pq(base, 4, opq_iters=1, kmeans_iters=2, threads=1, progress=False)
    aware.eta = 2.0
    info = build_info(IndexParams(), aware, generation=3)
    assert info["query_aware"] is True and info["pq_eta"] == 2.0 and info["generation"] == 3
    assert build_info(IndexParams(), plain)["query_aware"] is False
