"""The out-of-core build: phases reused only while their fingerprint holds, plain-dimension
queries on a built index, and the driver's measured anonymous memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
from conftest import ROOT, start_local_ray

from memescale.build.pipeline import build_from_shards
from memescale.config import load_config
from memescale.index import Index
from memescale.index.eval import exact_ground_truth, recall_at_k
from memescale.testing.sample_data import write_vector_shards

pytestmark = pytest.mark.slow  # Ray jobs end to end

ALL_PHASES = {"corpus", "index_vectors", "partition", "graphs", "merge", "refine", "pq"}


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cfg(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.toml", ["index.shards=2", "index.R=12", "index.L=24",
                                                         "index.pq_bytes=8", "index.weight_beta=0.2", *overrides])


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray()
    yield
    ray.shutdown()


def test_phases_are_redone_exactly_when_their_inputs_change(ray_local, tmp_path, monkeypatch):
    x = clustered(5000, 32, 0)
    write_vector_shards(tmp_path / "emb", x[:4000], per_file=1000)
    work, out = str(tmp_path / "work"), str(tmp_path / "index")

    def build(*overrides: str) -> dict:
        return build_from_shards(_cfg(*overrides), str(tmp_path / "emb"), out, work, query_sample=False)

    first = build()
    assert first["reused"] == [] and first["vectors"] == 4000
    again = build()
    assert set(again["reused"]) == ALL_PHASES and all(s["skipped"] for s in again["shards"])
    assert again["plan"]["shards"] == 2

    write_vector_shards(tmp_path / "emb", x[4000:], per_file=1000, first_row=4000)  # a new month's shard
    grown = build()
    assert grown["reused"] == [] and grown["vectors"] == 5000
    with Index.open(out) as index:
        assert len(index) == 5000
        assert index.metadata([4999])[0]["title"] == "post 4999"
        ids, _, _ = index.search(x[4990:5000], 1, 32)  # plain 32-d queries on the weighted index
    assert (ids[:, 0] == np.arange(4990, 5000)).mean() >= 0.9

    three = build("index.shards=3")
    assert set(three["reused"]) == {"corpus", "index_vectors", "pq"} and three["plan"]["shards"] == 3
    assert not any(s["skipped"] for s in three["shards"])
    beta = build("index.shards=3", "index.weight_beta=0.1")
    assert beta["reused"] == ["corpus"]
    # a new index format: the PQ codec file is written anew rather than failing to read
    import memescale.build.pipeline as pipeline

    monkeypatch.setattr(pipeline, "FORMAT_VERSION", pipeline.FORMAT_VERSION + 1)
    upgraded = build("index.shards=3", "index.weight_beta=0.1")
    assert "pq" not in upgraded["reused"] and "graphs" in upgraded["reused"]
    # construction ranked by navigation codes: the shard graphs (and what follows them) are redone
    navigated = build("index.shards=3", "index.weight_beta=0.1", "index.build_pq_bytes=8")
    assert set(navigated["reused"]) == {"corpus", "index_vectors", "partition", "pq"}
    with Index.open(out) as index:
        ids, _, _ = index.search(x[4990:5000], 1, 32)
    assert (ids[:, 0] == np.arange(4990, 5000)).mean() >= 0.9


def test_weighted_index_answers_plain_queries_with_the_recall_of_full_ones(ray_local, tmp_path):
    x = clustered(6000, 32, 1)
    write_vector_shards(tmp_path / "emb", x, per_file=2000)
    build_from_shards(_cfg(), str(tmp_path / "emb"), str(tmp_path / "index"), query_sample=False)
    q = clustered(200, 32, 2)
    gt, _ = exact_ground_truth(x, q, 10)
    with Index.open(tmp_path / "index") as index:
        extra = index.dim - 32
        assert extra > 0  # the weighting's columns
        plain, _, _ = index.search(q, 10, 64)
        full, _, _ = index.search(np.hstack([q, np.zeros((200, extra), np.float32)]), 10, 64)
    assert np.array_equal(plain, full)
    assert recall_at_k(plain, gt, 10) >= 0.9


DRIVER_CHILD = r"""
import json, sys
import ray
sys.path.insert(0, sys.argv[3])
from conftest import start_local_ray
from memescale.build.pipeline import build_from_shards
from memescale.config import load_config
from memescale.memwatch import PeakRssAnon

tmp, root = sys.argv[1], sys.argv[2]
cfg = load_config(root + "/configs/tiny.toml", ["index.shards=4", "index.R=8", "index.L=12", "index.pq_bytes=8",
                                                "index.weight_beta=0.2", "index.refine_fraction=0.3"])
start_local_ray()
# warm-up: Ray's driver, every numba kernel and pyarrow's readers, on a small set
build_from_shards(cfg, tmp + "/small", tmp + "/small-index", query_sample=False)
with PeakRssAnon() as peak:
    summary = build_from_shards(cfg, tmp + "/emb", tmp + "/index", query_sample=False)
ray.shutdown()
print(json.dumps({"growth": peak.growth_bytes, "n": summary["vectors"], "refined": summary["refined_nodes"],
                  "phases": summary["driver_peak_rss_anon_by_phase"], "seconds": summary["seconds"],
                  "peak": summary["driver_peak_rss_anon"], "start": peak.start_bytes,
                  "declared": summary["plan"]["driver_memory_bytes"]}))
"""


def test_driver_memory_is_a_fixed_amount_plus_a_few_bytes_per_vector(tmp_path):
    """The whole sharded build of N = 300k x 32-d in a subprocess: the driver's RssAnon
    growth, after a warm-up build, stays under 96 MiB + 24 B per vector, and its absolute
    peak under the plan's `driver_memory_bytes`. A float32 copy of the index vectors (38 MB
    here) or one Python object per metadata row would exceed it; the merge's own bound is
    `test_merge.py`'s (the phases' fixed working sets are bounded by their block sizes, the
    mistakes grow with N)."""
    n, d = 300_000, 32
    rng = np.random.default_rng(0)
    for lo in range(0, n, 100_000):
        x = rng.standard_normal((100_000, d)).astype(np.float32)
        write_vector_shards(tmp_path / "emb", x / np.linalg.norm(x, axis=1, keepdims=True), per_file=50_000,
                            first_row=lo)
    write_vector_shards(tmp_path / "small", clustered(3000, d, 3), per_file=1000)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-c", DRIVER_CHILD, str(tmp_path), str(ROOT), str(ROOT / "tests")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == n and res["refined"] > 0
    assert res["growth"] < 96 * 2**20 + 24 * n, res
    assert res["peak"] < res["declared"], res
    # the summary names the phase each peak came from: every timed phase has one, none above the whole build's
    assert set(res["phases"]) == set(res["seconds"]) - {"total"}
    assert all(res["start"] // 2 < v <= res["peak"] for v in res["phases"].values()), res
