"""Search through the disk index: exactness, recall on real data, I/O budget, cache, CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from memescale.index import Index, IndexParams, build_index, exact_topk
from memescale.index.__main__ import main
from memescale.index.aio import DirectIOUnavailable
from memescale.index.eval import recall_at_k


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def o_direct_ok(folder: Path) -> bool:
    """Whether files in `folder` can be opened with O_DIRECT (tmpfs, for one, refuses)."""
    probe = folder / "records.bin"
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    X = unit_vectors(500, 24, seed=3)
    build_index(X, None, out, IndexParams(R=12, L=24, pq_bytes=6, threads=2, opq_iters=2, pq_train_size=2000,
                                          progress=False))
    return out, X


def test_L_at_least_N_gives_exact_results(small):
    out, X = small
    Q = unit_vectors(30, 24, seed=9)
    gt_ids, gt_scores = exact_topk(Q, X.astype(np.float16), 10)
    with Index.open(out, threads=2, cache_nodes=0) as index:
        for W in (1, 4, 16):
            ids, scores, stats = index.search(Q, 10, L=len(X), beam_width=W)
            assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (30, 10)
            np.testing.assert_array_equal(ids, gt_ids)
            np.testing.assert_allclose(scores, gt_scores, atol=1e-5)
            assert (stats.reads == len(X)).all()  # every node expanded once, one sector each
            assert (stats.pq_comparisons == len(X)).all()


def test_visited_sets_grow_past_their_first_size(tmp_path):
    """A search that touches every one of 6000 nodes (far past the visited sets' first 4096
    slots, half-full at most) still expands each node exactly once and is exact."""
    X = unit_vectors(6000, 12, seed=8)
    build_index(X, None, tmp_path, IndexParams(R=10, L=20, pq_bytes=4, threads=2, opq_iters=1, pq_train_size=2000,
                                               progress=False))
    Q = unit_vectors(3, 12, seed=12)
    modes = ["mmap", "direct"] if o_direct_ok(tmp_path) else ["mmap"]
    for io in modes:
        with Index.open(tmp_path, threads=1, cache_nodes=0, interleave=2, io=io) as index:
            ids, _, stats = index.search(Q, 10, L=len(X))
            assert (stats.reads == len(X)).all() and (stats.pq_comparisons == len(X)).all()
            np.testing.assert_array_equal(ids, exact_topk(Q, X.astype(np.float16), 10)[0])
            again = index.search(Q, 10, L=30)[0]  # the grown, emptied sets serve the next group
        with Index.open(tmp_path, threads=1) as fresh:
            np.testing.assert_array_equal(again, fresh.search(Q, 10, L=30)[0])


def test_stats_budget_cache_and_threads(small):
    out, X = small
    Q = unit_vectors(40, 24, seed=10)
    with Index.open(out, threads=1, cache_nodes=0, interleave=1) as one, Index.open(out, threads=2, cache_nodes=0) as two:
        a = one.search(Q, 5, L=40)
        b = two.search(Q, 5, L=40)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2].reads, b[2].reads)
        stats = a[2]
        for name in ("reads", "pq_comparisons", "ms"):
            assert stats[name].shape == (40,)
        assert (stats.reads > 0).all() and (stats.pq_comparisons >= stats.reads).all() and (stats.ms > 0).all()
        capped = one.search(Q, 5, L=40, io_budget=7)[2]
        assert (capped.reads <= 7).all()
        ids, scores, _ = one.search(Q, 30, L=40, io_budget=1)
        assert (ids[:, 1:] == -1).all() and np.isneginf(scores[:, 1:]).all()  # one node read: one result
        single = one.search(Q[0], 5, L=40)
        np.testing.assert_array_equal(single[0][0], a[0][0])
    with Index.open(out, threads=2, cache_nodes=0, interleave=3) as grouped:
        ids, scores, stats = grouped.search(Q, 5, L=40)
        np.testing.assert_array_equal(ids, a[0])
        np.testing.assert_array_equal(stats.reads, a[2].reads)
        np.testing.assert_array_equal(grouped.search(Q, 5, L=40, io_budget=7)[2].reads, capped.reads)
    with Index.open(out, threads=2, cache_nodes=len(X)) as cached:
        assert cached.cached_nodes == len(X)
        ids, _, stats = cached.search(Q, 5, L=40)
        np.testing.assert_array_equal(ids, a[0])
        assert (stats.reads == 0).all()


def test_direct_reads_match_mapped_reads(small):
    out, X = small
    Q = unit_vectors(40, 24, seed=11)
    with Index.open(out, threads=2, cache_nodes=0) as mapped:
        want = mapped.search(Q, 5, L=40)
        capped = mapped.search(Q, 5, L=40, io_budget=7)[2]
    try:
        direct = Index.open(out, threads=2, cache_nodes=16, io="direct", interleave=3)
    except DirectIOUnavailable as e:
        pytest.skip(f"no O_DIRECT / native AIO here: {e}")
    with direct:
        for _ in range(2):  # the second call reuses the AIO slots of the first
            ids, scores, stats = direct.search(Q, 5, L=40)
            np.testing.assert_array_equal(ids, want[0])
            np.testing.assert_array_equal(scores, want[1])
        assert (stats.reads <= want[2].reads).all() and stats.reads.sum() < want[2].reads.sum()  # node cache
        ids, _, stats = direct.search(Q, 5, L=len(X), beam_width=16)  # every node, the last sector too
        np.testing.assert_array_equal(ids, exact_topk(Q, X.astype(np.float16), 5)[0])
        assert (stats.reads == len(X) - 16).all()
        assert (direct.search(Q, 5, L=40, io_budget=7)[2].reads <= capped.reads).all()
        assert len(direct._direct._all) <= 2  # one AIO slot per concurrent call, reused
    with pytest.raises(ValueError, match="io must be"):
        Index.open(out, io="uring")


def test_direct_reads_of_a_truncated_file_fail_clearly(small, tmp_path):
    """A record file cut short under an open index: the search raises OSError naming the
    file and the short read (no crash, no wrong answer), and the failed call's slot goes."""
    out, _ = small
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    try:
        index = Index.open(copy, threads=1, cache_nodes=0, io="direct")
    except DirectIOUnavailable as e:
        pytest.skip(f"no O_DIRECT / native AIO here: {e}")
    with index:
        with open(copy / "records.bin", "r+b") as f:
            f.truncate(4096)  # the header sector only
        with pytest.raises(OSError, match="records.bin: read came back short"):
            index.search(unit_vectors(2, 24), 3, L=20)
        assert index._direct._all == []  # the failed call's slot was destroyed, not lent again


def test_direct_reads_refused_where_o_direct_is(small, monkeypatch):
    """A filesystem that refuses O_DIRECT (as tmpfs did before Linux 6.6) gives a clear
    DirectIOUnavailable at open, and the default read path still works there."""
    out, _ = small
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(DirectIOUnavailable, match="cannot open .*records.bin with O_DIRECT: Invalid argument"):
        Index.open(out, io="direct")
    with Index.open(out) as mapped:
        assert mapped.search(unit_vectors(2, 24), 3, L=20)[0].shape == (2, 3)


@pytest.fixture(scope="module")
def minilm_20k(tmp_path_factory):
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:20000]
    qid = np.load(shared_path("ann", "pypi-minilm", "queries_id.npy"))
    qood = np.load(shared_path("ann", "pypi-minilm", "queries_ood.npy"))
    out = tmp_path_factory.mktemp("minilm20k")
    params = IndexParams(R=32, L=64, alpha=1.2, pq_bytes=48, threads=2, queries=qood[:1000], opq_iters=6,
                         pq_train_size=10000, progress=False)
    build_index(base, None, out, params)
    return out, base, qid[1000:1300], qood[1000:1300]


@pytest.mark.parametrize("qset", ["id", "ood"])
def test_recall_on_20k_minilm_subset(minilm_20k, qset):
    out, base, qid, qood = minilm_20k
    Q = qid if qset == "id" else qood
    gt, _ = exact_topk(Q, base, 10)
    with Index.open(out, threads=2) as index:
        ids, _, stats = index.search(Q, 10, L=70, beam_width=4)
    r = recall_at_k(ids, gt, 10)
    assert r >= 0.9, r
    assert stats.reads.mean() < 100


def test_cli_build_and_search_round_trip(tmp_path, capsys):
    X = unit_vectors(800, 16, seed=5).astype(np.float16)
    Q = unit_vectors(50, 16, seed=6)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "q.npy", Q)
    gt, _ = exact_topk(Q, X, 10)
    np.save(tmp_path / "gt.npy", gt)
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(800):
            f.write(json.dumps({"url": f"https://x/{i}.png", "title": f"t{i}"}) + "\n")
    assert main(["build", "--vectors", str(tmp_path / "x.npy"), "--queries", str(tmp_path / "q.npy"),
                 "--metadata", str(tmp_path / "m.jsonl"), "--R", "16", "--L", "32", "--pq-bytes", "8",
                 "--threads", "2", "--out", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 800
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.npy"), "--k", "10",
                 "--L", "800", "--beam-width", "4", "--gt", str(tmp_path / "gt.npy"),
                 "--out", str(tmp_path / "ids.npy")]) == 0
    printed = capsys.readouterr().out
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (50, 10) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, gt)
    assert "recall@10 1.0000" in printed and "QPS" in printed and "reads" in printed
    if o_direct_ok(tmp_path / "idx"):
        assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.npy"), "--k", "10",
                     "--L", "800", "--io", "direct", "--out", str(tmp_path / "ids2.npy")]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "ids2.npy"), gt)
    with Index.open(tmp_path / "idx") as index:
        assert index.metadata([7]) == [{"url": "https://x/7.png", "title": "t7"}]
    assert main(["search", "--index", str(tmp_path / "nope"), "--queries", str(tmp_path / "q.npy"),
                 "--out", str(tmp_path / "o.npy")]) == 2
