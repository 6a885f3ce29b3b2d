"""SSRF guard: which URLs and which IP addresses an outbound fetch may reach.

Two checks, both needed, together covering every connection a client makes:

- `check_url` runs before each request (the first one and every redirect hop): http(s) only,
  no credentials, a host, and a literal IP host is checked here, because aiohttp connects to
  literal IPs without asking a resolver.
- `GuardedResolver` is the aiohttp resolver of the client's connector: it drops every
  resolved address the policy refuses, so the addresses a socket is opened to are exactly the
  vetted ones. DNS rebinding (a name that resolves to a public address at check time and to a
  private one at connect time) gets nowhere: there is no separate check time. The connector's
  DNS cache holds only vetted results.

Address categories (`address_category`): "global" is allowed; "metadata" (cloud instance
metadata endpoints), "unspecified", "multicast" and "reserved" are always refused;
"loopback", "private", "link_local", "shared" (100.64/10, carrier-grade NAT) and "non_global"
(documentation, benchmarking and other special ranges) are refused unless `allow_private`.
IPv6 addresses that embed an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4
2002::/16) take the embedded address's category. An explicit `allowed_networks` entry
overrides all of the above for the addresses it contains.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import DefaultResolver
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from memescale.config import IngestConfig

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})
ALWAYS_REFUSED = frozenset({"metadata", "unspecified", "multicast", "reserved"})

# Instance metadata / host services of the big clouds (AWS IMDS, ECS task metadata, AWS DNS,
# AWS IMDS over IPv6, Alibaba, Azure wireserver). Never an image host.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.169.253",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
    )
)
_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")
_NAT64_V6 = ipaddress.ip_network("64:ff9b::/96")


class BadUrlError(ValueError):
    """The URL is not fetchable: malformed, not http(s), carries credentials or has no host."""


class BlockedAddressError(Exception):
    """The URL's host is, or resolves only to, addresses the `AddressPolicy` refuses.

    Deliberately not an OSError, so aiohttp passes it through from the resolver unchanged.
    """


def parse_ip(text: str) -> IPAddress:
    """Parse an IPv4 or IPv6 address, dropping an IPv6 zone ("fe80::1%eth0"). ValueError if not one."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (well-known prefix) or 6to4 address carries."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_V6:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_category(ip: IPAddress) -> str:
    """Classify `ip` for the guard: "global" or the name of the range that makes it special.

    See the module docstring for the categories and which of them are always refused.
    """
    if ip in _METADATA:
        return "metadata"
    if ip.version == 6:
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return address_category(embedded)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.version == 4 and ip in _SHARED_V4:
        return "shared"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or (ip.version == 6 and ip.is_site_local):
        return "private"
    if not ip.is_global:
        return "non_global"
    return "global"


@dataclass(frozen=True)
class AddressPolicy:
    """Which destination addresses are allowed.

    allow_private: also allow loopback, private, link-local, shared and other non-global
        ranges (tests, the demo, a private mirror); metadata, unspecified, multicast and
        reserved addresses stay refused.
    allowed_networks: addresses inside these networks are allowed whatever their category.
    """

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, cfg: IngestConfig, allowed_networks: Iterable[str] = ()) -> AddressPolicy:
        """The policy of `cfg.allow_private`, plus `allowed_networks` given as CIDR strings."""
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        return cls(allow_private=cfg.allow_private, allowed_networks=nets)

    def refusal(self, ip: IPAddress) -> str | None:
        """None if `ip` may be connected to, else the category it is refused for."""
        if any(ip in net for net in self.allowed_networks):
            return None
        category = address_category(ip)
        if category == "global" or (self.allow_private and category not in ALWAYS_REFUSED):
            return None
        return category

    def check_ip(self, ip: IPAddress, host: str) -> None:
        """Raise BlockedAddressError if `ip` (an address of `host`) is refused."""
        category = self.refusal(ip)
        if category is not None:
            raise BlockedAddressError(f"{host}: address {ip} is {category}")


def _literal_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally, None for a hostname.

    Raises BadUrlError for legacy numeric IPv4 spellings ("127.1", "2130706433", "0x7f.0.0.1")
    that socket libraries would map onto an address.
    """
    try:
        return parse_ip(host)
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    raise BadUrlError(f"non-canonical IPv4 host {host!r}")


def check_url(url: str | URL, policy: AddressPolicy) -> URL:
    """Validate one request URL (first request or redirect target) and return it parsed.

    Raises BadUrlError (unparsable, scheme other than http/https, user or password present,
    no host, numeric host in a legacy spelling) or BlockedAddressError (literal IP host that
    `policy` refuses). Hostnames are checked at connect time by `GuardedResolver`.
    """
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        host = parsed.host
    except (ValueError, TypeError) as e:
        raise BadUrlError(f"unparsable URL {url!r}: {e}") from e
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise BadUrlError(f"scheme {parsed.scheme!r} not allowed in {url!r}")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise BadUrlError(f"credentials not allowed in {url!r}")
    if not host:
        raise BadUrlError(f"no host in {url!r}")
    ip = _literal_ip(host)
    if ip is not None:
        policy.check_ip(ip, host)
    return parsed


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that returns only the addresses `policy` allows.

    Wraps `inner` (aiohttp's default resolver when None; it must then be created inside a
    running event loop). Raises BlockedAddressError when every address of a host is refused;
    lookup failures of `inner` (socket.gaierror) pass through unchanged.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[str] = []
        for info in infos:
            category = self._policy.refusal(parse_ip(info["host"]))
            if category is None:
                kept.append(info)
            else:
                refused.append(f"{info['host']} ({category})")
        if refused:
            log.debug("resolver refused host=%s addresses=%s kept=%d", host, refused, len(kept))
        if not kept:
            raise BlockedAddressError(f"{host}: every address refused: {', '.join(refused)}")
        return kept

    async def close(self) -> None:
        await self._inner.close()
