"""An index with extra weight dimensions (weighting.json) answers plain model-dimension
queries: `Index.search` and `python -m memescale.index search` extend them with neutral
weights, so they rank exactly as full-width zero-weight queries and score the plain
inner products."""

from __future__ import annotations

import numpy as np
import pytest

from memescale.index import Index, IndexParams
from memescale.index.__main__ import main as cli
from memescale.index.disk import IndexFormatError
from memescale.index.weighting import WEIGHTING_FILE, build_weighted_index

N, D = 1500, 24


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, D)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    meta = [{"created_utc": 1_600_000_000 + int(rng.integers(0, 10**7)), "meme": float(rng.random())}
            for _ in range(N)]
    out = tmp_path_factory.mktemp("weighted")
    _, w = build_weighted_index(X, meta, out, IndexParams(R=16, L=32, pq_bytes=8, threads=2, opq_iters=2,
                                                          pq_train_size=1500, progress=False))
    Q = rng.standard_normal((40, D)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return out, w, X, Q


def test_plain_queries_rank_as_neutral_full_width_queries(weighted):
    out, w, X, Q = weighted
    assert w.extra_dims == 3 and w.dim == D + 3  # meme, recency, the balancing column
    with Index.open(out, threads=1) as index:
        assert index.dim == D + 3 and index.weighting == w
        ids, scores, _ = index.search(Q, 10, 64)
        full_ids, full_scores, _ = index.search(w.extend_queries(Q), 10, 64)
        stored = index.vectors(ids.ravel()).astype(np.float32)[:, :D].reshape(len(Q), 10, D)
    np.testing.assert_array_equal(ids, full_ids)
    np.testing.assert_array_equal(scores, full_scores)
    # neutral weights: the scores are the plain inner products with the stored base vectors
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", Q, stored), rtol=0, atol=1e-3)
    # and the results are the true plain top-10 for almost every query
    true = np.argsort(-(Q @ X.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), true.tolist(), strict=True)])
    assert recall >= 0.9


def test_other_widths_fail_naming_both_accepted_widths(weighted):
    out, _, _, Q = weighted
    with Index.open(out, threads=1) as index, pytest.raises(ValueError) as e:
        index.search(Q[:, :-1], 10, 32)
    assert str(e.value) == (f"queries have dimension {D - 1}, the index has {D + 3} "
                            f"(or {D}: model embeddings, extended with neutral weights)")


def test_cli_search_takes_plain_queries(weighted, tmp_path, capsys):
    out, w, _, Q = weighted
    np.save(tmp_path / "q.npy", Q)
    assert cli(["search", "--index", str(out), "--queries", str(tmp_path / "q.npy"), "--k", "5", "--L", "64",
                "--threads", "1", "--out", str(tmp_path / "ids.npy")]) == 0
    with Index.open(out, threads=1) as index:
        expect, _, _ = index.search(w.extend_queries(Q), 5, 64)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expect)


def test_a_weighting_that_does_not_match_the_records_is_a_format_error(weighted, tmp_path):
    import shutil

    out, w, _, _ = weighted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / WEIGHTING_FILE).write_text((copy / WEIGHTING_FILE).read_text().replace(f'"base_dim": {D}',
                                                                                 f'"base_dim": {D + 1}'))
    with pytest.raises(IndexFormatError, match="weighting.json: describes"):
        Index.open(copy)
    (copy / WEIGHTING_FILE).write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable weighting"):
        Index.open(copy)
