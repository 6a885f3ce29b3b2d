"""Live index updates (memescale/index/live.py, update.py, wal.py): inserts, deletes,
consolidation, crash safety, and search while they happen."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from memescale.index import Index, IndexParams
from memescale.index.disk import IDS_FILE, write_id_map
from memescale.index.eval import exact_ground_truth, recall_at_k
from memescale.index.live import LiveIndex
from memescale.index.search import exclusion_bitmap
from memescale.index.update import UpdateLimits, consolidate, delete_ids, insert_shards, parse_ids
from memescale.index.wal import UpdateLog, read_committed, wal_path
from memescale.index.weighting import build_weighted_index
from memescale.ingest.urls import image_id as post_image_id
from memescale.testing.sample_data import read_node_rows, write_vector_shards

N_BASE, N_NEW, DIM = 3000, 1000, 32
ID0 = 10**12  # write_vector_shards: image_id = row + 10**12
PARAMS = IndexParams(R=20, L=40, pq_bytes=8, seed=0)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((24, dim))
    x = c[rng.integers(0, 24, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("updates")
    x = clustered(N_BASE + N_NEW, DIM, 0)
    write_vector_shards(tmp / "all", x, per_file=500)
    files = sorted((tmp / "all").glob("*.parquet"))
    for name, part in (("base", files[:6]), ("new", files[5:])):  # "new" overlaps "base" by one file
        (tmp / name).mkdir()
        for f in part:
            shutil.copy(f, tmp / name)
    v, md = read_node_rows(tmp / "base")
    build_weighted_index(v, md, tmp / "pristine", PARAMS, 0.2)
    return {"tmp": tmp, "x": x, "pristine": tmp / "pristine", "new": tmp / "new", "all": tmp / "all"}


@pytest.fixture
def index(world, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(world["pristine"], d)
    return d


def live_ids(index_dir: Path, candidates: np.ndarray) -> np.ndarray:
    """The image ids among `candidates` the index serves."""
    with LiveIndex.open(index_dir, threads=1) as li:
        return np.sort(candidates[li.nodes_of(candidates) >= 0])


def all_ids() -> np.ndarray:
    return np.arange(N_BASE + N_NEW, dtype=np.int64) + ID0


def result_image_ids(li: LiveIndex, ids: np.ndarray) -> np.ndarray:
    flat = ids.ravel()
    out = np.full(flat.size, -1, np.int64)
    ok = flat >= 0
    out[ok] = [m["image_id"] for m in li.metadata(flat[ok])]
    return out.reshape(ids.shape)


# ------------------------------------------------------------------------------ pieces


def test_exclusion_bitmap_hides_nodes_but_keeps_the_graph_navigable(world):
    x = world["x"][:N_BASE]
    with Index.open(world["pristine"], threads=1) as idx:
        q = x[:50] + 0.05
        ids, _, _ = idx.search(q, 10, 40)
        hide = np.unique(ids[:, :3])  # every query's three best
        ids2, sc2, _ = idx.search(q, 10, 40, exclude=exclusion_bitmap(len(idx), hide))
        assert not np.isin(ids2, hide).any()
        assert (ids2 >= 0).all() and np.isfinite(sc2).all()
        # what remains is still the best of the rest: recall against the exact answer without them
        keep = np.setdiff1d(np.arange(len(idx)), hide)
        vecs = idx.vectors(keep).astype(np.float32)
        gt, _ = exact_ground_truth(vecs, idx.weighting.index_queries(q), 10)
        gt_all, _ = exact_ground_truth(idx.vectors(np.arange(len(idx))).astype(np.float32),
                                       idx.weighting.index_queries(q), 10)
        assert recall_at_k(ids2, keep[gt], 10) > recall_at_k(ids, gt_all, 10) - 0.06 > 0.8
        with pytest.raises(ValueError, match="bitmap"):
            idx.search(q, 10, 40, exclude=np.zeros(3, np.uint8))


def test_id_map_sorted_in_ranges_equals_one_sort(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 2**62, 5000).astype(np.int64)
    ids[::7] = -1
    ids[100] = ids[200]  # a duplicate: the lower node first
    for rows in (1 << 20, 300):
        path = tmp_path / f"ids-{rows}.bin"
        assert write_id_map(path, ids, sort_rows=rows) == int((ids >= 0).sum())
        raw = np.fromfile(path, np.uint8)[64:]
        m = int((ids >= 0).sum())
        keys, nodes = raw[: 8 * m].view("<i8"), raw[8 * m:].view("<i4")
        want = np.flatnonzero(ids >= 0)[np.argsort(ids[ids >= 0], kind="stable")]
        np.testing.assert_array_equal(nodes, want)
        np.testing.assert_array_equal(keys, ids[want])


def test_index_maps_image_ids_to_nodes(world):
    with Index.open(world["pristine"], threads=1) as idx:
        assert (world["pristine"] / IDS_FILE).exists()
        nodes = idx.nodes_of(np.array([ID0 + 17, ID0 + N_BASE - 1, 5, ID0 + N_BASE]))
        assert nodes.tolist() == [17, N_BASE - 1, -1, -1]
        assert idx.metadata([17])[0]["image_id"] == ID0 + 17


def test_log_ignores_a_torn_transaction_and_the_writer_cuts_it(tmp_path):
    path = wal_path(tmp_path, 0)
    with UpdateLog.open(path, 0) as log:
        end = log.append([{"op": "delete", "image_ids": np.array([1, 2], "<i8").tobytes()}])
    with open(path, "ab") as f:  # a second transaction, killed before its commit frame
        f.write(b"\x10\x00\x00\x00garbage-and-more")
    got = read_committed(path)
    assert got.end == end and len(got.ops) == 1
    with UpdateLog.open(path, 0) as log:
        assert path.stat().st_size == end
        log.append([{"op": "delete", "image_ids": np.array([3], "<i8").tobytes()}])
    ops = read_committed(path).ops
    assert [np.frombuffer(o["image_ids"], "<i8").tolist() for o in ops] == [[1, 2], [3]]


def test_parse_ids_takes_image_ids_and_posts():
    ids, posts = parse_ids(["123", " t3_abc ", "", "# a comment", "xyz9"])
    assert posts == 2
    assert 123 in ids and post_image_id("abc", 0) in ids and post_image_id("xyz9", 3) in ids
    with pytest.raises(ValueError, match="line 2"):
        parse_ids(["1", "not/an id"])


# ------------------------------------------------------------------------------ operations


def test_insert_is_idempotent_and_delete_is_final(world, index):
    first = insert_shards(index, str(world["new"]))
    assert first["inserted"] == N_NEW and first["skipped"] == 500  # the overlapping file
    again = insert_shards(index, str(world["all"]))  # everything again: nothing twice
    assert again["inserted"] == 0 and again["delta"] == N_NEW
    assert live_ids(index, all_ids()).tolist() == all_ids().tolist()

    gone = np.array([ID0 + 5, ID0 + N_BASE + 7, ID0 + 10**6], np.int64)  # base, delta, unknown
    out = delete_ids(index, gone)
    assert out["found"] == 2 and out["requested"] == 3
    with LiveIndex.open(index, threads=1) as li:
        assert (li.nodes_of(gone) == -1).all()
        ids, _, _ = li.search(world["x"][[5, N_BASE + 7]], 10, 40)
        assert not np.isin(result_image_ids(li, ids), gone).any()
    assert insert_shards(index, str(world["all"]))["inserted"] == 0  # deleted stays deleted
    c = consolidate(index)
    assert c["consolidated"] and c["nodes"] == N_BASE + N_NEW - 2
    assert insert_shards(index, str(world["all"]))["inserted"] == 0  # ... across generations too
    want = np.setdiff1d(all_ids(), gone)
    assert live_ids(index, all_ids()).tolist() == want.tolist()
    assert sorted(p.name for p in index.iterdir()) == ["CURRENT", "gen-000001", "updates"]  # gen 0 removed


def test_searches_see_inserts_and_merge_them_with_the_base(world, index):
    x = world["x"]
    insert_shards(index, str(world["new"]))
    with LiveIndex.open(index, threads=1) as li:
        q = x[N_BASE - 200:N_BASE + 200]  # half the nearest neighbours are in the delta
        ids, _, _ = li.search(q, 1, 40)
        got = result_image_ids(li, ids)[:, 0]
        assert np.mean(got == np.arange(N_BASE - 200, N_BASE + 200) + ID0) > 0.97


def test_recall_after_update_rounds_matches_a_fresh_build(world, index, tmp_path):
    x = world["x"]
    rng = np.random.default_rng(3)
    insert_shards(index, str(world["new"]))
    dele = rng.choice(N_BASE + N_NEW, 300, replace=False)
    delete_ids(index, dele + ID0)
    consolidate(index)
    dele2 = rng.choice(N_BASE + N_NEW, 200, replace=False)
    delete_ids(index, dele2 + ID0)
    keep = np.ones(N_BASE + N_NEW, bool)
    keep[dele] = keep[dele2] = False
    rows = np.flatnonzero(keep)
    v, md = read_node_rows(world["all"])
    build_weighted_index(v[rows], [md[i] for i in rows], tmp_path / "fresh", PARAMS, 0.2)
    q = x[rng.integers(0, len(x), 300)] + 0.08 * rng.standard_normal((300, DIM)).astype(np.float32)
    with Index.open(tmp_path / "fresh", threads=1) as fresh, LiveIndex.open(index, threads=1) as li:
        gt, _ = exact_ground_truth(fresh.vectors(np.arange(len(fresh))).astype(np.float32),
                                   fresh.weighting.index_queries(q), 10)
        ids, _, _ = fresh.search(q, 10, 40)
        r_fresh = recall_at_k(ids, gt, 10)
        got, _, _ = li.search(q, 10, 40)
        # map the updated index's results to the fresh index's node ids through the image ids
        r_live = recall_at_k(fresh.nodes_of(result_image_ids(li, got).ravel()).reshape(got.shape), gt, 10)
    assert r_fresh > 0.8
    assert r_live >= r_fresh - 0.03, (r_live, r_fresh)


def test_automatic_consolidation_and_cli(world, index, tmp_path):
    out = insert_shards(index, str(world["new"]), UpdateLimits(delta_max=500))
    assert out["consolidation"]["consolidated"] and out["consolidation"]["generation"] == 1
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{ID0 + 3}\n# comment\nt3_zzz\n")
    cmd = [sys.executable, str(ROOT / "ray_jobs" / "update_index.py"), "--index", str(index)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(cmd + ["--delete", str(ids_file)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["found"] == 1 and res["posts"] == 1 and res["requested"] == 101
    r = subprocess.run(cmd + ["--consolidate"], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(r.stdout.strip().splitlines()[-1])["generation"] == 2
    r = subprocess.run(cmd + ["--delete", str(tmp_path / "missing.txt")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "missing.txt" in r.stderr
    with Index.open(index, threads=1) as idx:  # a plain open follows CURRENT
        assert len(idx) == N_BASE + N_NEW - 1


def test_search_never_fails_while_updates_and_a_switch_happen(world, index):
    x = world["x"]
    errors: list[BaseException] = []
    searches = 0
    stop = threading.Event()
    li = LiveIndex.open(index, threads=1)

    def searcher() -> None:
        nonlocal searches
        while not stop.is_set():
            try:
                with li.snapshot() as view:  # ids and the records read for them from one state
                    ids, _, _ = view.search(x[searches % 500: searches % 500 + 4], 5, 40)
                    assert (result_image_ids(view, ids) > 0).all()
                searches += 1
            except BaseException as e:  # noqa: BLE001 - the test reports any failure
                errors.append(e)
                return

    def refresher() -> None:
        while not stop.is_set():
            li.refresh()

    threads = [threading.Thread(target=searcher), threading.Thread(target=refresher)]
    for t in threads:
        t.start()
    try:
        insert_shards(index, str(world["new"]))
        delete_ids(index, np.arange(100, dtype=np.int64) + ID0)
        consolidate(index)
        before = searches
        li.refresh()
        assert li.generation == 1
        while searches < before + 20 and not errors:  # searches go on against the new generation
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
        li.close()
    assert not errors, errors
    assert searches > 20


# ------------------------------------------------------------------------------ crash safety


def _in_child(fn, env: dict[str, str]) -> int:
    """Run fn() in a forked child with `env` set; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.environ.update(env)
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _signature(index_dir: Path) -> dict:
    with LiveIndex.open(index_dir, threads=1) as li:
        ids = all_ids()
        nodes = li.nodes_of(ids)
        live = ids[nodes >= 0]
        vecs = li.vectors(nodes[nodes >= 0]).tobytes()
        gen_dir = li.state.base.path
    records = (gen_dir / "records.bin").read_bytes()
    return {"live": live.tolist(), "vectors": hash(vecs), "records": hash(records), "counts": li.counts()}


@pytest.mark.parametrize("op", ["insert", "delete", "consolidate"])
def test_kill_at_random_points_then_rerun(world, tmp_path, op):
    pristine = tmp_path / "start"
    shutil.copytree(world["pristine"], pristine)
    if op != "insert":  # something to delete and consolidate
        insert_shards(pristine, str(world["new"]))
    doomed = np.arange(0, N_BASE + N_NEW, 37, dtype=np.int64) + ID0
    if op == "consolidate":
        delete_ids(pristine, doomed)

    def run(d: Path):
        return {"insert": lambda: insert_shards(d, str(world["new"])),
                "delete": lambda: delete_ids(d, doomed),
                "consolidate": lambda: consolidate(d)}[op]

    ref = tmp_path / "ref"
    shutil.copytree(pristine, ref)
    trace = tmp_path / "points.txt"
    assert _in_child(run(ref), {"MEMESCALE_CRASH_LOG": str(trace)}) == 0
    points = trace.read_text().splitlines()
    assert len(points) >= 3, points
    want = _signature(ref)
    rng = np.random.default_rng(["insert", "delete", "consolidate"].index(op))
    # five seeded points, and the last one (killed after everything but returning)
    picks = sorted(set(rng.choice(np.arange(1, len(points) + 1), min(5, len(points)), replace=False).tolist())
                   | {len(points)})
    for n in picks:
        d = tmp_path / f"kill-{n}"
        shutil.copytree(pristine, d)
        assert _in_child(run(d), {"MEMESCALE_CRASH_AT": str(n)}) == -signal.SIGKILL, points[n - 1]
        run(d)()  # the same command again
        got = _signature(d)
        assert got == want, (n, points[n - 1])


def test_inserted_nodes_get_real_neighbours_even_at_the_centre(world, index, tmp_path):
    """The most central vector arrives by insert: the consolidation must not start its
    searches there (an inserted node has no out-list yet)."""
    x = world["x"]
    centre = x[:N_BASE].mean(axis=0)
    write_vector_shards(tmp_path / "centre", (centre / np.linalg.norm(centre))[None, :].astype(np.float32),
                        overrides={"image_id": np.array([ID0 + 10**7])})
    insert_shards(index, str(world["new"]))
    insert_shards(index, str(tmp_path / "centre"))
    consolidate(index)
    with Index.open(index, threads=1) as idx:
        n = len(idx)
        new = np.arange(n - N_NEW, n)  # survivors first, then the inserted rows in log order
        X = idx.vectors(np.arange(n)).astype(np.float32)
        top = np.argsort(-(X[new] @ X.T), axis=1)[:, 1:51]
        near = np.mean([np.isin(idx._neighbours(u), top[i]).mean() for i, u in enumerate(new)])
        assert near > 0.7, near
        ids, _, _ = idx.search(X[new[::10]][:, :DIM], 1, 40)
        assert np.mean(ids[:, 0] == new[::10]) > 0.95


def test_consolidation_keeps_to_its_memory_budget(world, index):
    insert_shards(index, str(world["new"]))
    with pytest.raises(MemoryError, match="build_memory"):
        consolidate(index, memory=64 << 20)
    with LiveIndex.open(index, threads=1) as li:  # nothing changed
        assert li.generation == 0 and li.counts()["delta"] == N_NEW
    out = consolidate(index, memory=1 << 30)
    # the growth, not the process's peak: this process holds whatever earlier tests loaded
    assert out["consolidated"] and 0 < out["rss_anon_growth"] < out["declared_memory"] <= 1 << 30, out


@pytest.mark.parametrize("delta_scan", [20_000, 0])  # the delta's matching rows scored all, or its graph
def test_filters_hold_for_inserted_rows(tmp_path, monkeypatch, delta_scan):
    """Inserted rows carry labels: a selective filter finds the fresh rows it matches, also
    under a subreddit name the generation has never seen, before any consolidation."""
    import memescale.index.live as live_mod
    from memescale.config import ServeConfig
    from memescale.search.engine import SearchEngine, parse_filters
    from memescale.search.requests import Filters

    monkeypatch.setattr(live_mod, "DELTA_FILTER_SCAN", delta_scan)
    x = clustered(N_BASE + N_NEW, DIM, 3)
    i = np.arange(N_BASE + N_NEW)
    subs = np.where(i < N_BASE, np.where(i % 50 == 0, "pics", "memes"),
                    np.array(["brandnew", "pics", "memes"])[i % 3]).astype(object)
    write_vector_shards(tmp_path / "base", x[:N_BASE], per_file=500, overrides={"subreddit": subs[:N_BASE]})
    write_vector_shards(tmp_path / "new", x[N_BASE:], per_file=500, overrides={"subreddit": subs[N_BASE:]},
                        first_row=N_BASE)
    v, md = read_node_rows(tmp_path / "base")
    build_weighted_index(v, md, tmp_path / "ix", PARAMS, 0.2)
    assert insert_shards(tmp_path / "ix", str(tmp_path / "new"))["inserted"] == N_NEW
    queries = x[N_BASE:][:20] + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with LiveIndex.open(tmp_path / "ix", threads=1) as li:
        eng = SearchEngine(li, li.weighting, ServeConfig(dedup_threshold=0.999))
        for name in ("brandnew", "pics"):
            rows = np.flatnonzero(subs == name)
            f = parse_filters(Filters(nsfw=True, subreddits=[name.upper()]))
            hits, fresh = 0, 0
            for q in queries:
                page = eng.search(q, None, f, False, 0, 10)
                got = {int(r["image_id"]) for r in page["results"]}
                assert all(r["subreddit"] == name for r in page["results"])
                want = rows[np.argsort(-(x[rows] @ q), kind="stable")[:10]] + ID0
                hits += len(got & set(want.tolist()))
                fresh += sum(g - ID0 >= N_BASE for g in got)
            assert hits / 200 >= 0.9, (name, hits / 200)
            assert fresh > 0  # the queries sit among the new rows
