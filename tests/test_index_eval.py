"""recall@k and blockwise exact ground truth (memescale.index.eval)."""

from __future__ import annotations

import numpy as np
import pytest

from memescale.index.eval import exact_ground_truth, recall_at_k


def test_recall_on_hand_made_cases():
    gt = np.array([[1, 2, 3, 9], [4, 5, 6, 9]])
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), gt, 3) == 1.0
    assert recall_at_k(np.array([[3, 1, 2], [6, 4, 5]]), gt, 3) == 1.0  # order does not matter
    assert recall_at_k(np.array([[1, 7, 8], [7, 8, 0]]), gt, 3) == pytest.approx(1 / 6)
    assert recall_at_k(np.array([[1, 2, 9], [4, 9, 9]]), gt, 3) == pytest.approx(3 / 6)  # 9 is past gt[:, :3]
    # only the first k columns of either side count
    assert recall_at_k(np.array([[1, 2, 7, 3], [4, 5, 6, 0]]), gt, 2) == 1.0
    assert recall_at_k(np.array([[7, 1], [4, 7]]), gt, 1) == 0.5


def test_recall_ignores_padding_and_repeats():
    gt = np.array([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(np.array([[0, -1, -1], [-1, -1, -1]]), gt, 3) == pytest.approx(1 / 6)
    assert recall_at_k(np.array([[0, 0, 0], [3, 3, 4]]), gt, 3) == pytest.approx(3 / 6)
    # a -1 in the ground truth (k > N) is not matched by -1 padding in found
    assert recall_at_k(np.array([[0, 1, -1]]), np.array([[0, 1, -1]]), 3) == pytest.approx(2 / 3)
    assert recall_at_k(np.zeros((0, 5), np.int64), np.zeros((0, 5), np.int64), 5) == 0.0


def test_recall_accepts_mixed_integer_dtypes_and_blocks():
    rng = np.random.default_rng(0)
    gt = np.stack([rng.permutation(50)[:10] for _ in range(37)]).astype(np.int32)
    found = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(50, 100, gt.shape)).astype(np.int64)
    expected = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), gt.tolist())])
    assert recall_at_k(found, gt, 10) == pytest.approx(expected)
    assert recall_at_k(found, gt, 10, query_block=4) == pytest.approx(expected)


@pytest.mark.parametrize("found, gt, k", [
    (np.zeros((2, 3)), np.zeros((3, 3)), 3),  # row counts differ
    (np.zeros((2, 2)), np.zeros((2, 3)), 3),  # found narrower than k
    (np.zeros((2, 3)), np.zeros((2, 2)), 3),  # gt narrower than k
    (np.zeros((2, 3)), np.zeros((2, 3)), 0),
    (np.zeros(3), np.zeros(3), 1),
])
def test_recall_rejects_bad_shapes(found, gt, k):
    with pytest.raises(ValueError):
        recall_at_k(found, gt, k)


def _brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = queries.astype(np.float32) @ np.asarray(base, np.float32).T
    ids = np.stack([np.lexsort((np.arange(s.shape[1]), -row))[:k] for row in s])
    return ids, np.take_along_axis(s, ids, 1)


@pytest.mark.parametrize("block_rows, query_rows", [(97, 1024), (97, 7), (5, 3), (5000, 1024)])
def test_blockwise_ground_truth_on_a_memmap_is_brute_force(tmp_path, block_rows, query_rows):
    rng = np.random.default_rng(1)
    n, d, nq, k = 1000, 24, 40, 10  # 1000 % 97 != 0; 5 < k: blocks narrower than the top-k
    x = rng.standard_normal((n, d)).astype(np.float16)
    np.save(tmp_path / "base.npy", x)
    base = np.load(tmp_path / "base.npy", mmap_mode="r")
    assert isinstance(base, np.memmap)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    ids, scores = exact_ground_truth(base, q, k, block_rows=block_rows, query_rows=query_rows)
    want_ids, want_scores = _brute_force(x, q, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == (nq, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ties_go_to_the_lower_id_across_blocks():
    # 30 rows repeating three distinct vectors: every query's scores tie in groups of ten
    # (small integers, so every dot product is exact whichever way BLAS sums it)
    rng = np.random.default_rng(2)
    distinct = rng.integers(-3, 4, (3, 8)).astype(np.float32)
    base = np.repeat(distinct, 10, axis=0)[rng.permutation(30)]
    q = rng.integers(-3, 4, (6, 8)).astype(np.float32)
    for block_rows in (4, 7, 30):
        ids, _ = exact_ground_truth(base, q, 12, block_rows=block_rows)
        np.testing.assert_array_equal(ids, _brute_force(base, q, 12)[0])


def test_k_larger_than_the_base_pads():
    base = np.eye(3, 4, dtype=np.float32)
    q = np.array([[0.0, 1.0, 0.5, 0.0]], np.float32)
    ids, scores = exact_ground_truth(base, q, 5, block_rows=2)
    np.testing.assert_array_equal(ids, [[1, 2, 0, -1, -1]])
    np.testing.assert_array_equal(scores, [[1.0, 0.5, 0.0, -np.inf, -np.inf]])


def test_ground_truth_rejects_mismatched_widths():
    with pytest.raises(ValueError):
        exact_ground_truth(np.zeros((4, 3), np.float32), np.zeros((2, 5), np.float32), 2)
