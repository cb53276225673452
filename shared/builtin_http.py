"""The built-in `http` kind: one GET that cannot reach too far.

Every connection goes through :class:`GuardedBackend`, which resolves the host
itself, refuses it if any of its addresses is loopback, private, link-local (cloud
metadata), shared (CGNAT), multicast, unspecified or reserved (IPv4-mapped and
NAT64 forms included), or if its name is a local one such as ``localhost``, and then
connects to an address it checked: a DNS answer that changes between the check and
the connect (rebinding) cannot slip through. TLS still sends SNI for, and verifies
the certificate of, the URL's host. ``LEVERET_HTTP_ALLOW`` (host names and CIDRs)
lifts the refusal for what it names.

Redirects are followed by hand (at most :data:`MAX_REDIRECTS`), each hop checked
the same way; the body is streamed and counted against a byte cap; one deadline
covers the whole fetch, redirects included. Failures (:class:`TaskFailed` types):
``bad_payload``, ``http_forbidden_address``, ``http_forbidden_scheme``,
``http_too_many_redirects``, ``http_too_large``, ``http_timeout``, ``http_error``.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import httpcore
import httpx
from pydantic import JsonValue

from leveret.errors import TaskFailed

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
#: Resolves ``(host, port)`` to every address it has.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

#: Default cap on a response body, bytes (``LEVERET_HTTP_MAX_BYTES``).
DEFAULT_MAX_BYTES = 1024 * 1024
#: Redirects followed at most, each hop checked like the first.
MAX_REDIRECTS = 5
#: The whole fetch's deadline when neither the task nor the payload sets one.
DEFAULT_TIMEOUT_S = 30.0
#: The longest ``timeout_s`` a payload may ask for.
MAX_TIMEOUT_S = 24 * 3600.0
#: The fetch ends this much before the attempt's own timeout (at most a tenth of it),
#: so that it fails as ``http_timeout`` rather than the worker's plain ``timeout``.
TIMEOUT_MARGIN_S = 0.25

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

_PRIVATE = tuple(
    ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)
_SHARED = ip_network("100.64.0.0/10")
_NAT64 = ip_network("64:ff9b::/96")
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


def embedded_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64, 6to4), if any."""
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def refusal(address: IPAddress) -> str | None:
    """Why `address` is refused by default (``"loopback"``, ``"private"``, …), or None."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return refusal(inner)
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _SHARED:
        return "shared (CGNAT)"
    if any(address in net for net in _PRIVATE):
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def is_local_name(host: str) -> bool:
    """Whether `host` names this machine (``localhost``, ``*.localhost``, …)."""
    name = host.lower().rstrip(".")
    return name in LOCAL_NAMES or name.endswith(".localhost")


@dataclass(frozen=True)
class Allow:
    """What ``LEVERET_HTTP_ALLOW`` lets the `http` kind reach despite the refusals."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def host(self, host: str) -> bool:
        """Whether `host` is allowed by name (its addresses are then not checked)."""
        return host.lower().rstrip(".") in self.hosts

    def address(self, address: IPAddress) -> bool:
        """Whether `address` (or the IPv4 address it stands for) is in an allowed network."""
        inner = embedded_ipv4(address)
        return any(a in net for net in self.networks for a in (address, inner) if a is not None)


def parse_allow(entries: Iterable[str]) -> Allow:
    """``LEVERET_HTTP_ALLOW`` entries (CIDRs such as ``127.0.0.1/32`` or host names) as an
    :class:`Allow`; raises ValueError naming an entry that is neither."""
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower()
        try:
            networks.append(ip_network(entry.strip("[]")))
            continue
        except ValueError as exc:
            if "/" in entry or entry.replace(".", "").isdigit():
                raise ValueError(f"{raw!r} is not a valid CIDR: {exc}") from exc
        name = entry.rstrip(".")
        if not _HOST_NAME.match(name):
            raise ValueError(f"{raw!r} is neither a host name nor a CIDR")
        hosts.add(name)
    return Allow(frozenset(hosts), tuple(networks))


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, without duplicates."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
    found: dict[IPAddress, None] = {}
    for *_, sockaddr in infos:
        found[ip_address(str(sockaddr[0]).split("%")[0])] = None
    return list(found)


def forbidden(host: str, why: str) -> TaskFailed:
    """The failure for a refused host."""
    return TaskFailed(
        f"{host} is {why}; the http kind does not fetch from it unless LEVERET_HTTP_ALLOW "
        "on the worker names it",
        "http_forbidden_address",
    )


async def checked_addresses(
    host: str, port: int, allow: Allow, resolver: Resolver
) -> list[IPAddress]:
    """The addresses of `host`, every one of them checked; raises ``http_forbidden_address``
    if the name is local or any address is refused and not allowed."""
    if is_local_name(host):
        raise forbidden(host, "a local host name")
    addresses = await resolver(host, port)
    if not addresses:
        raise httpcore.ConnectError(f"{host!r} resolves to no address")
    for address in addresses:
        why = refusal(address)
        if why is not None and not allow.address(address):
            shown = host if _is_literal(host, address) else f"{host} (resolves to {address})"
            raise forbidden(shown, f"a {why} address")
    return addresses


def _is_literal(host: str, address: IPAddress) -> bool:
    try:
        return ip_address(host) == address
    except ValueError:
        return False


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to checked addresses (see the module docstring)."""

    def __init__(
        self,
        allow: Allow,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow = allow
        self.resolver = resolver
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, *args: Any, **options: Any
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first checked address of `host` that answers."""
        if self.allow.host(host):
            return await self.inner.connect_tcp(host, port, *args, **options)
        addresses = await checked_addresses(host, port, self.allow, self.resolver)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(str(address), port, *args, **options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, *args: Any, **options: Any
    ) -> httpcore.AsyncNetworkStream:
        """Never: a Unix socket is local by definition."""
        raise forbidden(path, "a Unix socket")

    async def sleep(self, seconds: float) -> None:
        """As the inner backend sleeps."""
        await self.inner.sleep(seconds)


@dataclass(frozen=True)
class HttpPolicy:
    """How far the `http` kind may reach, from the worker's settings."""

    allow: Allow = field(default_factory=Allow)
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = MAX_REDIRECTS


def parse_payload(payload: JsonValue) -> tuple[str, float | None]:
    """The URL and the asked ``timeout_s`` of a payload (a URL string, or
    ``{"url": ..., "timeout_s": ...}``); raises ``bad_payload``."""
    url = payload.get("url") if isinstance(payload, dict) else payload
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise TaskFailed(f"http wants an http(s) URL, got {url!r}", "bad_payload")
    asked = payload.get("timeout_s") if isinstance(payload, dict) else None
    if asked is None:
        return url, None
    if (
        isinstance(asked, bool)
        or not isinstance(asked, int | float)
        or not 0 < asked <= MAX_TIMEOUT_S
    ):
        raise TaskFailed(
            f"http timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {asked!r}",
            "bad_payload",
        )
    return url, float(asked)


def deadline_s(asked: float | None, task_timeout_s: float | None) -> float:
    """The whole fetch's deadline: the task's timeout (less a margin) or 30 s, lowered to
    the payload's `timeout_s` if it asks for less."""
    if task_timeout_s is None:
        return asked if asked is not None else DEFAULT_TIMEOUT_S
    room = task_timeout_s - min(TIMEOUT_MARGIN_S, task_timeout_s / 10)
    return room if asked is None else min(asked, room)


_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    ssl.SSLError,
    OSError,
)


async def fetch(
    url: str, policy: HttpPolicy, timeout_s: float, *, resolver: Resolver = resolve
) -> dict[str, JsonValue]:
    """GET `url` under `policy` within `timeout_s`: its final status, body size and URL."""
    try:
        start_url = httpx.URL(url)
    except httpx.InvalidURL as exc:  # the same URL would fail every attempt
        raise TaskFailed(f"not a valid URL: {url!r}: {exc}", "bad_payload") from exc
    started = time.perf_counter()
    backend = GuardedBackend(policy.allow, resolver)
    scope = asyncio.timeout(timeout_s)
    try:
        async with (
            scope,
            httpcore.AsyncConnectionPool(
                ssl_context=_ssl_context(), network_backend=backend
            ) as pool,
        ):
            status, size, final = await _follow(pool, start_url, policy)
    except TimeoutError as exc:
        if not scope.expired():
            raise TaskFailed(
                f"GET {url} failed: {type(exc).__name__}: {exc}", "http_error"
            ) from exc
        raise TaskFailed(
            f"GET {url} did not finish within {timeout_s:g} s (the whole fetch, redirects "
            "included)",
            "http_timeout",
        ) from exc
    except _TRANSPORT_ERRORS as exc:
        raise TaskFailed(f"GET {url} failed: {type(exc).__name__}: {exc}", "http_error") from exc
    return {
        "status": status,
        "bytes": size,
        "url": str(final),
        "elapsed_s": round(time.perf_counter() - started, 6),
    }


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One context for every fetch: loading the CA bundle takes tens of milliseconds."""
    return httpcore.default_ssl_context()


async def _follow(
    pool: httpcore.AsyncConnectionPool, url: httpx.URL, policy: HttpPolicy
) -> tuple[int, int, httpx.URL]:
    """GET `url`, following redirects by hand: ``(status, bytes, final URL)``."""
    for _ in range(policy.max_redirects + 1):
        status, location, size = await _get(pool, url, policy.max_bytes)
        if location is None:
            return status, size, url
        url = _redirect_target(url, location)
    raise TaskFailed(
        f"more than {policy.max_redirects} redirects (the last to {url})", "http_too_many_redirects"
    )


def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise TaskFailed(f"{url} redirects to an invalid URL {location!r}", "http_error") from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise TaskFailed(
            f"{url} redirects to {location!r}: only http(s) URLs are followed",
            "http_forbidden_scheme",
        )
    return target


async def _get(
    pool: httpcore.AsyncConnectionPool, url: httpx.URL, max_bytes: int
) -> tuple[int, str | None, int]:
    """One GET: ``(status, redirect location or None, body bytes)``. The body is read
    in chunks and the request fails ``http_too_large`` once it passes `max_bytes`."""
    target = httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )
    headers = [
        (b"Host", url.netloc),
        (b"User-Agent", b"leveret-http"),
        (b"Accept-Encoding", b"identity"),
    ]
    async with pool.stream("GET", target, headers=headers) as response:
        location = _header(response.headers, b"location")
        if response.status in REDIRECT_STATUSES and location:
            return response.status, location, 0
        declared = _header(response.headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(url, f"declares {declared} bytes", max_bytes)
        size = 0
        async for chunk in response.aiter_stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(url, f"sent more than {max_bytes} bytes", max_bytes)
        return response.status, None, size


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _too_large(url: httpx.URL, what: str, max_bytes: int) -> TaskFailed:
    return TaskFailed(
        f"the body of {url} {what}, over the limit of {max_bytes} bytes "
        "(LEVERET_HTTP_MAX_BYTES); the fetch stopped there",
        "http_too_large",
    )
