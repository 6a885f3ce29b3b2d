"""Download images over HTTP(S): bounded concurrency, retries, size cap, type sniffing, SSRF guard.

    async with Downloader(cfg) as d:
        result = await d.fetch(url)            # one URL -> FetchResult
        results = await d.fetch_many(urls)     # same order as urls
    results = fetch_all(urls, cfg)             # synchronous, runs its own event loop
    shared = SharedDownloader(cfg)             # for a long-lived owner: opened on first fetch
    result = await shared.fetch(url)           # from any number of calls on one event loop
    await shared.aclose()                      # or shared.close() from another thread

A per-URL failure never raises: it is a `FetchResult` with `ok=False` and a `reason`, one of
`REASONS`:

    bad_url             unparsable, not http(s), credentials in the URL, no host
    blocked_address     the host is or resolves only to addresses the SSRF policy refuses
    dns_error           the host name does not resolve
    connect_error       the connection could not be made or broke (refused, reset)
    tls_error           TLS handshake or certificate failure
    timeout             connect, read or total timeout
    protocol_error      malformed response, server hung up mid-body
    http_3xx            a redirect status without a usable Location, or 300/304
    http_429            rate limited (429 Too Many Requests), once its retries are spent
    http_4xx            any other client error status
    http_5xx            server error status, once its retries are spent
    too_many_redirects  more than `max_redirects` redirects
    redirect_loop       a redirect back to a URL already visited
    too_large           Content-Length or the streamed body exceeds `max_bytes`
    empty               a success status with an empty body
    wrong_type          the body's magic bytes are not those of a known image format
    internal_error      an unexpected exception (logged with its traceback)

Retried with exponential backoff and jitter: timeout, connect_error, protocol_error, 429 and
5xx. `TRANSIENT_REASONS` are the failures worth another try on a later run
(`ray_jobs/ingest.py --retry-failed`): the host may answer then; the others are the URL's or
the content's own and would fail the same way. Redirects are followed here, not by aiohttp, so each hop passes `netguard.check_url`, and
every connection goes through `netguard.GuardedResolver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from memescale.config import IngestConfig
from memescale.ingest.netguard import (
    AddressPolicy,
    BadUrlError,
    BlockedAddressError,
    GuardedResolver,
    check_url,
)

log = logging.getLogger(__name__)

REASONS = frozenset(
    {
        "bad_url",
        "blocked_address",
        "dns_error",
        "connect_error",
        "tls_error",
        "timeout",
        "protocol_error",
        "http_3xx",
        "http_429",
        "http_4xx",
        "http_5xx",
        "too_many_redirects",
        "redirect_loop",
        "too_large",
        "empty",
        "wrong_type",
        "internal_error",
    }
)
TRANSIENT_REASONS = frozenset({"timeout", "connect_error", "protocol_error", "dns_error", "http_429", "http_5xx"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SNIFF_BYTES = 64  # enough for every signature in `sniff_mime`, ftyp brands included

_PREFIXES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})


def _sniff_ftyp(head: bytes) -> str | None:
    """AVIF / HEIC / HEIF from an ISO-BMFF `ftyp` box (major and compatible brands)."""
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, box_end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "image/avif"
    if brands & _HEIC_BRANDS:
        return "image/heic"
    if brands & _HEIF_BRANDS:
        return "image/heif"
    return None


def sniff_mime(head: bytes) -> str | None:
    """The image MIME type that the first bytes of a file announce, or None.

    Knows JPEG, PNG, GIF, WebP, BMP, TIFF, AVIF, HEIC/HEIF. `head` should hold at least
    `SNIFF_BYTES` bytes when the file is that long. The Content-Type header plays no part.
    """
    for prefix, mime in _PREFIXES:
        if head.startswith(prefix):
            return mime
    if head[0:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[0:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "image/bmp"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(head)
    return None


@dataclass(slots=True)
class FetchResult:
    """The outcome of fetching one URL.

    url: the URL asked for. final_url: the last URL requested (after redirects).
    ok: True iff `data` holds an image body. data: the body (ok only). mime: sniffed type
    (ok only). status: the last HTTP status seen, None if no response came.
    reason: None when ok, else one of `REASONS`. attempts: HTTP requests made, redirect hops
    and retries included. elapsed_s: wall time of the whole fetch, backoff sleeps included.
    """

    url: str
    final_url: str
    ok: bool
    data: bytes | None
    mime: str | None
    status: int | None
    reason: str | None
    attempts: int
    elapsed_s: float


@dataclass(slots=True)
class _Hop:
    """What one HTTP request produced: a body, a redirect target, or a failure reason."""

    status: int | None = None
    reason: str | None = None
    retryable: bool = False
    location: str | None = None
    data: bytes | None = None
    mime: str | None = None


@dataclass(slots=True)
class _HostSlot:
    """A host's concurrency limit and how many requests are using or waiting for it."""

    semaphore: asyncio.Semaphore
    users: int = 0


def _redirect_target(base: URL, location: str) -> URL:
    """The absolute URL a Location header points to, relative to `base`. BadUrlError if unparsable."""
    try:
        return base.join(URL(location))
    except ValueError as e:
        raise BadUrlError(f"bad Location {location!r}: {e}") from e


def count_reasons(results: Iterable[FetchResult]) -> Counter[str]:
    """Counter of outcomes: "ok" for successes, the failure reason otherwise."""
    counts: Counter[str] = Counter()
    for r in results:
        if r.ok:
            counts["ok"] += 1
        else:
            assert r.reason is not None, "a failed FetchResult always has a reason"
            counts[r.reason] += 1
    return counts


class Downloader:
    """Concurrent image fetcher; use as ``async with Downloader(cfg) as d``.

    Settings from `cfg` (IngestConfig): download_concurrency (requests in flight at once),
    per_host_concurrency, connect/read/total timeouts (per request), retries, backoff_s,
    max_bytes, max_redirects, user_agent, allow_private (when `policy` is None).
    The concurrency limits are taken before a request starts, so waiting for a slot never
    counts against a request's timeouts. dns_cache_ttl_s: how long resolved (and vetted)
    addresses are reused.
    """

    def __init__(
        self,
        cfg: IngestConfig,
        policy: AddressPolicy | None = None,
        *,
        dns_cache_ttl_s: int = 300,
    ) -> None:
        self._cfg = cfg
        self._policy = policy if policy is not None else AddressPolicy.from_config(cfg)
        self._dns_cache_ttl_s = dns_cache_ttl_s
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._global_slots: asyncio.Semaphore | None = None
        self._host_slots: dict[str, _HostSlot] = {}

    async def __aenter__(self) -> Downloader:
        cfg = self._cfg
        self._resolver = GuardedResolver(self._policy)
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            limit=cfg.download_concurrency,
            limit_per_host=cfg.per_host_concurrency,
            ttl_dns_cache=self._dns_cache_ttl_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=cfg.total_timeout_s,
                sock_connect=cfg.connect_timeout_s,
                sock_read=cfg.read_timeout_s,
            ),
            headers={
                "User-Agent": cfg.user_agent,
                "Accept": "image/*,*/*;q=0.5",
                "Accept-Encoding": "identity",
            },
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._global_slots = asyncio.Semaphore(cfg.download_concurrency)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def fetch_many(self, urls: Iterable[str]) -> list[FetchResult]:
        """Fetch all `urls` concurrently; results in the same order. Never raises per URL."""
        return list(await asyncio.gather(*(self.fetch(u) for u in urls)))

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL, following up to `max_redirects` redirects. Never raises per URL."""
        start = time.monotonic()
        attempts = 0
        final_url = url
        hop = _Hop()
        try:
            target = check_url(url, self._policy)
            seen = {str(target)}
            for _ in range(self._cfg.max_redirects + 1):
                final_url = str(target)
                hop, n = await self._request_with_retries(target)
                attempts += n
                if hop.location is None:
                    break
                target = check_url(_redirect_target(target, hop.location), self._policy)
                if str(target) in seen:
                    hop = _Hop(status=hop.status, reason="redirect_loop")
                    break
                seen.add(str(target))
            else:
                hop = _Hop(status=hop.status, reason="too_many_redirects")
        except BadUrlError as e:
            hop = _Hop(status=hop.status, reason="bad_url")
            log.debug("bad url=%s error=%s", url, e)
        except BlockedAddressError as e:
            hop = _Hop(status=hop.status, reason="blocked_address")
            log.info("blocked url=%s error=%s", url, e)
        except Exception:
            hop = _Hop(status=hop.status, reason="internal_error")
            log.exception("unexpected error fetching url=%s", url)
        return self._result(url, final_url, hop, attempts, start)

    def _result(self, url: str, final_url: str, hop: _Hop, attempts: int, start: float) -> FetchResult:
        elapsed = time.monotonic() - start
        if hop.reason is not None:
            log.debug(
                "fetch failed url=%s final_url=%s reason=%s status=%s attempts=%d elapsed_s=%.3f",
                url, final_url, hop.reason, hop.status, attempts, elapsed,
            )
        ok = hop.reason is None
        return FetchResult(
            url=url,
            final_url=final_url,
            ok=ok,
            data=hop.data if ok else None,
            mime=hop.mime if ok else None,
            status=hop.status,
            reason=hop.reason,
            attempts=attempts,
            elapsed_s=elapsed,
        )

    async def _request_with_retries(self, target: URL) -> tuple[_Hop, int]:
        """One hop, retried while retryable and retries remain; returns (hop, requests made)."""
        attempt = 1
        hop = await self._request(target)
        while hop.retryable and attempt <= self._cfg.retries:
            await asyncio.sleep(self._backoff_s(attempt))
            attempt += 1
            hop = await self._request(target)
        return hop, attempt

    def _backoff_s(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): base * 2^(attempt-1), jittered 50-100%."""
        return self._cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)

    @contextlib.asynccontextmanager
    async def _slot(self, host: str) -> AsyncIterator[None]:
        """Hold a per-host slot, then a global one (in that order, so that requests queued
        behind a busy host do not hold global slots). Host entries vanish when unused."""
        global_slots = self._global_slots
        assert global_slots is not None, "use Downloader inside `async with`"
        slot = self._host_slots.get(host)
        if slot is None:
            slot = self._host_slots[host] = _HostSlot(asyncio.Semaphore(self._cfg.per_host_concurrency))
        slot.users += 1
        try:
            async with slot.semaphore, global_slots:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._host_slots[host]

    async def _request(self, target: URL) -> _Hop:
        """One GET without following redirects, transport errors mapped to reasons."""
        session = self._session
        assert session is not None, "use Downloader inside `async with`"
        try:
            async with self._slot(target.host or ""):
                async with session.get(target, allow_redirects=False) as resp:
                    return await self._read_response(resp)
        except BlockedAddressError as e:
            log.info("blocked at connect url=%s error=%s", target, e)
            return _Hop(reason="blocked_address")
        except TimeoutError:
            return _Hop(reason="timeout", retryable=True)
        except aiohttp.ClientConnectorDNSError:
            return _Hop(reason="dns_error")
        except aiohttp.ClientSSLError:
            return _Hop(reason="tls_error")
        except aiohttp.ClientOSError:
            return _Hop(reason="connect_error", retryable=True)
        except aiohttp.InvalidURL:
            return _Hop(reason="bad_url")
        except aiohttp.ClientError:
            return _Hop(reason="protocol_error", retryable=True)

    async def _read_response(self, resp: aiohttp.ClientResponse) -> _Hop:
        """Turn a response into a hop: redirect target, failure by status, or the body."""
        status = resp.status
        if status in REDIRECT_STATUSES and resp.headers.get("Location"):
            return _Hop(status=status, location=resp.headers["Location"])
        if status == 429:
            return _Hop(status=status, reason="http_429", retryable=True)
        if status >= 500:
            return _Hop(status=status, reason="http_5xx", retryable=True)
        if status >= 400:
            return _Hop(status=status, reason="http_4xx")
        if status >= 300:
            return _Hop(status=status, reason="http_3xx")
        return await self._read_body(resp)

    async def _read_body(self, resp: aiohttp.ClientResponse) -> _Hop:
        """Stream the body under the `max_bytes` cap, rejecting non-images after SNIFF_BYTES."""
        status, max_bytes = resp.status, self._cfg.max_bytes
        if resp.content_length is not None and resp.content_length > max_bytes:
            return _Hop(status=status, reason="too_large")
        chunks: list[bytes] = []
        size = 0
        mime = None
        async for chunk in resp.content.iter_any():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                return _Hop(status=status, reason="too_large")
            if mime is None and size >= SNIFF_BYTES:
                mime = sniff_mime(b"".join(chunks))
                if mime is None:
                    return _Hop(status=status, reason="wrong_type")
        if size == 0:
            return _Hop(status=status, reason="empty")
        data = b"".join(chunks)
        mime = mime or sniff_mime(data)
        if mime is None:
            return _Hop(status=status, reason="wrong_type")
        return _Hop(status=status, data=data, mime=mime)


class SharedDownloader:
    """One `Downloader` for a long-lived owner whose fetches arrive call by call (a Serve
    replica, a Ray Data actor), where no single ``async with`` spans its life.

    The first fetch opens it on the calling event loop, inside an `AsyncExitStack`; every
    later fetch must come from that loop. `await aclose()` on that loop, or `close()` from
    any thread (the owner's shutdown hook or `__del__`), closes its HTTP session; a fetch
    after that raises RuntimeError. Same settings and failure contract as `Downloader`.
    """

    def __init__(self, cfg: IngestConfig, policy: AddressPolicy | None = None, **options: Any) -> None:
        """`cfg`, `policy` and keyword `options` (dns_cache_ttl_s) as `Downloader` takes them."""
        self._make = functools.partial(Downloader, cfg, policy, **options)
        self._stack: contextlib.AsyncExitStack | None = None
        self._downloader: Downloader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    @property
    def is_open(self) -> bool:
        """A session is open (a fetch has run and no close has)."""
        return self._downloader is not None

    @property
    def closed(self) -> bool:
        return self._closed

    async def fetch(self, url: str) -> FetchResult:
        """`Downloader.fetch` on the shared session (opened on first use)."""
        return await (await self._open()).fetch(url)

    async def fetch_many(self, urls: Iterable[str]) -> list[FetchResult]:
        """`Downloader.fetch_many` on the shared session (opened on first use)."""
        return await (await self._open()).fetch_many(urls)

    async def _open(self) -> Downloader:
        if self._downloader is None:
            async with self._opening:
                if self._closed:
                    raise RuntimeError("SharedDownloader is closed")
                if self._downloader is None:
                    stack = contextlib.AsyncExitStack()
                    d = await stack.enter_async_context(
                        self._make())
                    self._stack, self._downloader = stack, d
                    self._loop = asyncio.get_running_loop()
        elif asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("SharedDownloader used from an event loop other than the one that opened it")
        return self._downloader

    async def aclose(self) -> None:
        """Close the session (if one was opened); on the loop that opened it. Idempotent."""
        self._closed = True
        stack, self._stack, self._downloader = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def close(self, timeout_s: float = 10.0) -> None:
        """`aclose()` from synchronous code. From another thread than the opening loop's, it
        runs on that loop and waits up to `timeout_s` (TimeoutError after); on the loop's own
        thread, where nothing may block, it is scheduled as a task on it."""
        loop = self._loop
        if self._stack is None or loop is None or loop.is_closed():
            self._closed = True
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(self.aclose())
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout_s)
        else:
            loop.run_until_complete(self.aclose())


async def _fetch_all(urls: list[str], cfg: IngestConfig, policy: AddressPolicy | None) -> list[FetchResult]:
    async with Downloader(cfg, policy) as d:
        return await d.fetch_many(urls)


def fetch_all(
    urls: Iterable[str], cfg: IngestConfig, policy: AddressPolicy | None = None
) -> list[FetchResult]:
    """Synchronous `Downloader.fetch_many` in a fresh event loop (e.g. in a Ray Data batch UDF).

    Must not be called from a thread that is running an event loop.
    """
    return asyncio.run(_fetch_all(list(urls), cfg, policy))
