"""The sharded build on a local Ray: partition, memory-bounded shard tasks, resume, merge."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from conftest import ROOT, shared_path, start_local_ray
from memescale.sample_data import write_vector_shards
from memescale.build_ray import build_from_shards, gather_rows, shard_is_built
from memescale.config import load_config
from memescale.index import Index, exact_topk

N = 20_000


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:N]
    queries = np.load(shared_path("ann", "pypi-minilm", "queries_id.npy"))[:500].astype(np.float32)
    gt, _ = exact_topk(queries, base, 10)
    tmp = tmp_path_factory.mktemp("build")
    write_vector_shards(tmp / "emb", base)
    return tmp, base, queries, gt


def _cfg(shards: int):
    return load_config(ROOT / "configs" / "tiny.toml", [f"index.shards={shards}", "index.R=32", "index.L=64",
                                                         "index.pq_bytes=48", "index.weight_beta=0"])


def _recall(index_dir, queries, gt, L=48) -> float:
    ids, _, _ = Index.open(index_dir).search(queries, 10, L)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt)]))


def test_sharded_build_matches_single_shard_recall_and_stays_in_memory(ray_local, data):
    tmp, base, queries, gt = data
    build_from_shards(_cfg(1), str(tmp / "emb"), str(tmp / "one"), query_sample=False)
    four = build_from_shards(_cfg(4), str(tmp / "emb"), str(tmp / "four"), query_sample=False)
    sizes = four["partition"]["sizes"]
    assert sum(sizes) == 2 * N and max(sizes) <= int(np.ceil(2 * N / 4 * 1.05))
    for s in four["shards"]:
        assert s["peak_rss"] < s["declared_memory"], s
    assert four["max_degree"] <= 32
    r1, r4 = _recall(tmp / "one", queries, gt), _recall(tmp / "four", queries, gt)
    assert r1 >= 0.9 and r4 >= r1 - 0.01, (r1, r4)
    md = Index.open(tmp / "four").metadata(np.array([0, 12345]))
    assert md[1]["title"] == "post 12345" and md[1]["image_id"] == 10**12 + 12345 and md[0]["over_18"]


def test_rerun_reuses_valid_shards_and_rebuilds_corrupt_ones(ray_local, data):
    tmp, *_ = data
    work = tmp / "four.work"
    first = sorted(work.glob("shard-*.npz"))
    assert first and all(shard_is_built(p) for p in first)
    with open(first[1], "r+b") as f:
        f.seek(100)
        f.write(b"\xff\x00\xff")
    assert not shard_is_built(first[1])
    before = (tmp / "four" / "records.bin").read_bytes()
    again = build_from_shards(_cfg(4), str(tmp / "emb"), str(tmp / "four"), query_sample=False)
    skipped = {s["shard"] for s in again["shards"] if s["skipped"]}
    assert skipped == {0, 2, 3}
    assert shard_is_built(first[1])
    assert (tmp / "four" / "records.bin").read_bytes() == before  # deterministic rebuild


def test_gather_rows_reads_exactly_the_rows_asked(tmp_path):
    a = np.random.default_rng(0).standard_normal((5000, 7)).astype(np.float16)
    np.save(tmp_path / "v.npy", a)
    ids = np.sort(np.random.default_rng(1).choice(5000, 1200, replace=False)).astype(np.int64)
    assert np.array_equal(gather_rows(str(tmp_path / "v.npy"), ids, block=97), a[ids])
