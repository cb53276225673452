"""The management API client against a fake HTTP transport: requests, filtering, and
every lower-layer failure mapped to BrokerError."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from leveret.errors import BrokerError
from leveret.management import ManagementApi, vhost_of

Handler = Callable[[httpx.Request], httpx.Response]


def _conn(port: int, vhost: str, name: str | None) -> dict[str, object]:
    props = {"connection_name": name} if name is not None else {}
    return {"name": f"10.0.0.5:{port} -> 10.0.0.1:5672", "vhost": vhost, "client_properties": props}


CONNECTIONS = [
    _conn(4001, "prod", "w1"),
    _conn(4002, "test", "w1"),
    _conn(4003, "prod", "w2"),
    _conn(4004, "prod", None),
    {"name": "direct", "vhost": "prod"},
]


def api(handler: Handler, url: str = "http://admin:s%40cret@mq:15672") -> ManagementApi:
    return ManagementApi(url, transport=httpx.MockTransport(handler))


def broker(deleted: list[httpx.Request], listing: object = CONNECTIONS) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/api/connections":
            return httpx.Response(200, json=listing)
        if request.method == "DELETE":
            deleted.append(request)
            return httpx.Response(204)
        return httpx.Response(404)

    return handle


async def test_close_connections_filters_by_name_and_vhost_and_encodes_the_name() -> None:
    deleted: list[httpx.Request] = []
    async with api(broker(deleted)) as client:
        closed = await client.close_connections("w1", "prod", "leveret-fenced: no heartbeat")
    assert closed == 1
    [request] = deleted
    assert request.url.raw_path == b"/api/connections/10.0.0.5%3A4001%20-%3E%2010.0.0.1%3A5672"
    assert request.headers["X-Reason"] == "leveret-fenced: no heartbeat"
    assert request.headers["Authorization"] == httpx.BasicAuth("admin", "s@cret")._auth_header


async def test_close_connections_without_vhost_closes_every_match() -> None:
    deleted: list[httpx.Request] = []
    async with api(broker(deleted)) as client:
        assert await client.close_connections("w1", None, "r") == 2
        assert await client.close_connections("nobody", None, "r") == 0
    assert len(deleted) == 2


async def test_listing_asks_only_for_the_columns_it_needs() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    async with api(handle) as client:
        assert await client.close_connections("w1", "/", "r") == 0
    assert seen[0].url.params["columns"] == "name,vhost,user,client_properties"


async def test_a_connection_gone_between_listing_and_closing_is_not_counted() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=CONNECTIONS)
        return httpx.Response(404, json={"error": "Object Not Found"})

    async with api(handle) as client:
        assert await client.close_connections("w1", "prod", "r") == 0


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("garbage"),
        httpx.Response(401, json={"error": "not_authorised"}),
        httpx.Response(403, text="forbidden"),
        httpx.Response(500, text="boom"),
        httpx.Response(200, text="<html>not json</html>"),
        httpx.Response(200, json={"not": "a list"}),
    ],
    ids=lambda f: type(f).__name__ if isinstance(f, Exception) else f"http-{f.status_code}",
)
async def test_every_failure_is_a_broker_error(failure: Exception | httpx.Response) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(failure, Exception):
            raise failure
        return failure

    async with api(handle) as client:
        with pytest.raises(BrokerError, match="management API"):
            await client.close_connections("w1", None, "r")


@pytest.mark.parametrize(
    ("answer", "available"),
    [(httpx.Response(200, json={"management_version": "3.10.8"}), True),
     (httpx.Response(401, json={"error": "not_authorised"}), False),
     (httpx.Response(200, text="<html>a proxy page</html>"), False),
     (httpx.ConnectError("connection refused"), False)],
)  # fmt: skip
async def test_available(answer: Exception | httpx.Response, available: bool) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/overview"
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with api(handle) as client:
        assert await client.available() is available


async def test_a_refused_delete_is_a_broker_error_naming_the_user() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=CONNECTIONS)
        return httpx.Response(403, text="Not administrator")

    async with api(handle) as client:
        with pytest.raises(BrokerError, match="refused as 'admin': 403"):
            await client.close_connections("w1", "prod", "r")


@pytest.mark.parametrize(
    ("tags", "sees_all"),
    [(["administrator"], True), (["monitoring"], True), (["management"], False), ("", False),
     ("policymaker,monitoring", True)],
)  # fmt: skip
async def test_sees_all_connections_by_tags(tags: object, sees_all: bool) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/whoami"
        return httpx.Response(200, content=json.dumps({"name": "admin", "tags": tags}))

    async with api(handle) as client:
        assert await client.sees_all_connections() is sees_all


@pytest.mark.parametrize(
    ("tags", "closes_all"),
    [(["administrator"], True), (["monitoring"], False), (["management"], False),
     ("policymaker,administrator", True), ("", False)],
)  # fmt: skip
async def test_closes_all_connections_only_as_administrator(tags: object, closes_all: bool) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/whoami"
        return httpx.Response(200, content=json.dumps({"name": "ops", "tags": tags}))

    async with api(handle) as client:
        assert await client.closes_all_connections() is closes_all


def test_from_settings_derives_the_url_from_the_amqp_url() -> None:
    derived = ManagementApi.from_settings(None, "amqp://bob:p%40ss@rabbit.local:5673/prod")
    assert (derived.url, derived.user) == ("http://rabbit.local:15672", "bob")
    tls = ManagementApi.from_settings(None, "amqps://rabbit.local/")
    assert (tls.url, tls.user) == ("https://rabbit.local:15671", "guest")
    given = ManagementApi.from_settings("http://ops:x@mgmt:8080/", "amqp://bob:p@rabbit/")
    assert (given.url, given.user) == ("http://mgmt:8080", "ops")


def test_vhost_of() -> None:
    assert vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert vhost_of("amqp://127.0.0.1") == "/"
    assert vhost_of("amqp://127.0.0.1/%2F") == "/"
    assert vhost_of("amqp://127.0.0.1/leveret-test-1") == "leveret-test-1"
    assert vhost_of("amqp://127.0.0.1/a%2Fb") == "a/b"
