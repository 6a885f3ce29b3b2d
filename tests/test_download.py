"""Downloader against a real loopback HTTP server (aiohttp.web on 127.0.0.1, random port).

The server runs in a background thread with its own event loop and counts hits per path, so
the tests can check how many requests the client really made. Timeouts are a few tenths of a
second; no test sleeps itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import socket
import threading
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from aiohttp import web
from PIL import Image, features

from memescale.config import IngestConfig
from memescale.ingest.download import (
    REASONS,
    Downloader,
    SharedDownloader,
    count_reasons,
    fetch_all,
    sniff_mime,
)
from memescale.ingest.netguard import AddressPolicy

MAX_BYTES = 64 * 1024
SLOW_S = 5.0  # how long /slow would take; the server releases it at teardown
HOLD_S = 0.1  # how long /hold keeps a request in flight


def _image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image_bytes("PNG")
HTML = b"<!doctype html><html><head><title>not an image</title></head><body>hello</body></html>"


class LoopbackServer:
    """An aiohttp.web test server in a background thread; `hits` counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())
        self.base = f"http://127.0.0.1:{self.port}"

    def _call(self, coro):  # noqa: ANN001, ANN202 - runs a coroutine on the server loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._count])
        app.router.add_routes(
            [
                web.get("/img/{name}", self._image),
                web.get("/page", self._fixed(body=HTML, content_type="image/jpeg")),
                web.get("/short", self._fixed(body=b"hello")),
                web.get("/empty", self._fixed(body=b"")),
                web.get("/status/{code}", self._status),
                web.get("/flaky/{key}", self._flaky),
                web.get("/slow", self._slow),
                web.get("/hold/{key}", self._hold),
                web.get("/redirect", self._redirect),
                web.get("/loop/{name}", self._loop_redirect),
                web.get("/chain/{n}", self._chain),
                web.get("/big", self._big),
                web.get("/big-chunked", self._big_chunked),
            ]
        )
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return sock.getsockname()[1]

    def close(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _stop(self) -> None:
        self._release.set()
        await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler):  # noqa: ANN001, ANN202
        self.hits[request.path] += 1
        return await handler(request)

    @staticmethod
    def _fixed(**kwargs):  # noqa: ANN003, ANN205 - a handler that always gives the same response
        async def handler(request: web.Request) -> web.Response:
            return web.Response(**kwargs)

        return handler

    async def _image(self, request: web.Request) -> web.Response:
        """The PNG under a misleading Content-Type (the client must not care)."""
        return web.Response(body=PNG, content_type="text/html")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def _flaky(self, request: web.Request) -> web.Response:
        """500 on the first two hits of a path, the image from the third on."""
        if self.hits[request.path] < 3:
            return web.Response(status=500)
        return web.Response(body=PNG)

    async def _slow(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self._release.wait(), SLOW_S)
        except TimeoutError:
            pass
        return web.Response(body=PNG)

    async def _hold(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(HOLD_S)
        self.in_flight -= 1
        return web.Response(body=PNG)

    async def _redirect(self, request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def _loop_redirect(self, request: web.Request) -> web.Response:
        other = "b" if request.match_info["name"] == "a" else "a"
        return web.Response(status=301, headers={"Location": f"/loop/{other}"})

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG)
        return web.Response(status=307, headers={"Location": f"{n - 1}"})

    async def _big(self, request: web.Request) -> web.Response:
        return web.Response(body=PNG + bytes(MAX_BYTES))

    async def _big_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(PNG)
            for _ in range(8):
                await resp.write(bytes(MAX_BYTES // 2))
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp


@pytest.fixture(scope="module")
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


@pytest.fixture
def cfg() -> IngestConfig:
    return IngestConfig(
        allow_private=True,
        connect_timeout_s=0.3,
        read_timeout_s=0.3,
        total_timeout_s=1.0,
        retries=2,
        backoff_s=0.01,
        max_bytes=MAX_BYTES,
        max_redirects=5,
    )


def fetch_one(url: str, cfg: IngestConfig, policy: AddressPolicy | None = None):  # noqa: ANN201
    [result] = fetch_all([url], cfg, policy)
    assert result.reason is None or result.reason in REASONS
    return result


def test_fetches_image_and_ignores_content_type(server, cfg):
    r = fetch_one(f"{server.base}/img/a.png", cfg)
    assert r.ok and r.reason is None
    assert r.data == PNG and r.mime == "image/png" and r.status == 200
    assert r.attempts == 1 and r.final_url == r.url and r.elapsed_s > 0


def test_html_is_wrong_type_even_when_labelled_image(server, cfg):
    r = fetch_one(f"{server.base}/page", cfg)
    assert (r.ok, r.reason, r.status, r.data) == (False, "wrong_type", 200, None)
    assert fetch_one(f"{server.base}/short", cfg).reason == "wrong_type"
    assert fetch_one(f"{server.base}/empty", cfg).reason == "empty"


def test_slow_server_times_out_after_retries(server, cfg):
    cfg = replace(cfg, retries=1)
    r = fetch_one(f"{server.base}/slow", cfg)
    assert (r.reason, r.status, r.attempts) == ("timeout", None, 2)
    assert server.hits["/slow"] == 2
    assert r.elapsed_s < 2.0


def test_500_is_retried_until_success(server, cfg):
    r = fetch_one(f"{server.base}/flaky/ok", cfg)
    assert r.ok and r.attempts == 3 and server.hits["/flaky/ok"] == 3


def test_500_gives_up_when_retries_are_spent(server, cfg):
    r = fetch_one(f"{server.base}/flaky/fail", replace(cfg, retries=1))
    assert (r.reason, r.status, r.attempts) == ("http_5xx", 500, 2)
    assert server.hits["/flaky/fail"] == 2


def test_4xx_is_not_retried_but_429_is(server, cfg):
    r = fetch_one(f"{server.base}/status/404", cfg)
    assert (r.reason, r.status, r.attempts) == ("http_4xx", 404, 1)
    r = fetch_one(f"{server.base}/status/429", cfg)
    assert (r.reason, r.status, r.attempts) == ("http_429", 429, 3)
    assert server.hits["/status/429"] == 3


def test_connection_refused_is_connect_error(cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = fetch_one(f"http://127.0.0.1:{port}/x.png", cfg)
    assert (r.reason, r.attempts) == ("connect_error", 3)


def test_redirect_chain_within_limit(server, cfg):
    r = fetch_one(f"{server.base}/chain/3", cfg)
    assert r.ok and r.attempts == 4 and r.final_url == f"{server.base}/chain/0"


def test_too_many_redirects(server, cfg):
    r = fetch_one(f"{server.base}/chain/19", cfg)
    assert (r.reason, r.status, r.attempts) == ("too_many_redirects", 307, 6)
    assert server.hits["/chain/14"] == 1 and server.hits["/chain/13"] == 0


def test_redirect_loop(server, cfg):
    r = fetch_one(f"{server.base}/loop/a", cfg)
    assert (r.reason, r.status, r.attempts) == ("redirect_loop", 301, 2)


def test_redirect_to_other_scheme_is_bad_url(server, cfg):
    r = fetch_one(f"{server.base}/redirect?to=file:///etc/passwd", cfg)
    assert (r.reason, r.status) == ("bad_url", 302)


def test_oversize_with_content_length(server, cfg):
    r = fetch_one(f"{server.base}/big", cfg)
    assert (r.reason, r.status, r.data) == ("too_large", 200, None)


def test_oversize_chunked(server, cfg):
    r = fetch_one(f"{server.base}/big-chunked", cfg)
    assert (r.reason, r.status) == ("too_large", 200)


def test_non_http_schemes_and_credentials_are_bad_urls(cfg):
    for url in ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://h/", "data:image/png;base64,AA",
                "http://user:pw@127.0.0.1/x.png", "not a url", "http:///nohost"]:
        r = fetch_one(url, cfg)
        assert (r.reason, r.attempts) == ("bad_url", 0), url


def test_literal_private_ips_refused_without_allow_private(server, cfg):
    strict = replace(cfg, allow_private=False)
    for host in ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]:
        r = fetch_one(f"http://{host}:{server.port}/img/literal.png", strict)
        assert (r.reason, r.attempts) == ("blocked_address", 0), host
    assert server.hits["/img/literal.png"] == 0


def test_hostname_resolving_to_loopback_refused_at_connect(server, cfg):
    r = fetch_one(f"http://localhost:{server.port}/img/named.png", replace(cfg, allow_private=False))
    assert (r.reason, r.attempts) == ("blocked_address", 1)
    assert server.hits["/img/named.png"] == 0


def test_redirect_from_allowed_host_to_blocked_address(server, cfg):
    """Only 127.0.0.1 is allowed: the first hop goes through, the redirect target does not."""
    policy = AddressPolicy.from_config(replace(cfg, allow_private=False), ["127.0.0.1/32"])
    assert fetch_one(f"{server.base}/img/first-hop.png", cfg, policy).ok
    assert fetch_one(f"http://localhost:{server.port}/img/first-hop.png", cfg, policy).ok
    for target in [f"http://127.0.0.2:{server.port}/x", f"http://[::1]:{server.port}/x"]:
        r = fetch_one(f"{server.base}/redirect?to={target}", cfg, policy)
        assert (r.reason, r.status, r.attempts) == ("blocked_address", 302, 1), target
    assert server.hits["/x"] == 0


def test_per_host_and_global_limits(server, cfg):
    urls = [f"{server.base}/hold/{i}" for i in range(6)]
    server.max_in_flight = 0
    results = fetch_all(urls, replace(cfg, per_host_concurrency=2, download_concurrency=8))
    assert all(r.ok for r in results) and server.max_in_flight == 2
    urls = [f"http://{h}:{server.port}/hold/{i}" for i in range(4) for h in ("127.0.0.1", "localhost")]
    server.max_in_flight = 0
    results = fetch_all(urls, replace(cfg, per_host_concurrency=4, download_concurrency=3))
    assert all(r.ok for r in results) and server.max_in_flight == 3


def test_fetch_many_keeps_order_and_counts_reasons(server, cfg):
    urls = [f"{server.base}/img/b.png", f"{server.base}/page", "ftp://x/y", f"{server.base}/status/403"]

    async def run():  # noqa: ANN202
        async with Downloader(cfg) as d:
            return await d.fetch_many(urls), await d.fetch(urls[0])

    results, single = asyncio.run(run())
    assert [r.url for r in results] == urls
    assert [r.reason for r in results] == [None, "wrong_type", "bad_url", "http_4xx"]
    assert count_reasons(results) == Counter({"ok": 1, "wrong_type": 1, "bad_url": 1, "http_4xx": 1})
    assert single.ok and single.data == PNG


@contextlib.contextmanager
def unclosed_sessions():  # noqa: ANN201
    """Collects aiohttp's "Unclosed client session" reports for sessions garbage-collected
    inside the block (the list is filled when the block ends)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield found
        gc.collect()
    found.extend(str(w.message) for w in caught if "Unclosed client session" in str(w.message))


class LoopThread:
    """An event loop running in a background thread (as Ray Data runs async batch functions)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # reports are checked as warnings
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def test_unclosed_session_is_reported(server, cfg):
    """The check the tests below rely on: a Downloader entered and dropped is reported."""

    async def leak() -> None:
        d = await Downloader(cfg).__aenter__()
        assert (await d.fetch(f"{server.base}/img/leak.png")).ok

    with unclosed_sessions() as found:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda loop, context: None)
        loop.run_until_complete(leak())
        loop.close()
    assert found


def test_shared_downloader_reuses_one_session_and_closes_it(server, cfg):
    urls = [f"{server.base}/img/s{i}.png" for i in range(3)]

    async def run(shared: SharedDownloader) -> None:
        assert not shared.is_open
        assert (await shared.fetch(urls[0])).ok and shared.is_open
        session = shared._downloader._session
        assert all(r.ok for r in await shared.fetch_many(urls[1:]))
        assert shared._downloader._session is session  # one session for every call
        await shared.aclose()
        assert session.closed and shared.closed and not shared.is_open
        await shared.aclose()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await shared.fetch(urls[0])

    with unclosed_sessions() as found:
        asyncio.run(run(SharedDownloader(cfg)))
    assert found == []
    assert all(server.hits[f"/img/s{i}.png"] == 1 for i in range(3))


def test_shared_downloader_closes_from_another_thread_and_refuses_other_loops(server, cfg):
    shared = SharedDownloader(cfg)
    worker = LoopThread()
    try:
        with unclosed_sessions() as found:
            assert worker.run(shared.fetch(f"{server.base}/img/t.png")).ok
            with pytest.raises(RuntimeError, match="other than"):
                asyncio.run(shared.fetch(f"{server.base}/img/t.png"))
            shared.close()  # from this thread: runs on the worker's loop and waits for it
            assert shared.closed and not shared.is_open
        assert found == []
    finally:
        worker.close()
    SharedDownloader(cfg).close()  # never opened: nothing to do


def test_fetch_stage_closes_its_session_when_dropped(server, cfg):
    """Ray Data drops the stage on the actor's main thread at shutdown, while the loop the
    batches ran on is still running: the stage closes its session there."""
    from memescale.ingest.pipeline import FetchStage

    stage = FetchStage(cfg)
    worker = LoopThread()
    try:
        with unclosed_sessions() as found:
            batch = {"status": np.array(["pending", "skipped", "pending"], dtype=object),
                     "url": np.array([f"{server.base}/img/f0.png", "", f"{server.base}/page"], dtype=object)}
            out = worker.run(stage(batch))
            assert list(out["status"]) == ["fetched", "skipped", "failed"]
            assert list(out["reason"]) == ["", "", "wrong_type"]
            downloads = stage.downloads
            assert downloads.is_open
            del stage
            gc.collect()
            assert downloads.closed and not downloads.is_open
        assert found == []
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
     ("BMP", "image/bmp"), ("TIFF", "image/tiff")],
)
def test_sniff_real_images(fmt, mime):
    assert sniff_mime(_image_bytes(fmt)) == mime


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF encoder")
def test_sniff_avif():
    assert sniff_mime(_image_bytes("AVIF")) == "image/avif"


def test_sniff_heif_family_and_non_images():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + bytes(32)

    assert sniff_mime(ftyp(b"heic", b"mif1", b"heic")) == "image/heic"
    assert sniff_mime(ftyp(b"mif1", b"mif1", b"avif")) == "image/avif"
    assert sniff_mime(ftyp(b"mif1", b"mif1")) == "image/heif"
    for data in [ftyp(b"isom", b"isom", b"mp41"), HTML, b"", b"BMW is a car maker" + bytes(40), b"\xff\xd8"]:
        assert sniff_mime(data) is None, data[:12]
