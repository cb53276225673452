"""A small client of the RabbitMQ management HTTP API: what the tracker needs to fence a
hung worker, i.e. find its AMQP connections by `connection_name` and close them.

Needs the ``rabbitmq_management`` plugin (``rabbitmq-plugins enable
rabbitmq_management``) and a user that may see and close other users'
connections (tag ``administrator``; ``monitoring`` may see them all but only
close its own). httpx errors and refusals are translated into
:class:`leveret.errors.BrokerError` here, at one boundary.

Closing a connection makes the broker requeue every unacked delivery of its
channels at once, instead of after ``consumer_timeout`` (30 min by default).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from leveret.errors import BrokerError

#: The management listener's default ports (plain HTTP for amqp://, TLS for amqps://).
HTTP_PORT = 15672
HTTPS_PORT = 15671
#: Tags whose users see every connection on the node.
_SEE_ALL_TAGS = frozenset({"administrator", "monitoring"})
#: The tag whose users may close every connection on the node.
_CLOSE_ALL_TAG = "administrator"


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class ManagementApi:
    """The management HTTP API of one broker, over an :class:`httpx.AsyncClient`."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`url` is the API's base, e.g. ``http://user:pass@host:15672`` (credentials in the
        URL are sent as basic auth; guest/guest when it has none)."""
        parts = urlsplit(url)
        user = unquote(parts.username) if parts.username is not None else "guest"
        password = unquote(parts.password) if parts.password is not None else "guest"
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.url = parts._replace(netloc=netloc, path=parts.path.rstrip("/")).geturl()
        self.user = user
        self._http = httpx.AsyncClient(
            base_url=self.url, auth=(user, password), timeout=timeout_s, transport=transport
        )

    @classmethod
    def from_settings(cls, url: str | None, amqp_url: str) -> ManagementApi:
        """The API at `url`, or (None) at the AMQP URL's host on the default port with the
        AMQP URL's credentials: ``http://<user>:<pass>@<amqp host>:15672``."""
        if url is None:
            amqp = urlsplit(amqp_url)
            secure = amqp.scheme == "amqps"
            user = amqp.username if amqp.username is not None else "guest"
            password = amqp.password if amqp.password is not None else "guest"
            host = amqp.hostname or "localhost"
            if ":" in host:
                host = f"[{host}]"  # IPv6 literal
            scheme, port = ("https", HTTPS_PORT) if secure else ("http", HTTP_PORT)
            url = f"{scheme}://{user}:{password}@{host}:{port}"
        return cls(url)

    async def close(self) -> None:
        """Release the HTTP connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> ManagementApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def available(self) -> bool:
        """True when the API answers ``GET /api/overview`` with these credentials."""
        try:
            await self._request("GET", "/api/overview")
        except BrokerError:
            return False
        return True

    async def tags(self) -> frozenset[str]:
        """This user's tags (``GET /api/whoami``). Raises :class:`BrokerError`."""
        me = await self._request("GET", "/api/whoami")
        tags = me.get("tags", []) if isinstance(me, dict) else []
        if isinstance(tags, str):  # older brokers send "a,b"
            tags = tags.split(",")
        return frozenset(str(t).strip() for t in tags) - {""}

    async def sees_all_connections(self) -> bool:
        """True when this user sees every user's connections (``GET /api/whoami`` tags);
        otherwise a connection missing from a listing may merely be invisible."""
        return bool(_SEE_ALL_TAGS & await self.tags())

    async def closes_all_connections(self) -> bool:
        """True when this user may close every user's connections (tag ``administrator``);
        a ``monitoring`` user sees them all but may close only its own."""
        return _CLOSE_ALL_TAG in await self.tags()

    async def close_connections(
        self,
        connection_name: str,
        vhost: str | None,
        reason: str,
        users: frozenset[str] | None = None,
    ) -> int:
        """Close every connection whose client-provided `connection_name` matches (in
        `vhost`, if given; owned by one of `users`, if given); return how many were
        closed. The client sees `reason` in its ``connection.close``
        (``CONNECTION_FORCED - <reason>``). One that vanished in the meantime is not
        counted. Raises :class:`BrokerError`."""
        listed = await self._request(
            "GET", "/api/connections", params={"columns": "name,vhost,user,client_properties"}
        )
        if not isinstance(listed, list):
            raise BrokerError(
                f"management API at {self.url} listed no connections: {listed!r:.200}"
            )
        closed = 0
        for conn in listed:
            if not isinstance(conn, dict) or _connection_name(conn) != connection_name:
                continue
            if vhost is not None and conn.get("vhost") != vhost:
                continue
            if users is not None and conn.get("user") not in users:
                continue
            name = str(conn.get("name", ""))
            path = f"/api/connections/{quote(name, safe='')}"
            if await self._request("DELETE", path, headers={"X-Reason": reason}, missing_ok=True):
                closed += 1
        return closed

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """The decoded JSON answer (True for an empty 2xx, False for a tolerated 404)."""
        try:
            response = await self._http.request(method, path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise BrokerError(
                f"management API {method} {path} at {self.url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code == 404 and missing_ok:
            return False
        if response.is_error:
            raise BrokerError(
                f"management API {method} {path} at {self.url} refused as {self.user!r}: "
                f"{response.status_code} {response.text[:200]}"
            )
        if not response.content:
            return True
        try:
            return response.json()
        except ValueError as exc:
            raise BrokerError(
                f"management API {method} {path} at {self.url} answered non-JSON"
            ) from exc


def _connection_name(conn: dict[str, Any]) -> str | None:
    props = conn.get("client_properties")
    if not isinstance(props, dict):
        return None
    name = props.get("connection_name")
    return name if isinstance(name, str) else None


__all__ = ["ManagementApi", "vhost_of"]
