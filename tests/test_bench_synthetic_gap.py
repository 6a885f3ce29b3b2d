"""bench/ann.py's cross-modal stress set (`--dataset synthetic-gap`): the stated cosines of a
text to its source image, to unrelated images and to the images' centroid; determinism;
exact ground truth in the dataset folder."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ann import GAP_TARGETS, synthetic_gap, write_synthetic_gap


def test_gap_statistics_match_real_caption_image_pairs():
    s = synthetic_gap(4000, 300, block=1024)
    base = s["base"].astype(np.float32)
    texts = s["queries_ood"].astype(np.float32)
    assert base.shape == (4000, 1152) and texts.shape == (300, 1152) and s["queries_id"].shape == (300, 1152)
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=2e-3)
    source = np.einsum("ij,ij->i", texts, s["sources"]).mean()
    unrelated = (texts @ base[:3000].T).mean()
    centroid = base.mean(0)
    centroid /= np.linalg.norm(centroid)
    to_centroid = (texts @ centroid).mean()
    assert source == pytest.approx(GAP_TARGETS["source"], abs=0.02)
    assert 0.15 <= unrelated <= 0.18
    assert to_centroid == pytest.approx(GAP_TARGETS["centroid"], abs=0.03)
    # images sit in a cone (unrelated pairs' mean cosine about 0.3) and a text is closer to
    # its source than to unrelated images, but far less than an image is to its neighbours
    assert 0.2 < (base[:1000] @ base[1000:2000].T).mean() < 0.4
    top_text = (texts @ base.T).max(1).mean()
    top_image = (s["queries_id"].astype(np.float32) @ base.T).max(1).mean()
    assert source > unrelated + 0.1 and top_text < top_image - 0.2


def test_gap_set_is_seeded_and_prefix_stable(tmp_path):
    a, b = synthetic_gap(3000, 40, seed=3, block=512, clusters=256), synthetic_gap(2000, 40, seed=3, block=512, clusters=256)
    np.testing.assert_array_equal(a["base"][:2000], b["base"])
    np.testing.assert_array_equal(a["queries_ood"], b["queries_ood"])
    assert not np.array_equal(synthetic_gap(2000, 40, seed=4, block=512, clusters=256)["queries_ood"], b["queries_ood"])
    write_synthetic_gap(tmp_path, 3000, 40, block=512)
    base = np.load(tmp_path / "base.npy").astype(np.float32)
    for qs in ("id", "ood"):
        q = np.load(tmp_path / f"queries_{qs}.npy").astype(np.float32)
        gt = np.load(tmp_path / f"gt_{qs}.npy")
        assert gt.shape == (40, 100)
        scores = q @ base.T
        np.testing.assert_array_equal(gt[:, :10], np.argsort(-scores, axis=1, kind="stable")[:, :10])
