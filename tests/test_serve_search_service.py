"""The Ray-free search logic: request validation, cursors, query vectors, filters, dedup and
paging against a real small index (exact answers known by brute force)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pydantic import ValidationError

from memescale.config import ServeConfig
from memescale.embed.encoder import token_count
from memescale.index.weighting import WeightError, Weighting
from memescale.search.cursor import decode_cursor, encode_cursor, query_hash
from memescale.search.engine import SearchEngine, dedup_order, parse_filters
from memescale.search.requests import (
    Filters,
    SearchInputError,
    SearchRequest,
    decode_base64_image,
    embedding_vector,
)
from memescale.testing.sample_index import XSS_ROW, XSS_TITLE, build_sample_index, sample_corpus

N, DIM = 400, 32
DUPS = (50, 51)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from memescale.index import Index

    x, md = sample_corpus(N, DIM, seed=3, duplicates_of=DUPS, copies=3)
    out = tmp_path_factory.mktemp("svc") / "idx"
    build_sample_index(out, x, md)
    index = Index.open(out, threads=1)
    yield x, md, index, Weighting.load(out)
    index.close()


def engine(corpus, **cfg) -> SearchEngine:
    _, _, index, w = corpus
    return SearchEngine(index, w, ServeConfig(**{"dedup_threshold": 0.999, **cfg}))


def ids_of(page) -> list[int]:
    return [r["id"] for r in page["results"]]


# -- request model --------------------------------------------------------------------------

@pytest.mark.parametrize("body, msg", [
    ({}, "exactly one"),
    ({"text": "a", "embedding": [1.0]}, "exactly one"),
    ({"text": "   "}, "empty"),
    ({"text": "a", "k": 0}, "greater than or equal"),
    ({"text": "a", "k": 1001}, "less than or equal"),
    ({"text": "a", "k": "5"}, "valid integer"),
    ({"text": 5}, "valid string"),
    ({"text": "a", "dedup": "yes"}, "valid boolean"),
    ({"text": "a", "weights": {"meme": 2.5}}, "less than or equal"),
    ({"text": "a", "weights": {"spicy": 1}}, "Extra inputs"),
    ({"text": "a", "filters": {"nsfw": 1}}, "valid boolean"),
    ({"text": "a", "color": "red"}, "Extra inputs"),
    ({"like": "-1"}, "pattern"),
])
def test_request_validation(body, msg):
    with pytest.raises(ValidationError, match=msg):
        SearchRequest.model_validate(body)


def test_request_defaults_and_input_kind():
    r = SearchRequest.model_validate({"embedding": [1, 0, 0.5]})
    assert r.input_kind == "embedding" and r.k == 24 and r.dedup is True
    assert r.filters.nsfw is False and r.weights.as_dict() == dict.fromkeys(("meme", "aesthetic", "useful", "recency"), 0.0)


def test_filters_parse_dates_and_names():
    f = parse_filters(Filters(after="2020-01-01", before="2020-02-01T00:00:00Z", subreddits=["r/Memes", "pics"]))
    assert f.after == 1577836800 and f.before == 1580515200
    assert f.subreddits == frozenset({"memes", "pics"}) and f.active
    assert parse_filters(Filters(nsfw=True)).active is False
    with pytest.raises(SearchInputError, match="ISO 8601"):
        parse_filters(Filters(after="last tuesday"))
    with pytest.raises(SearchInputError, match="earlier"):
        parse_filters(Filters(after=10, before=5))
    with pytest.raises(SearchInputError, match="subreddit name"):
        parse_filters(Filters(subreddits=["<script>"]))


def test_cursor_roundtrip_and_binding_to_the_query():
    a = SearchRequest.model_validate({"text": "cats"})
    b = SearchRequest.model_validate({"text": "cats", "weights": {"meme": 1}})
    c = SearchRequest.model_validate({"text": "cats", "k": 7})  # k is not part of the query
    h = query_hash(a)
    assert query_hash(c) == h and query_hash(b) != h
    cur = encode_cursor(48, h)
    assert decode_cursor(cur, h) == 48 and decode_cursor(None, h) == 0
    with pytest.raises(SearchInputError, match="different query"):
        decode_cursor(cur, query_hash(b))
    for bad in ("", "!!!", "abc", cur[:-3]):
        with pytest.raises(SearchInputError, match="malformed"):
            decode_cursor(bad, h)


def test_embedding_and_base64_inputs():
    v = embedding_vector([3, 4], 2)
    np.testing.assert_allclose(v, [0.6, 0.8], rtol=1e-6)
    for values, msg in (([1, 2, 3], "has 3 values"), ([0, 0], "zero"), ([1, float("nan")], "non-finite")):
        with pytest.raises(SearchInputError, match=msg):
            embedding_vector(values, 2)
    raw = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    for enc in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
                "data:image/png;base64," + base64.b64encode(raw).decode()):
        assert decode_base64_image(enc, 10_000) == raw
    with pytest.raises(SearchInputError, match="not valid base64"):
        decode_base64_image("@@@@", 100)
    with pytest.raises(SearchInputError) as e:
        decode_base64_image("A" * 2000, 100)
    assert e.value.status == 413


def test_token_count_matches_the_open_clip_tokenizer():
    from memescale.embed.torchvision_shim import ensure_torchvision

    ensure_torchvision()
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    assert token_count(tok, "a cat") == 4
    long = "word " * 100
    assert token_count(tok, long) == 102
    assert token_count(object(), "x") is None


# -- engine -----------------------------------------------------------------------------------

def test_unfiltered_search_is_exact_on_a_small_index(corpus):
    x, md, _, _ = corpus
    eng = engine(corpus)
    q = x[10]
    page = eng.search(q, None, parse_filters(Filters(nsfw=True)), False, 0, 10)
    exact = list(np.argsort(-(x @ q))[:10])
    assert ids_of(page) == exact
    sims = [r["similarity"] for r in page["results"]]
    np.testing.assert_allclose(sims, (x @ q)[exact], atol=2e-3)  # fp16 storage
    assert page["stats"]["filtered"] is False and page["stats"]["passes"] == 1
    r0 = page["results"][0]
    assert r0["permalink"].startswith("https://www.reddit.com/r/") and r0["title"] == md[10]["title"]
    assert page["more"] is True


def test_direct_reads_serve_the_same_pages(corpus):
    """serve.index_io = "direct" (O_DIRECT reads) gives the pages the page-cache path gives."""
    from memescale.index import Index
    from memescale.index.aio import DirectIOUnavailable

    x, _, index, w = corpus
    try:
        direct = Index.open(index.path, threads=1, io=ServeConfig(index_io="direct").index_io)
    except DirectIOUnavailable as e:
        pytest.skip(f"no O_DIRECT / native AIO here: {e}")
    with direct:
        for q in (x[3], x[77]):
            want = engine(corpus).search(q, None, parse_filters(Filters()), True, 0, 12)
            got = SearchEngine(direct, w, ServeConfig(dedup_threshold=0.999)).search(
                q, None, parse_filters(Filters()), True, 0, 12)
            assert ids_of(got) == ids_of(want) and len(ids_of(got)) == 12


def test_nsfw_is_excluded_by_default(corpus):
    x, md, _, _ = corpus
    q = x[19]  # row 19 is NSFW (every 10th)
    assert md[19]["over_18"]
    page = engine(corpus).search(q, None, parse_filters(Filters()), False, 0, 30)
    assert 19 not in ids_of(page) and not any(r["nsfw"] for r in page["results"])
    # the filter runs inside the traversal: no NSFW candidate reaches the post-filter
    assert page["stats"]["filtered"] is True and page["stats"]["plan"] == "graph-filtered"
    assert page["stats"]["dropped_filter"] == 0 and 0.85 < page["stats"]["filter_share"] < 0.95
    assert len(page["results"]) == 30


def test_selective_subreddit_filter_scans_its_members_and_says_so(corpus):
    x, md, _, _ = corpus
    eng = engine(corpus)
    spec = parse_filters(Filters(nsfw=True, subreddits=["memes"]))
    page = eng.search(x[0], None, spec, False, 0, 40)
    st = page["stats"]
    members = sum(m["subreddit"] == "memes" for m in md)
    assert st["filtered"] and st["plan"] == "scan" and st["passes"] == 1 and not st["deepened"]
    assert abs(st["filter_share"] - members / len(md)) < 1e-9
    assert all(r["subreddit"] == "memes" for r in page["results"])
    want = [i for i in np.argsort(-(x @ x[0])) if md[i]["subreddit"] == "memes"][:40]
    assert len(set(ids_of(page)) & set(want)) >= 39  # PQ-ranked, exactly re-ranked


def test_time_range_filter(corpus):
    x, md, _, _ = corpus
    created = np.array([m["created_utc"] for m in md])
    lo, hi = np.percentile(created, [25, 75]).astype(int)
    page = engine(corpus).search(x[1], None, parse_filters(Filters(nsfw=True, after=int(lo), before=int(hi))), False, 0, 20)
    assert page["results"] and all(lo <= r["created_utc"] < hi for r in page["results"])


def test_dedup_drops_planted_copies(corpus):
    x, _, _, _ = corpus
    copies = list(range(N - 6, N - 3))  # copies of row 50
    q = x[DUPS[0]]
    plain = engine(corpus).search(q, None, parse_filters(Filters(nsfw=True)), False, 0, 10)
    assert set(copies) | {DUPS[0]} <= set(ids_of(plain)[:4])
    dd = engine(corpus).search(q, None, parse_filters(Filters(nsfw=True)), True, 0, 10)
    kept = set(ids_of(dd)) & (set(copies) | {DUPS[0]})
    assert len(kept) == 1 and len(dd["results"]) == 10
    assert dd["stats"]["dropped_dedup"] == 3


def test_dedup_order_greedy():
    v = np.array([[1, 0], [0.9999, 0.0141], [0, 1], [0.0141, 0.9999], [0.7071, 0.7071]], np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    kept, examined = dedup_order(v, 0.999, 10)
    assert kept.tolist() == [0, 2, 4] and examined == 5
    kept, examined = dedup_order(v, 0.999, 2)
    assert kept.tolist() == [0, 2] and examined == 3


def test_pages_concatenate_to_one_deep_page(corpus):
    x, _, _, _ = corpus
    eng = engine(corpus)
    spec = parse_filters(Filters())
    deep = ids_of(eng.search(x[5], None, spec, True, 0, 60))
    pages = []
    for off in (0, 20, 40):
        pages += ids_of(eng.search(x[5], None, spec, True, off, 20))
    assert len(set(pages)) == 60
    assert len(set(pages) & set(deep)) >= 57  # a deeper search may refine the order slightly


def test_paging_ends(corpus):
    x, _, _, _ = corpus
    eng = engine(corpus, max_depth=50)
    page = eng.search(x[2], None, parse_filters(Filters(nsfw=True)), False, 40, 10)
    assert len(page["results"]) == 10 and page["more"] is False


def test_weights_and_like(corpus):
    x, md, _, _ = corpus
    eng = engine(corpus)
    spec = parse_filters(Filters(nsfw=True))
    base = eng.search(x[7], None, spec, False, 0, 20)
    newer = eng.search(x[7], {"recency": 2.0}, spec, False, 0, 20)
    t = lambda p: np.median([r["created_utc"] for r in p["results"]])  # noqa: E731
    assert t(newer) > t(base)
    np.testing.assert_allclose(eng.vector_of(md[7]["image_id"]), x[7], atol=2e-3)
    assert md[XSS_ROW]["title"] == XSS_TITLE
    with pytest.raises(SearchInputError, match="no image"):
        eng.vector_of(12345)
    with pytest.raises(WeightError):
        eng.search(x[7], {"meme": 9.0}, spec, False, 0, 5)


def test_engine_refuses_a_mismatched_weighting(corpus):
    _, _, index, _ = corpus
    with pytest.raises(ValueError, match="dims"):
        SearchEngine(index, Weighting(base_dim=DIM), ServeConfig())


def test_an_index_without_weighting_takes_zero_weights_only(tmp_path):
    from memescale.index import Index, IndexParams, build_index

    x, md = sample_corpus(150, 16, seed=4)
    build_index(x, md, tmp_path / "plain", IndexParams(R=16, L=32, pq_bytes=8))
    with Index.open(tmp_path / "plain", threads=1) as index:
        w = Weighting.load(tmp_path / "plain", base_dim=index.dim)
        assert w.names == () and w.dim == 16
        eng = SearchEngine(index, w, ServeConfig())
        spec = parse_filters(Filters(nsfw=True))
        zero = eng.search(x[3], {"meme": 0.0, "recency": 0.0}, spec, False, 0, 5)
        assert [r["id"] for r in zero["results"]][0] == 3
        with pytest.raises(WeightError, match="built without the 'recency' signal"):
            eng.search(x[3], {"recency": 0.5}, spec, False, 0, 5)
