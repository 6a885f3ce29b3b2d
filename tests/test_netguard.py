"""The SSRF guard: address categories, URL checks and the filtering resolver.

No traffic leaves the machine: URL checks never connect, the resolver tests use a scripted
inner resolver or the system's own answer for "localhost". Connections through the guard are
covered by tests/test_download.py against a loopback server.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from memescale.config import IngestConfig
from memescale.ingest.netguard import (
    AddressPolicy,
    BadUrlError,
    BlockedAddressError,
    GuardedResolver,
    address_category,
    check_url,
    parse_ip,
)

STRICT = AddressPolicy()
PERMISSIVE = AddressPolicy(allow_private=True)


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("8.8.8.8", "global"),
        ("2606:4700::1111", "global"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fec0::1", "private"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("100.64.0.1", "shared"),
        ("100.127.255.254", "shared"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::127.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:8.8.8.8", "global"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("64:ff9b::808:808", "global"),
        ("2002:7f00:1::", "loopback"),
        ("192.0.2.1", "private"),
        ("2001:db8::1", "private"),
    ],
)
def test_address_category(address, category):
    assert address_category(parse_ip(address)) == category


def test_policy_levels():
    loopback, metadata, zero = parse_ip("127.0.0.1"), parse_ip("169.254.169.254"), parse_ip("0.0.0.0")
    assert STRICT.refusal(loopback) == "loopback"
    assert PERMISSIVE.refusal(loopback) is None
    assert PERMISSIVE.refusal(metadata) == "metadata"
    assert PERMISSIVE.refusal(zero) == "unspecified"
    only_one = AddressPolicy.from_config(IngestConfig(), ["127.0.0.1"])
    assert only_one.refusal(loopback) is None
    assert only_one.refusal(parse_ip("127.0.0.2")) == "loopback"
    assert AddressPolicy.from_config(IngestConfig(allow_private=True)) == PERMISSIVE


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://127.0.0.1:8080/a.png",
        "http://10.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[::ffff:7f00:1]/a.png",
        "https://[fe80::1%25eth0]/a.png",
        "http://100.64.0.1/a.png",
        "http://0.0.0.0:8000/",
        "http://[::]/",
    ],
)
def test_literal_private_ips_blocked(url):
    with pytest.raises(BlockedAddressError):
        check_url(url, STRICT)


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://0.0.0.0/",
     "http://[::ffff:169.254.169.254]/", "http://[64:ff9b::a9fe:a9fe]/", "http://224.0.0.1/"],
)
def test_always_blocked_even_with_allow_private(url):
    with pytest.raises(BlockedAddressError):
        check_url(url, PERMISSIVE)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "//example.com/a.png",
        "http://user:pw@example.com/a.png",
        "http://user@example.com/a.png",
        "http://:@example.com/a.png",
        "http:///a.png",
        "http://example.com:99999/",
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://017700000001/",
    ],
)
def test_bad_urls(url):
    with pytest.raises(BadUrlError):
        check_url(url, PERMISSIVE)


def test_public_and_named_hosts_pass_url_check():
    assert check_url("https://i.redd.it/abc.jpg", STRICT).host == "i.redd.it"
    assert check_url("http://8.8.8.8/x.png", STRICT).port == 80
    assert check_url("HTTPS://[2606:4700::1111]:8443/x", STRICT).scheme == "https"
    # Names are vetted when they resolve, at connect time, not here.
    assert check_url("http://localhost/x", STRICT).host == "localhost"


class ScriptedResolver(AbstractResolver):
    """Answers each lookup with the next list of addresses from `answers` (a rebinding DNS)."""

    def __init__(self, *answers: list[str]) -> None:
        self._answers = list(answers)
        self.closed = False

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        addresses = self._answers.pop(0)
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                          proto=0, flags=0)
            for a in addresses
        ]

    async def close(self) -> None:
        self.closed = True


def test_resolver_keeps_only_allowed_addresses():
    inner = ScriptedResolver(["10.0.0.7", "93.184.215.14", "::ffff:127.0.0.1", "2606:4700::1111"])
    resolver = GuardedResolver(STRICT, inner)
    kept = asyncio.run(resolver.resolve("mixed.example", 80))
    assert [r["host"] for r in kept] == ["93.184.215.14", "2606:4700::1111"]
    asyncio.run(resolver.close())
    assert inner.closed


def test_resolver_refuses_rebinding_on_every_lookup():
    """Each connection resolves again through the guard: a name that turns private is refused."""
    resolver = GuardedResolver(STRICT, ScriptedResolver(["93.184.215.14"], ["127.0.0.1"], ["169.254.169.254"]))

    async def lookups():  # noqa: ANN202
        first = await resolver.resolve("rebind.example", 80)
        for _ in range(2):
            with pytest.raises(BlockedAddressError, match="rebind.example"):
                await resolver.resolve("rebind.example", 80)
        return first

    assert [r["host"] for r in asyncio.run(lookups())] == ["93.184.215.14"]


def test_resolver_with_system_dns_refuses_localhost():
    async def lookup(policy: AddressPolicy):  # noqa: ANN202
        return await GuardedResolver(policy).resolve("localhost", 80, socket.AF_UNSPEC)

    with pytest.raises(BlockedAddressError):
        asyncio.run(lookup(STRICT))
    assert {r["host"] for r in asyncio.run(lookup(PERMISSIVE))} <= {"127.0.0.1", "::1"}
