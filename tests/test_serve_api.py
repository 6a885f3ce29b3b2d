"""The HTTP API against a real Ray Serve instance on loopback, over a small index (random
64-d vectors at the tiny model's width, Reddit-like metadata, planted near-duplicates)."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
from conftest import free_port, start_local_ray

from memescale.index.weighting import WeightError
from memescale.search.requests import SearchInputError
from memescale.testing.sample_data import ImageServer
from memescale.testing.sample_index import XSS_ROW, XSS_TITLE, build_sample_index, sample_corpus, write_images

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N, DIM = 300, 64


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray

    from serve import app as serve_app

    tmp = tmp_path_factory.mktemp("serve-api")
    images = write_images(tmp / "img", 64)
    with ImageServer(tmp) as images_srv:
        x, md = sample_corpus(N, DIM, seed=0, image_base_url=f"{images_srv.base_url}/img")
        build_sample_index(tmp / "index", x, md)
        telemetry = tmp / "telemetry" / "events.jsonl"
        start_local_ray()
        try:
            base = serve_app.start(tmp / "index", "configs/tiny.toml", "127.0.0.1", free_port(), overrides=[
                "serve.allow_private=true", f'serve.telemetry_path="{telemetry}"',
                "serve.telemetry_max_bytes=4096", "serve.default_k=10", "serve.api_max_ongoing_requests=2",
                "serve.max_queued_requests=2"])
            yield {"base": base, "x": x, "md": md, "images": images, "img_url": images_srv.base_url,
                   "telemetry": telemetry, "index": tmp / "index"}
        finally:
            serve_app.stop()
            ray.shutdown()


def search(app, **body) -> requests.Response:
    return requests.post(app["base"] + "/api/search", json=body, timeout=60)


def png_bytes(color=(200, 30, 30), size=(80, 60)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_info(app):
    info = requests.get(app["base"] + "/api/info", timeout=30).json()
    assert info["size"] == N and info["dim"] == DIM and info["index_dim"] == DIM + 5
    assert info["model"].startswith("memescale-tiny-vit") and info["text_search"] is True
    assert info["weights"] == ["meme", "aesthetic", "useful", "recency"]
    assert info["max_body_bytes"] == 8 * 1024 * 1024 and info["default_k"] == 10
    assert len(search(app, text="no k given").json()["results"]) == 10


def test_text_search_and_response_shape(app):
    r = search(app, text="a cat that finally compiles", k=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 12
    res = body["results"][0]
    assert set(res) >= {"url", "title", "subreddit", "permalink", "created_utc", "width", "height", "similarity"}
    assert set(body["stats"]) >= {"reads", "pq_comparisons", "ms", "filtered", "candidates", "encode_ms", "total_ms"}
    assert body["stats"]["filtered"] is True  # NSFW excluded by default
    assert not any(x["nsfw"] for x in body["results"])
    sims = [x["similarity"] for x in body["results"]]
    assert all(-1 <= s <= 1 for s in sims)


def test_embedding_search_is_exact_and_cosine(app):
    x = app["x"]
    r = search(app, embedding=x[3].tolist(), k=5, filters={"nsfw": True}, dedup=False)
    ids = [res["id"] for res in r.json()["results"]]
    assert ids == list(np.argsort(-(x @ x[3]))[:5])
    assert r.json()["results"][0]["similarity"] == pytest.approx(1.0, abs=2e-3)


def test_paging_with_cursor(app):
    first = search(app, text="monday coffee", k=8).json()
    assert first["offset"] == 0 and first["next_cursor"]
    second = search(app, text="monday coffee", k=8, cursor=first["next_cursor"]).json()
    assert second["offset"] == 8 and len(second["results"]) == 8
    assert not {r["id"] for r in first["results"]} & {r["id"] for r in second["results"]}
    bad = search(app, text="tuesday tea", k=8, cursor=first["next_cursor"])
    assert bad.status_code == 422 and "different query" in bad.json()["detail"]


def test_filters(app):
    md = app["md"]
    q = app["x"][0].tolist()
    subs = search(app, embedding=q, k=20, filters={"subreddits": ["memes"]}).json()
    assert subs["stats"]["filtered"] and {r["subreddit"] for r in subs["results"]} == {"memes"}
    assert subs["stats"]["plan"] == "scan" and 0 < subs["stats"]["filter_share"] < 0.5
    none = search(app, embedding=q, k=20, filters={"subreddits": ["no_such_subreddit"]}).json()
    assert none["results"] == [] and none["next_cursor"] is None
    created = sorted(m["created_utc"] for m in md)
    lo, hi = created[N // 4], created[3 * N // 4]
    rng = search(app, embedding=q, k=20, filters={"after": lo, "before": hi, "nsfw": True}).json()
    assert rng["results"] and all(lo <= r["created_utc"] < hi for r in rng["results"])
    with_nsfw = search(app, embedding=app["x"][9].tolist(), k=3, filters={"nsfw": True}, dedup=False).json()
    assert with_nsfw["results"][0]["id"] == 9 and with_nsfw["results"][0]["nsfw"] is True
    assert with_nsfw["stats"]["filtered"] is False


def test_dedup_default_on(app):
    q = app["x"][50].tolist()  # rows N-6..N-4 are near-copies of row 50
    on = search(app, embedding=q, k=10).json()
    off = search(app, embedding=q, k=10, dedup=False).json()
    group = {50, N - 6, N - 5, N - 4}
    assert len(group & {r["id"] for r in off["results"]}) == 4
    assert len(group & {r["id"] for r in on["results"]}) == 1
    assert on["stats"]["dropped_dedup"] == 3


def test_weights_change_the_ranking(app):
    q = app["x"][20].tolist()
    plain = search(app, embedding=q, k=20, filters={"nsfw": True}).json()["results"]
    recent = search(app, embedding=q, k=20, filters={"nsfw": True}, weights={"recency": 2}).json()["results"]
    assert np.median([r["created_utc"] for r in recent]) > np.median([r["created_utc"] for r in plain])


def test_like_searches_by_a_results_image(app):
    r = search(app, like=str(app["md"][42]["image_id"]), k=3, filters={"nsfw": True}, dedup=False).json()
    assert r["results"][0]["id"] == 42
    assert r["results"][0]["image_id"] == str(app["md"][42]["image_id"])
    assert search(app, like="12345").status_code == 422  # no such image
    assert search(app, like=42).status_code == 422  # image ids are decimal strings (JSON numbers lose digits)


def test_multi_term_queries_are_the_normalised_weighted_sum(app):
    x = app["x"]
    want = x[3] - 0.5 * x[7] + 0.8 * x[11]
    want /= np.linalg.norm(want)
    terms = [{"embedding": x[3].tolist()}, {"embedding": x[7].tolist(), "weight": -0.5},
             {"like": str(app["md"][11]["image_id"]), "weight": 0.8}]
    r = search(app, terms=terms, k=8, filters={"nsfw": True}, dedup=False)
    assert r.status_code == 200, r.text
    assert [res["id"] for res in r.json()["results"]] == list(np.argsort(-(x @ want))[:8])
    # a negative term pushes its neighbours down: x[7]'s nearest fall far in the ranking
    near7 = set(np.argsort(-(x @ x[7]))[:20].tolist())
    alone = search(app, embedding=x[3].tolist(), k=50, filters={"nsfw": True}, dedup=False).json()["results"]
    away = search(app, terms=[{"embedding": x[3].tolist()}, {"embedding": x[7].tolist(), "weight": -1}], k=50,
                  filters={"nsfw": True}, dedup=False).json()["results"]
    assert len(near7 & {res["id"] for res in away}) < len(near7 & {res["id"] for res in alone})
    # text terms and a single term equal the plain query; pages of a terms query page on
    one = search(app, terms=[{"text": "monday coffee", "weight": 2}], k=5).json()
    assert [res["id"] for res in one["results"]] == [res["id"] for res in search(app, text="monday coffee", k=5).json()["results"]]
    nxt = search(app, terms=terms, k=8, filters={"nsfw": True}, dedup=False, cursor=r.json()["next_cursor"]).json()
    assert nxt["offset"] == 8 and [res["id"] for res in nxt["results"]] == list(np.argsort(-(x @ want))[8:16])
    changed = dict(terms[1], weight=-0.6)
    assert search(app, terms=[terms[0], changed, terms[2]], k=8, filters={"nsfw": True}, dedup=False,
                  cursor=r.json()["next_cursor"]).status_code == 422  # another query


def test_image_upload_and_image_url(app):
    data = png_bytes()
    up = search(app, image=base64.b64encode(data).decode(), k=5)
    assert up.status_code == 200, up.text
    url = search(app, image_url=f"{app['img_url']}/img/3.png", k=5)
    assert url.status_code == 200, url.text
    same = search(app, image=base64.b64encode((app["images"] / "3.png").read_bytes()).decode(), k=5)
    assert [r["id"] for r in url.json()["results"]] == [r["id"] for r in same.json()["results"]]


@pytest.mark.parametrize("body, status, needle", [
    ({"text": "a", "image_url": "http://example.com/x.png"}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"text": "a", "k": "ten"}, 422, "integer"),
    ({"text": ["a"]}, 422, "string"),
    ({"text": "a", "k": 5000}, 422, "less than or equal"),
    ({"embedding": [0.1, 0.2, 0.3]}, 422, "this index's model produces 64"),
    ({"embedding": [0.0] * 64}, 422, "zero vector"),
    ({"text": "meme " * 80}, 422, "tokens long"),
    ({"image": "bm90IGFuIGltYWdl"}, 422, "could not be decoded"),
    ({"image": "%%%not base64%%%"}, 422, "base64"),
    ({"image_url": "http://169.254.169.254/latest/meta-data/"}, 422, "blocked_address"),
    ({"image_url": "file:///etc/passwd"}, 422, "bad_url"),
    ({"image_url": "http://127.0.0.1:1/nothing.png"}, 422, "could not be fetched"),
    ({"like": "1000000"}, 422, "like: no image 1000000 in this index"),
    ({"text": "a", "weights": {"meme": 3}}, 422, "less than or equal"),
    ({"text": "a", "filters": {"after": "yesterday"}}, 422, "ISO 8601"),
    ({"text": "a", "filters": {"min_score": "high"}}, 422, "integer"),
    ({"text": "a", "filters": {"exclude_subreddits": ["a b"]}}, 422, "not a subreddit name"),
    ({"text": "a", "cursor": "garbage!"}, 422, "malformed"),
    ({"terms": []}, 422, "at least 1"),
    ({"terms": [{"text": "a", "weight": 0}]}, 422, "must not be 0"),
    ({"terms": [{"text": "a", "like": "1"}]}, 422, "exactly one"),
    ({"terms": [{"text": "a"}], "text": "b"}, 422, "exactly one"),
    ({"terms": [{"text": "a"}] * 9}, 422, "at most 8"),
    ({"terms": [{"embedding": [1.0] + [0.0] * 63}, {"embedding": [1.0] + [0.0] * 63, "weight": -1}]}, 422,
     "cancel out"),
    ({"terms": [{"like": "1000000"}]}, 422, "like: no image 1000000 in this index"),
])
def test_bad_input_is_4xx_with_a_message(app, body, status, needle):
    r = search(app, **body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert "Traceback" not in r.text and "ray::" not in r.text  # the message, not a remote traceback


def test_not_json_and_oversize_bodies(app):
    url = app["base"] + "/api/search"
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422
    big = json.dumps({"image": "A" * (9 * 1024 * 1024)}).encode()
    r = requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.text

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(9):
            yield b"A" * (1024 * 1024)

    r = requests.post(url, data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413


def test_telemetry_append_opt_out_and_bound(app):
    url = app["base"] + "/api/telemetry"
    path = app["telemetry"]
    ev = {"events": [{"type": "search", "props": {"kind": "text", "results": 10}}]}
    r = requests.post(url, json=ev, timeout=30)
    assert r.status_code == 202 and r.json()["stored"] == 1
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["type"] == "search" and line["props"] == {"kind": "text", "results": 10} and "received" in line
    before = path.read_text()
    for header in ({"DNT": "1"}, {"Sec-GPC": "1"}):
        r = requests.post(url, json=ev, headers=header, timeout=30)
        assert r.status_code == 202 and r.json()["stored"] == 0
    assert path.read_text() == before
    assert requests.post(url, json={"events": [{"type": "x", "props": {"a": "b" * 3000}}]}, timeout=30).status_code == 413
    assert requests.post(url, json={"events": [{"type": "<bad>"}]}, timeout=30).status_code == 422
    assert requests.post(url, json={"events": [{"type": "x"}] * 21}, timeout=30).status_code == 422
    for _ in range(60):  # ~100 bytes each: the 4 KiB file rotates, the pair stays bounded
        requests.post(url, json=ev, timeout=30)
    rotated = path.with_name(path.name + ".1")
    assert rotated.exists() and path.stat().st_size <= 4096 and rotated.stat().st_size <= 4096


def test_metrics_docs_and_page(app):
    base = app["base"]
    search(app, text="metrics please")
    m = requests.get(base + "/metrics", timeout=30)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'memescale_serve_requests_total{route="/api/search",status="200"}' in m.text
    assert 'memescale_serve_latency_seconds_bucket{stage="encode",le="+Inf"}' in m.text
    spec = requests.get(base + "/openapi.json", timeout=30).json()
    assert {"/api/search", "/api/info", "/api/telemetry", "/metrics"} <= set(spec["paths"])
    assert requests.get(base + "/docs", timeout=30).status_code == 200
    page = requests.get(base + "/", timeout=30)
    assert page.status_code == 200 and "memescale" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert requests.get(f"{base}/static/{asset}", timeout=30).status_code == 200


def test_xss_title_is_returned_verbatim_as_data(app):
    r = search(app, like=str(app["md"][XSS_ROW]["image_id"]), k=1, filters={"nsfw": True}).json()
    assert r["results"][0]["title"] == XSS_TITLE  # JSON carries it as a string; the page escapes it


def test_concurrent_requests(app):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"query number {i}" for i in range(24)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: search(app, text=t, k=10), texts))
    # 8 clients against 2 requests at once and 2 queue places: the excess is refused at once
    # with Retry-After (test_a_burst_...), the rest served
    codes = [r.status_code for r in got]
    admitted = 2 + 2  # the fixture's 2 requests at once in the Api and 2 queued at the proxy
    assert set(codes) <= {200, 503} and codes.count(200) >= admitted, (codes.count(200), codes.count(503))
    assert all(r.headers.get("Retry-After") for r in got if r.status_code == 503)
    assert time.perf_counter() - t0 < 30


def test_a_burst_beyond_the_admission_limit_gets_fast_503s_with_retry_after(app):
    """A burst of simultaneous searches, many times what the fixture admits (2 at once in the
    Api, 2 queued at the proxy): the excess is refused with 503 and Retry-After, the admitted
    ones answer 200, nothing else, and the server serves on."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from memescale.config import load_config

    s = load_config("configs/tiny.toml").serve
    n = 48
    gate = threading.Barrier(n)

    def one(i: int) -> tuple[int, str | None]:
        gate.wait()
        r = search(app, text=f"burst {i}", k=10)
        return r.status_code, r.headers.get("Retry-After")

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, range(n)))
    codes = [c for c, _ in got]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert all(ra == str(int(s.retry_after_s)) for c, ra in got if c == 503)
    assert search(app, text="after the burst", k=10).status_code == 200


# -- without Serve: error hand-over and the Api's downloader ---------------------------------


@pytest.mark.parametrize("raised, status", [
    (lambda: SearchInputError("too big", 413), 413),
    (lambda: WeightError("no such weight"), 422),
])
def test_deployment_errors_reach_the_client_as_raised(raised, status):
    """A deployment's SearchInputError/WeightError arrives at the Api inside a RayTaskError
    whose message is the remote traceback; the Api re-raises the original."""
    from ray.exceptions import RayTaskError

    from serve.app import Unavailable, _backend_errors

    original = raised()
    wrapped = RayTaskError("Encoder.encode_text", "Traceback (most recent call last): ...", original
                           ).as_instanceof_cause()
    assert isinstance(wrapped, type(original)) and str(wrapped) != str(original)
    with pytest.raises(type(original)) as got, _backend_errors():
        raise wrapped
    assert got.value is original and str(got.value) == str(original)
    assert getattr(got.value, "status", 422) == status
    local = raised()
    with pytest.raises(type(original)) as got, _backend_errors():
        raise local
    assert got.value is local
    with pytest.raises(Unavailable, match="RayTaskError"), _backend_errors():
        raise RayTaskError("Searcher.search", "Traceback ...", RuntimeError("boom")).as_instanceof_cause()


def test_api_closes_its_image_url_session_on_shutdown(tmp_path):
    """Serve awaits the Api's __del__ when the replica stops: the image_url session it
    opened on the first fetch is closed there."""
    import asyncio
    import gc
    import warnings

    from memescale.config import load_config
    from serve.app import ROOT, Api

    user_class = Api.func_or_class.__mro__[1]  # the class under Serve's ingress wrapper
    assert user_class.__module__ == "serve.app" and "_fetch" in vars(user_class)
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["serve.allow_private=true"])
    write_images(tmp_path / "img", 2)

    async def run(base_url: str):
        api = user_class(None, None, cfg, str(tmp_path / "telemetry.jsonl"))
        data = await api._fetch(f"{base_url}/img/1.png")
        downloads = api._downloads
        assert data.startswith(b"\x89PNG") and downloads.is_open
        await api.__del__()
        return downloads

    with warnings.catch_warnings(record=True) as caught, ImageServer(tmp_path) as srv:
        warnings.simplefilter("always", ResourceWarning)
        downloads = asyncio.run(run(srv.base_url))
        gc.collect()
    assert downloads.closed and not downloads.is_open
    assert not [w for w in caught if "Unclosed" in str(w.message)]


def _until(check, what: str, timeout_s: float = 30.0):
    """Poll `check` until it returns a true value (the server refreshes every serve.refresh_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"the server did not {what} within {timeout_s} s"
        time.sleep(0.05)


def test_the_running_server_follows_deletes_inserts_and_a_new_generation(app, tmp_path):
    """Last in this module: it updates the index the app serves."""
    import threading

    from memescale.index.update import consolidate, delete_ids, insert_shards
    from memescale.testing.sample_data import write_vector_shards

    md, x = app["md"], app["x"]
    gone, kept = md[42]["image_id"], md[43]["image_id"]
    first = lambda: search(app, embedding=x[42].tolist(), k=1, dedup=False,  # noqa: E731
                           filters={"nsfw": True}).json()["results"][0]["image_id"]
    assert first() == str(gone)
    delete_ids(app["index"], np.array([gone]))
    t0 = time.monotonic()
    _until(lambda: first() != str(gone), "drop a deleted image")
    assert time.monotonic() - t0 < 5
    assert search(app, like=str(gone)).status_code == 422

    failures: list[str] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r = search(app, embedding=x[7].tolist(), k=5, filters={"nsfw": True})
            if r.status_code != 200 or not r.json()["results"]:
                failures.append(f"{r.status_code} {r.text[:200]}")

    t = threading.Thread(target=hammer)
    t.start()
    try:
        assert consolidate(app["index"])["generation"] == 1
        like = lambda: search(app, like=str(kept), k=1, dedup=False,  # noqa: E731
                              filters={"nsfw": True}).json()["results"][0]
        # the stable id still works, and the server now reads generation 1, where node ids moved
        hit = _until(lambda: (r := like())["id"] == 42 and r, "switch to the new generation")
        assert hit["image_id"] == str(kept)
        info = requests.get(app["base"] + "/api/info", timeout=30).json()
        assert info["generation"] == 1 and info["size"] == N - 1
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:3]

    # an insert shows up too, from the delta, without a restart
    v = np.random.default_rng(9).standard_normal(DIM).astype(np.float32)
    v /= np.linalg.norm(v)
    write_vector_shards(tmp_path / "new", v[None, :], overrides={"image_id": np.array([777])})
    assert insert_shards(app["index"], str(tmp_path / "new"))["inserted"] == 1
    top = lambda: search(app, embedding=v.tolist(), k=1, dedup=False,  # noqa: E731
                         filters={"nsfw": True}).json()["results"][0]
    assert _until(lambda: top()["image_id"] == "777", "serve an inserted image")


def test_an_encoder_gpu_the_cluster_lacks_is_refused_before_serving(app):
    from memescale.ray_runtime import MissingGPUs
    from serve import app as serve_app

    with pytest.raises(MissingGPUs, match=r"serve's encoder asks for 2 GPU\(s\) .* has 0"):
        serve_app._gpus_per_encoder(1.0, 2)
    assert serve_app._gpus_per_encoder(-1.0) == 0.0 and serve_app._gpus_per_encoder(0.0) == 0.0


def _replica_rss_anon() -> tuple[int, int]:
    """(count, summed RssAnon) of this app's live Serve replica processes (API, encoder,
    searcher): descendants of this process, whose Ray the fixture started (another test
    worker's app on the same machine is not counted)."""
    import psutil

    count = total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ServeReplica:memescale:" not in " ".join(proc.cmdline()):
                continue
            with open(f"/proc/{proc.pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
            count += 1
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return count, total


def _bomb_png(side: int = 60000) -> bytes:
    """A valid PNG header claiming side x side pixels, with one tiny IDAT: a decompression
    bomb as far as any decoder that trusts the header is concerned."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_hostile_uploads_are_refused_fast_and_leave_no_memory_behind(app):
    """Decompression bombs, truncated files, 100 MB bodies and non-images, each sent 20
    times: every one a 4xx with a message (the median answer well under 2 s), no replica
    dies, and the replicas' anonymous memory is back near its baseline afterwards."""
    url = app["base"] + "/api/search"
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (400, 300), (10, 200, 30)).save(jpeg, "JPEG", quality=90)
    cases = {
        "bomb": ({"image": base64.b64encode(_bomb_png()).decode()}, 422, "bomb"),
        "truncated": ({"image": base64.b64encode(jpeg.getvalue()[: len(jpeg.getvalue()) // 3]).decode()}, 422,
                      "could not be decoded"),
        "not an image": ({"image": base64.b64encode(np.random.default_rng(0).bytes(50_000)).decode()}, 422,
                         "could not be decoded"),
    }
    search(app, text="warm up")
    before = _replica_rss_anon()
    huge = b'{"image": "' + b"A" * (100 * 2**20) + b'"}'
    for name, (body, status, needle) in cases.items():
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = search(app, **body)
            times.append(time.perf_counter() - t0)
            assert r.status_code == status and needle in r.text, (name, r.status_code, r.text[:200])
        assert sorted(times)[10] < 2.0, (name, times)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        r = requests.post(url, data=huge, headers={"Content-Type": "application/json"}, timeout=60)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 413 and "limit" in r.text
    assert sorted(times)[10] < 2.0, times
    assert search(app, text="still alive").status_code == 200
    after = _replica_rss_anon()
    assert before[0] >= 3 and after[0] == before[0]  # no replica died or was replaced
    assert after[1] - before[1] < 64 * 2**20, (before, after)
