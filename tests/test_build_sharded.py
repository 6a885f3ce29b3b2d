"""The sharded build on a local Ray: partition, memory-bounded shard tasks, resume, merge,
and the stages it shares with the in-process `build_index`."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from conftest import ROOT, shared_path, start_local_ray

from memescale.build.pipeline import build_from_shards
from memescale.build.stages import gather_rows, shard_files, shard_is_built
from memescale.config import IndexConfig, load_config
from memescale.index import Index, IndexParams, build_index, build_vamana, exact_topk, find_medoid, greedy_search
from memescale.index.disk import ARRAYS_FILE, MAGIC_ARRAYS, read_small_file, unpack_arrays
from memescale.index.eval import recall_at_k
from memescale.index.kernels import quantize_int8
from memescale.index.merge import border_nodes, member_from_shards, merge_shard_graphs
from memescale.index.vamana import VISIT_TABLE, navigation_codes, refine_graph
from memescale.testing.sample_data import write_vector_shards

pytestmark = pytest.mark.slow  # Ray jobs end to end

N = 12_000


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


def _cfg(shards: int, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.toml", [f"index.shards={shards}", "index.R=32", "index.L=64",
                                                         "index.pq_bytes=48", "index.weight_beta=0", *overrides])


def _recall(index_dir, queries, gt, L=48) -> float:
    ids, _, _ = Index.open(index_dir).search(queries, 10, L)
    return recall_at_k(ids, gt, 10)


def test_sharded_build_matches_single_shard_recall_and_stays_in_memory(ray_local, data):
    tmp, base, queries, gt = data
    build_from_shards(_cfg(1), str(tmp / "emb"), str(tmp / "one"), query_sample=False)
    four = build_from_shards(_cfg(4), str(tmp / "emb"), str(tmp / "four"), query_sample=False)
    sizes = four["partition"]["sizes"]
    assert sum(sizes) == 2 * N and max(sizes) <= int(np.ceil(2 * N / 4 * 1.05))
    for s in four["shards"]:
        assert 0 < s["peak_rss_anon"] < s["declared_memory"], s
    assert four["max_degree"] <= 32
    r1, r4 = _recall(tmp / "one", queries, gt), _recall(tmp / "four", queries, gt)
    assert r1 >= 0.9 and r4 >= r1 - 0.01, (r1, r4)
    md = Index.open(tmp / "four").metadata(np.array([0, 11345]))
    assert md[1]["title"] == "post 11345" and md[1]["image_id"] == 10**12 + 11345 and md[0]["over_18"]


def test_rerun_reuses_valid_shards_and_rebuilds_corrupt_ones(ray_local, data):
    tmp, *_ = data
    graphs = tmp / "four.work" / "graphs"
    assert all(shard_is_built(graphs, s) for s in range(4))
    with open(shard_files(graphs, 1)["neighbours"], "r+b") as f:
        f.seek(200)
        f.write(b"\xff\x00\xff")
    assert not shard_is_built(graphs, 1)
    before = (tmp / "four" / "records.bin").read_bytes()
    again = build_from_shards(_cfg(4), str(tmp / "emb"), str(tmp / "four"), query_sample=False)
    skipped = {s["shard"] for s in again["shards"] if s["skipped"]}
    assert skipped == {0, 2, 3}
    assert shard_is_built(graphs, 1)
    assert (tmp / "four" / "records.bin").read_bytes() == before  # deterministic rebuild


def test_gather_rows_reads_exactly_the_rows_asked(tmp_path):
    a = np.random.default_rng(0).standard_normal((5000, 7)).astype(np.float16)
    np.save(tmp_path / "v.npy", a)
    ids = np.sort(np.random.default_rng(1).choice(5000, 1200, replace=False)).astype(np.int64)
    assert np.array_equal(gather_rows(str(tmp_path / "v.npy"), ids, block=97), a[ids])


def test_gather_rows_reads_a_bounded_span_however_sparse_the_ids(tmp_path, monkeypatch):
    """A strided sample of a shard spread over the whole file (the int8 scale's sample) is read
    a few rows at a time, never as one read spanning most of the file."""
    a = np.random.default_rng(0).standard_normal((20000, 16)).astype(np.float16)  # 32 B rows
    np.save(tmp_path / "v.npy", a)
    ids = np.arange(0, 20000, 37, dtype=np.int64)
    reads: list[int] = []
    real = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda f, dtype, count: reads.append(count * np.dtype(dtype).itemsize)
                        or real(f, dtype, count=count))
    for q in (None, 0.02):
        got = gather_rows(str(tmp_path / "v.npy"), ids, block=4096, int8_scale=q, span_bytes=4096)
        assert np.array_equal(got, a[ids] if q is None else quantize_int8(a[ids], q))
    assert max(reads) <= 4096  # one block of 4096 ids would have spanned the whole 640 kB file


def test_refinement_pass_keeps_recall_and_degree(ray_local, data):
    """The same shard graphs merged without the refinement pass and with it over every node:
    the default refined index (built above) has at least the plain one's recall, degree <= R,
    and a rerun gives the same files."""
    tmp, base, queries, gt = data
    plain = build_from_shards(_cfg(4, "index.refine_L=0"), str(tmp / "emb"), str(tmp / "four-plain"),
                              work_dir=str(tmp / "four.work"), query_sample=False)
    assert plain["refine_L"] == 0 and all(s["skipped"] for s in plain["shards"])
    again = build_from_shards(_cfg(4), str(tmp / "emb"), str(tmp / "four-again"), work_dir=str(tmp / "four.work"),
                              query_sample=False)
    defaults = IndexConfig()
    assert again["refine_L"] == defaults.refine_L and again["max_degree"] <= 32
    assert again["refined_nodes"] == round(defaults.refine_fraction * N)
    assert (tmp / "four-again" / "records.bin").read_bytes() == (tmp / "four" / "records.bin").read_bytes()
    full = build_from_shards(_cfg(4, "index.refine_fraction=1.0"), str(tmp / "emb"), str(tmp / "four-full"),
                             work_dir=str(tmp / "four.work"), query_sample=False)
    assert full["refined_nodes"] == N and full["max_degree"] <= 32
    r_plain, r_refined, r_full = (_recall(tmp / name, queries, gt, L=24) for name in ("four-plain", "four", "four-full"))
    assert r_full >= r_refined - 0.002 and r_refined >= r_plain - 0.002, (r_plain, r_refined, r_full)


def test_refine_graph_is_deterministic_and_bounded():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    R = 12
    # two overlapping halves built apart and merged: the graph a sharded build refines
    halves = [np.arange(0, 1800), np.arange(1200, 3000)]
    graphs = []
    for s, ids in enumerate(halves):
        nb, dg, _ = build_vamana(x[ids], R, 24, 1.2, seed=s, threads=1, progress=False)
        graphs.append((ids, nb, dg))
    nb, dg = merge_shard_graphs(x, graphs, R, 1.2, threads=1)
    nb0, dg0 = nb.copy(), dg.copy()
    start = find_medoid(x)
    a = refine_graph(x, nb, dg, start, L=16, seed=3, threads=1, progress=False)
    b = refine_graph(x, nb, dg, start, L=16, seed=3, threads=3, progress=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(nb, nb0) and np.array_equal(dg, dg0)  # inputs untouched
    out, deg = a
    assert out.shape == (3000, R) and deg.max() <= R and deg.min() >= 1
    for i in range(3000):
        row = out[i, :deg[i]]
        assert (row >= 0).all() and (row < 3000).all() and i not in row and len(set(row.tolist())) == deg[i]
        assert (out[i, deg[i]:] == -1).all()
    # greedy search over the refined graph finds the exact nearest neighbour at least as often
    q = rng.standard_normal((200, 24)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argmax(q @ x.T, axis=1)
    X16 = x.astype(np.float16)
    norms = np.einsum("ij,ij->i", X16.astype(np.float32), X16.astype(np.float32)).astype(np.float32)

    def hits(graph, degrees):
        vis = np.zeros(VISIT_TABLE, np.int64)
        found = 0
        for t, qv in enumerate(q):
            ids, ds, vis = greedy_search(X16.view(np.uint16), norms, graph, degrees, start, qv, np.float32(qv @ qv), 8,
                                         vis, t + 1)
            found += int(ids[np.argmin(ds)] == truth[t])
        return found

    assert hits(out, deg) >= hits(nb, dg)
    # searches ranked by navigation codes (a merged graph whose vectors are not in RAM): the
    # same at any thread count, and as good a refinement
    nav = navigation_codes(x.astype(np.float16).view(np.uint16), 2, seed=0, threads=1)
    c = refine_graph(x, nb, dg, start, L=16, seed=3, threads=1, progress=False, nav=nav)
    d = refine_graph(x, nb, dg, start, L=16, seed=3, threads=3, progress=False, nav=nav)
    assert np.array_equal(c[0], d[0]) and np.array_equal(c[1], d[1]) and not np.array_equal(c[0], out)
    assert hits(*c) >= hits(nb, dg) and hits(*c) >= hits(out, deg) - 5
    # a subset (the border nodes): the others keep their lists but for reverse edges
    centroids = np.stack([x[:1800].mean(0), x[1200:].mean(0)])
    some = border_nodes(x, centroids / np.linalg.norm(centroids, axis=1, keepdims=True),
                        member_from_shards(halves, 3000), 0.25)
    assert some.size == 750 and np.array_equal(some, np.unique(some))
    p1 = refine_graph(x, nb, dg, start, L=16, seed=3, threads=1, progress=False, points=some)
    p2 = refine_graph(x, nb, dg, start, L=16, seed=3, threads=2, progress=False, points=some[::-1].copy())
    assert np.array_equal(p1[0], p2[0]) and np.array_equal(p1[1], p2[1]) and p1[1].max() <= R
    c = refine_graph(x, nb, dg.astype(np.int32), start, L=16, seed=3, threads=2, progress=False, overwrite=True)
    assert c[0] is nb and np.array_equal(nb, out) and np.array_equal(c[1], deg)


def test_border_nodes_takes_the_smallest_margins():
    x = np.array([[1, 0], [0.7, 0.7], [0, 1], [-1, 0.1], [0.6, -0.8]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    shards = [np.array([0, 1, 4]), np.array([1, 2]), np.array([3])]
    # margins: 0 in shard 0 only: 1 - 0 = 1; 1 in both 0, 1: 0.707 - (-0.707); 2: 1 - 0; 3: 0.995 - 0.0995;
    # 4: 0.6 - (-0.6)  -> smallest: 3 (0.9), 0 and 2 (1.0, tie: by id)
    member = member_from_shards(shards, 5)
    assert border_nodes(x, centroids, member, 0.6).tolist() == [0, 2, 3]
    assert border_nodes(x, centroids, member, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert border_nodes(x, centroids[:1], member_from_shards([np.arange(5)], 5), 0.2).tolist() == [0, 1, 2, 3, 4]
    other = member_from_shards([np.array([0, 1]), np.array([1, 2]), np.array([3])], 5)
    assert border_nodes(x, centroids, other, 0.2).tolist() == [4]


def _arrays(index_dir):
    path = index_dir / ARRAYS_FILE
    return unpack_arrays(path, read_small_file(path, MAGIC_ARRAYS)[0])


def test_one_shard_ray_build_writes_what_build_index_writes(ray_local, tmp_path):
    """Both paths train PQ, encode and write through the same functions: for the same fp16
    vectors, metadata and parameters a 1-shard Ray build and `build_index` give the same
    records, PQ codes, codec and entry point; the build information differs only in what
    each path adds (shards and model, or the medoid)."""
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:3000]
    write_vector_shards(tmp_path / "emb", base)
    cfg = _cfg(1, "index.R=16", "index.L=32", "index.pq_bytes=16")
    build_from_shards(cfg, str(tmp_path / "emb"), str(tmp_path / "ray"), query_sample=False)
    work = tmp_path / "ray.work"
    vectors = np.load(work / "corpus" / "vectors.npy")
    meta = pq.read_table(work / "corpus" / "meta.parquet").to_pylist()
    build_index(vectors, meta, tmp_path / "local", IndexParams.from_config(cfg.index, threads=1))
    for name in ("records.bin", "pq_codes.bin", "metadata_overflow.bin"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    (ray_arrays, ray_info), (local_arrays, local_info) = _arrays(tmp_path / "ray"), _arrays(tmp_path / "local")
    assert ray_arrays.keys() == local_arrays.keys()
    for key in ray_arrays:
        assert np.array_equal(ray_arrays[key], local_arrays[key]), key
    common = {"R": 16, "L": 32, "alpha": cfg.index.alpha, "pq_bytes": 16, "seed": 0, "query_aware": False,
              "pq_eta": 4.0}
    assert ray_info == {**common, "shards": 1, "model": cfg.model.name}
    assert local_info == {**common, "medoid": int(local_arrays["entry_points"][0])}


def test_both_paths_refuse_nan_vectors_with_the_same_error(tmp_path):
    base = np.load(shared_path("ann", "pypi-minilm", "base.npy"))[:600].astype(np.float32)
    base[123, 7] = np.nan
    write_vector_shards(tmp_path / "emb", base, per_file=250)
    with pytest.raises(ValueError) as in_process:
        build_index(base, None, tmp_path / "local", IndexParams(R=8, L=16, pq_bytes=8))
    with pytest.raises(ValueError) as sharded:
        build_from_shards(_cfg(2), str(tmp_path / "emb"), str(tmp_path / "ray"), query_sample=False)
    assert str(in_process.value) == str(sharded.value) == "vectors contain NaN or infinity (after conversion to float16)"
    assert not list((tmp_path / "ray.work").rglob("shard-*")) and not (tmp_path / "ray").exists()
    base[123, 7] = 1e6  # finite in float32, infinite in float16
    with pytest.raises(ValueError, match="NaN or infinity"), pytest.warns(RuntimeWarning, match="overflow"):
        build_index(base, None, tmp_path / "local", IndexParams(R=8, L=16, pq_bytes=8))
