"""Weighting as extra dimensions: normalisation, the inner-product identity, norm balancing,
persistence, and that weights steer a real index search (not only a re-rank)."""

from __future__ import annotations

import numpy as np
import pytest

from memescale.index.eval import exact_ground_truth, recall_at_k
from memescale.index.weighting import (
    MISSING,
    WEIGHTING_FILE,
    WeightError,
    Weighting,
    apply_quantiles,
    fit_quantiles,
    fit_weighting,
    weight_vectors,
)
from memescale.testing.sample_index import build_sample_index, random_unit_vectors, synthetic_metadata


def test_quantile_normalisation_is_rank_based_and_bounded():
    rng = np.random.default_rng(0)
    v = np.exp(rng.standard_normal(5000) * 3)  # heavy tailed
    xs, levels = fit_quantiles(v)
    q = apply_quantiles(v, xs, levels)
    assert q.dtype == np.float32 and q.min() >= 0 and q.max() <= 1
    assert abs(float(np.median(q)) - 0.5) < 0.01
    order = np.argsort(v)
    assert np.all(np.diff(q[order]) >= -1e-6)  # monotone in the raw value
    # uniform output: each decile holds ~10%
    hist = np.histogram(q, bins=10, range=(0, 1))[0] / v.size
    assert np.all(np.abs(hist - 0.1) < 0.02)


def test_missing_constant_and_ties():
    xs, lv = fit_quantiles(np.array([np.nan, np.nan]))
    assert xs == [] and apply_quantiles(np.array([1.0, np.nan]), xs, lv).tolist() == [MISSING, MISSING]
    xs, lv = fit_quantiles(np.array([3.0, 3.0, 3.0]))
    assert apply_quantiles(np.array([3.0]), xs, lv).tolist() == [0.5]
    xs, lv = fit_quantiles(np.array([0, 0, 0, 0, 1.0]))
    q = apply_quantiles(np.array([0.0, 1.0, np.nan]), xs, lv)
    assert 0 < q[0] < 0.5 and q[1] == 1.0 and q[2] == MISSING


def test_fit_keeps_only_signals_present_and_reads_created_utc_for_recency():
    md = [{"created_utc": 1_600_000_000 + i, "meme": i % 3} for i in range(25)] + [
        {"created_utc": 1_600_000_025 + i, "meme_score": i % 3} for i in range(25)] + [{}]
    w = fit_weighting(md, base_dim=8)
    assert w.names == ("meme", "recency")
    s = w.scores(md)
    assert s.shape == (51, 2)
    assert s[-1].tolist() == [MISSING, MISSING]
    assert s[49, 1] == pytest.approx(1.0) and s[0, 1] == pytest.approx(0.0)
    assert fit_weighting([{"title": "x"}], base_dim=8).names == ()


def test_inner_product_identity_and_balanced_norms():
    n, d = 400, 16
    x = random_unit_vectors(n, d, 1)
    md = synthetic_metadata(n, 1)
    ext, w = weight_vectors(x, md, beta=0.3)
    assert ext.shape == (n, d + 5) and w.dim == d + 5 and w.extra_dims == 5
    norms = np.linalg.norm(ext, axis=1)
    np.testing.assert_allclose(norms, np.sqrt(1 + 4 * 0.3**2), rtol=1e-5)  # all equal: L2 order == IP order
    q = random_unit_vectors(3, d, 2)
    weights = {"meme": 1.5, "recency": -2.0, "useful": 0.25}
    qe = w.extend_queries(q, weights, scale=0.7)
    s = w.scores(md)
    wv = np.array([weights.get(nm, 0.0) for nm in w.names], np.float32)
    expect = q @ x.T + 0.7 * 0.3**2 * (s @ wv)[None, :]
    np.testing.assert_allclose(qe @ ext.T, expect, atol=1e-5)
    # zero weights: plain similarity
    np.testing.assert_allclose(w.extend_queries(q) @ ext.T, q @ x.T, atol=1e-6)


def test_weight_errors():
    w = fit_weighting([{"created_utc": 5}, {"created_utc": 9}], base_dim=4)
    assert w.check_weights({"recency": 1.0, "meme": 0.0}) == {"recency": 1.0}
    with pytest.raises(WeightError, match="without the 'meme' signal"):
        w.check_weights({"meme": 0.5})
    with pytest.raises(WeightError, match="outside"):
        w.check_weights({"recency": 2.5})
    with pytest.raises(WeightError, match="unknown weight"):
        w.check_weights({"funny": 1})
    plain = Weighting(base_dim=4)
    assert plain.dim == 4 and plain.extend_queries(np.ones((1, 4))).shape == (1, 4)
    with pytest.raises(WeightError):
        plain.extend_queries(np.ones((1, 4)), {"recency": 1})


def test_save_load_roundtrip(tmp_path):
    md = synthetic_metadata(100, 3)
    w = fit_weighting(md, base_dim=8, beta=0.15)
    w.save(tmp_path)
    assert (tmp_path / WEIGHTING_FILE).exists()
    back = Weighting.load(tmp_path)
    assert back == w
    x = random_unit_vectors(100, 8, 3)
    np.testing.assert_array_equal(back.extend_base(x, md), w.extend_base(x, md))
    plain = Weighting.load(tmp_path / "missing-dir-is-fine", base_dim=8)
    assert plain.names == () and plain.dim == 8


def test_weights_steer_the_index_traversal(tmp_path):
    """With recency at +2 the top results of a real index search are newer than without, and
    they are what an exact search over the extended vectors returns."""
    from memescale.index import Index

    n, d = 600, 32
    x = random_unit_vectors(n, d, 5)
    md = synthetic_metadata(n, 5)
    _, w = build_sample_index(tmp_path / "idx", x, md, beta=0.3)
    ext = w.extend_base(x, md)
    q = random_unit_vectors(8, d, 6)
    created = np.array([m["created_utc"] for m in md])
    with Index.open(tmp_path / "idx", threads=1) as index:
        plain_ids, _, _ = index.search(w.extend_queries(q), k=10, L=64)
        qe = w.extend_queries(q, {"recency": 2.0})
        ids, _, _ = index.search(qe, k=10, L=64)
    exact, _ = exact_ground_truth(ext, qe, 10)
    assert recall_at_k(ids, exact, 10) >= 0.9
    assert np.median(created[ids]) > np.median(created[plain_ids])
