"""Filtered search at any selectivity (memescale/index/labels.py, the planner in
memescale/search/engine.py): labels stored with the index, in-traversal filtering for broad
filters, member scans for selective ones, exact filtered ground truth on 20k vectors."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from memescale.config import ServeConfig
from memescale.index import Index, IndexParams
from memescale.index.labels import month_of, score_bucket
from memescale.index.weighting import build_weighted_index
from memescale.search.engine import SearchEngine, parse_filters
from memescale.search.requests import Filters, SearchInputError

N, DIM = 20_000, 32
# Zipf-like subreddit sizes: s0 half of everything ... s7 1%, s9 0.1%
SHARES = {"s0": 0.50, "s1": 0.20, "s2": 0.10, "s3": 0.08, "s4": 0.05, "s5": 0.03, "s6": 0.02, "s7": 0.01,
          "s8": 0.009, "s9": 0.001}
T0, T1 = 1_262_304_000, 1_704_067_200  # 2010-01-01 .. 2024-01-01


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((40, DIM))
    x = c[rng.integers(0, 40, N)] + 0.7 * rng.standard_normal((N, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    subs = np.repeat(list(SHARES), [int(round(v * N)) for v in SHARES.values()])
    rng.shuffle(subs)
    md = [{"image_id": 10**12 + i, "subreddit": str(subs[i]).upper() if i % 7 == 0 else str(subs[i]),
           "created_utc": int(rng.integers(T0, T1)), "score": int(rng.pareto(1.2) * 10),
           "over_18": i % 10 == 9, "title": f"t{i}"} for i in range(N)]
    out = tmp_path_factory.mktemp("filtered") / "index"
    build_weighted_index(x, md, out, IndexParams(R=24, L=48, pq_bytes=16, seed=0), 0.2)
    index = Index.open(out, threads=2)
    yield {"x": x, "md": md, "index": index}
    index.close()


def engine(world, **cfg) -> SearchEngine:
    return SearchEngine(world["index"], world["index"].weighting, ServeConfig(dedup_threshold=0.999, **cfg))


def exact(world, q: np.ndarray, keep: np.ndarray, k: int) -> list[int]:
    rows = np.flatnonzero(keep)
    return rows[np.argsort(-(world["x"][rows] @ q), kind="stable")[:k]].tolist()


def matches(world, f: Filters) -> np.ndarray:
    spec = parse_filters(f)
    return np.fromiter((spec.keep(m) for m in world["md"]), bool, N)


def recall(world, f: Filters, queries: np.ndarray, k: int = 10) -> tuple[float, set[str]]:
    eng = engine(world)
    keep = matches(world, f)
    hits, plans = 0, set()
    for q in queries:
        page = eng.search(q, None, parse_filters(f), False, 0, k)
        plans.add(page["stats"]["plan"])
        hits += len({r["id"] for r in page["results"]} & set(exact(world, q, keep, k)))
    return hits / (k * len(queries)), plans


def test_labels_and_their_counts(world):
    lab = world["index"].labels
    md = world["md"]
    assert lab.n == N and lab.rows.nbytes == 8 * N  # 8 bytes per node
    assert list(lab.subreddits)[:3] == ["s0", "s1", "s2"]  # most frequent first, lower-cased
    for name, share in SHARES.items():
        members = lab.members(lab.subreddits[name])
        assert members.size == int(round(share * N))
        assert all(md[i]["subreddit"].lower() == name for i in members[:50].tolist())
    i = 123
    r = lab.rows[i]
    assert r["month"] == month_of(md[i]["created_utc"]) and r["bucket"] == score_bucket(md[i]["score"])
    assert lab.nsfw == N // 10
    assert datetime.fromtimestamp(T0, UTC).year == 2010 and month_of(T0) == 60


@pytest.mark.parametrize("f, plan, floor", [
    (Filters(nsfw=True, subreddits=["s7"]), "scan", 0.95),  # 1%
    (Filters(nsfw=True, subreddits=["s9"]), "scan", 0.95),  # 0.1%
    (Filters(nsfw=True, subreddits=["s0", "s1"]), "graph-filtered", 0.9),  # 70%
    (Filters(nsfw=False, after="2011-01-01"), "graph-filtered", 0.9),  # ~93% of the SFW 90%
    (Filters(nsfw=True, after="2023-03-01"), "scan", 0.95),  # the last 10 months: ~6%
    # ~20%, scanned: its score buckets' 8.7k members cost less than 3x the traversal's PQ scores
    (Filters(nsfw=True, exclude_subreddits=["s0"], min_score=10), "scan", 0.95),
    (Filters(nsfw=True, exclude_subreddits=["s0"], min_score=1), "graph-filtered", 0.95),  # ~45%: traversal
    (Filters(nsfw=True, exclude_subreddits=["s0"], min_score=1000), "scan", 0.95),  # a score range
])
def test_recall_against_exact_filtered_ground_truth(world, f, plan, floor):
    queries = world["x"][np.random.default_rng(1).choice(N, 40, replace=False)] + 0.02
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    r, plans = recall(world, f, queries)
    assert plans == {plan}
    assert r >= floor, r


@pytest.mark.parametrize("f, left", [
    (Filters(nsfw=True, subreddits=["s7"]), False),  # the subreddit's posting settles it all
    (Filters(nsfw=False, subreddits=["s7", "s9"]), True),  # NSFW is still checked
    (Filters(nsfw=True, after="2023-03-01"), False),  # the months' posting
    (Filters(nsfw=True, before="2010-07-01"), True),  # a range open below: unknown months
    (Filters(nsfw=True, exclude_subreddits=["s0"], min_score=1000), True),  # the exclusion is checked
])
def test_a_scan_checks_only_what_its_posting_leaves_open(world, f, left):
    ix = world["index"]
    plan = engine(world)._plan(ix, parse_filters(f), 64)
    assert plan.name == "scan" and plan.member_flt.active is left
    keep = matches(world, f)
    q = world["x"][[3, 77]]
    ids, scores, st = ix.scan(q, plan.members, 10, plan.flt, member_flt=plan.member_flt)
    ids2, scores2, st2 = ix.scan(q, plan.members, 10, plan.flt)  # every member checked in full
    assert np.array_equal(ids, ids2) and np.array_equal(scores, scores2)
    assert np.array_equal(st["pq_comparisons"], st2["pq_comparisons"])
    # labels have month and score-bucket resolution: a superset of the exact matches
    assert (st["pq_comparisons"] >= keep[np.asarray(plan.members)].sum()).all()
    if f.min_score is None:  # these bounds fall on month boundaries: exact at label resolution
        assert (ids >= 0).all() and keep[ids].all()


def test_a_filter_matching_nothing_gives_an_empty_last_page(world):
    eng = engine(world)
    for f in (Filters(subreddits=["no_such_subreddit"]), Filters(after="2030-01-01")):
        page = eng.search(world["x"][0], None, parse_filters(f), True, 0, 24)
        assert page["results"] == [] and page["more"] is False


def test_paging_ten_pages_deep_under_a_one_percent_filter(world):
    eng = engine(world)
    f = parse_filters(Filters(nsfw=True, subreddits=["s7"]))  # 200 images
    q = world["x"][5]
    seen, sims = [], []
    for p in range(10):
        page = eng.search(q, None, f, False, p * 20, 20)
        assert len(page["results"]) == 20 and page["more"] is (p < 9)
        seen += [r["id"] for r in page["results"]]
        sims += [r["similarity"] for r in page["results"]]
    assert len(set(seen)) == 200 and all(world["md"][i]["subreddit"].lower() == "s7" for i in seen)
    assert sims == sorted(sims, reverse=True)


def test_malformed_filters_are_refused():
    with pytest.raises(SearchInputError, match="exclude_subreddits"):
        parse_filters(Filters(exclude_subreddits=["not a name!"]))
    with pytest.raises(ValueError):
        Filters(min_score="high")  # type: ignore[arg-type]


def test_a_filter_on_a_far_cluster_is_reached_by_the_filtered_traversal(tmp_path):
    """Subreddits are topical: the nodes a filter matches can all sit in one region far from
    the query. The first traversal comes up short there; the second enters at matching nodes
    and expands them first. From the global entry point alone, with matching and non-matching
    nodes ranked alike, the search finds none of them."""
    rng = np.random.default_rng(0)
    n, dim = 10_000, 32
    cluster = rng.integers(0, 20, n)
    x = rng.standard_normal((20, dim))[cluster] + 0.5 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    md = [{"image_id": i + 1, "subreddit": f"c{cluster[i]}", "created_utc": T0, "score": 5} for i in range(n)]
    build_weighted_index(x, md, tmp_path / "ix", IndexParams(R=16, L=32, pq_bytes=16, seed=0), 0.2)
    with Index.open(tmp_path / "ix", threads=1) as index:
        eng = SearchEngine(index, index.weighting, ServeConfig(filter_scan_max=0, filter_L_max=100, search_L=20))
        f = parse_filters(Filters(nsfw=True, subreddits=["c7"]))
        rows = np.flatnonzero(cluster == 7)
        hits = 0
        for q in x[cluster == 0][:30]:
            page = eng.search(q, None, f, False, 0, 10)
            assert page["stats"]["plan"] == "graph-filtered" and page["stats"]["passes"] <= 2
            hits += len({r["id"] for r in page["results"]} & set(rows[np.argsort(-(x[rows] @ q))[:10]].tolist()))
        assert hits / 300 >= 0.9, hits / 300


def test_labels_read_column_wise_equal_the_row_by_row_labels():
    """`batch_labels` (Arrow columns, one name lookup per distinct subreddit) gives what
    `label_row` gives each row's dict, over nulls, cases, empty names, times before 2005 and
    past 2**32, negative, float, non-finite and huge scores, and every truthy NSFW form."""
    import pyarrow as pa

    from memescale.index.labels import LABEL_DTYPE, batch_labels, label_row

    rng = np.random.default_rng(3)
    n = 4000
    names = np.array(["pics", "Pics", "PICS", "memes", "", "İstanbul", "ÆØÅ", "x" * 40], dtype=object)
    sub = names[rng.integers(0, len(names), n)].tolist()
    created = rng.choice(np.array([-5, 0, 1_000_000_000, 1_104_537_599, 1_104_537_600, 1_600_000_000, 2**32 - 1, 2**32,
                                   2**40]), n).tolist()
    score_f = rng.choice(np.array([-3.5, 0.0, 0.9, 9.99, 150.0, 1e6, np.nan, np.inf, -np.inf]), n).tolist()
    score_i = rng.choice(np.array([-7, 0, 1, 9, 10, 99_999, 100_000, 2**62]), n).tolist()
    over_18 = rng.choice(np.array(["true", "TRUE", "Yes", "1", "0", "no", ""], dtype=object), n).tolist()
    nsfw = rng.integers(0, 3, n).tolist()
    null = rng.random((6, n)) < 0.1
    cols = {"subreddit": pa.array([None if z else v for z, v in zip(null[0], sub)], pa.string()),
            "created_utc": pa.array([None if z else v for z, v in zip(null[1], created)], pa.int64()),
            "over_18": pa.array([None if z else v for z, v in zip(null[3], over_18)], pa.string()),
            "nsfw": pa.array([None if z else v for z, v in zip(null[4], nsfw)], pa.int32())}
    for score in (pa.array([None if z else v for z, v in zip(null[2], score_f)], pa.float64()),
                  pa.array([None if z else v for z, v in zip(null[5], score_i)], pa.int64()),
                  pa.array([None if z else v for z, v in zip(null[5], score_i)], pa.int64()).cast(pa.uint64(), safe=False)):
        batch = pa.RecordBatch.from_pydict({**cols, "score": score})
        ids_a: dict[str, int] = {}
        ids_b: dict[str, int] = {}

        def numbering(ids: dict[str, int]):
            return lambda s: ids.setdefault(s, len(ids))

        got = batch_labels(batch, numbering(ids_a))
        want = np.array([label_row(m, numbering(ids_b)) for m in batch.to_pylist()], LABEL_DTYPE)
        assert got is not None and ids_a == ids_b
        for field in LABEL_DTYPE.names:
            np.testing.assert_array_equal(got[field], want[field], err_msg=field)
    odd = pa.RecordBatch.from_pydict({"score": pa.array([1e19, -1e19, 5.5, None]),
                                      "over_18": pa.array([1.0, 0.0, None, 1.0], pa.float16())})
    want = np.array([label_row(m, numbering({})) for m in odd.to_pylist()], LABEL_DTYPE)
    assert np.array_equal(batch_labels(odd, numbering({})), want)
    assert batch_labels(pa.RecordBatch.from_pydict({"score": pa.array(["12"])}), lambda s: 0) is None  # row by row
