"""Shared fixtures: a real broker, isolated per test run, and service factories.

Broker choice: ``LEVERET_TEST_AMQP_URL`` if set; else the local broker at
127.0.0.1:5672 if it answers; else a RabbitMQ container via testcontainers if a
Docker engine runs. Without any, broker tests are skipped on a laptop and fail
in CI (``CI`` set).

Isolation: the run gets its own vhost (created through the management API or
``rabbitmqctl``, deleted at the end) when it can; every test also gets its own
namespace, so names never collide even on a shared vhost.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import drop_namespace
from vhosts import create_vhost, delete_vhost, with_vhost

from leveret.cli.procs import Cluster

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"no RabbitMQ for the broker tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def base_amqp_url() -> Iterator[str]:
    """The URL of a running broker (its default vhost)."""
    url = os.environ.get("LEVERET_TEST_AMQP_URL")
    if url:
        if not _answers(url):
            _unavailable(f"LEVERET_TEST_AMQP_URL={url} does not answer")
        yield url
        return
    if _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if _docker_engine():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    _unavailable("no broker at 127.0.0.1:5672, no LEVERET_TEST_AMQP_URL, no Docker engine")


@pytest.fixture(scope="session")
def amqp_url(base_amqp_url: str) -> Iterator[str]:
    """A broker URL on a vhost of this test run's own, deleted at the end.

    Made through the management API, else with `rabbitmqctl` on a local broker. When
    neither can, the tests share the broker's vhost: every test still works in a
    namespace of its own, the run says so in its summary, and in CI it fails instead.
    """
    vhost = f"leveret-test-{uuid.uuid4().hex[:8]}"
    how = create_vhost(base_amqp_url, vhost)
    if how is None:
        reason = "could not create a test vhost (no management API, no local rabbitmqctl)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        ISOLATION.append(f"{reason}: tests share the broker's vhost, one namespace each")
        yield base_amqp_url
        return
    ISOLATION.append(f"test vhost {vhost} (made with {how})")
    yield with_vhost(base_amqp_url, vhost)
    delete_vhost(base_amqp_url, vhost)


#: How this run is isolated on the broker; printed in the terminal summary.
ISOLATION: list[str] = []


@pytest.fixture
def namespace() -> str:
    """A namespace of the test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cluster(
    amqp_url: str, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """A factory for real service processes; everything is stopped at teardown."""
    c = Cluster(namespace=namespace, amqp_url=amqp_url, workdir=tmp_path / "cluster")
    yield c
    c.stop_all(timeout_s=15)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for service in c.services:
            print(f"----- {service.name} log -----\n{service.log()[-4000:]}")
    drop_namespace(amqp_url, namespace)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the item so fixtures can print logs on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Print what the tests measured (reassignment times, duplicates, backoff)."""
    from helpers import FIGURES

    for line in ISOLATION:
        terminalreporter.write_line(f"leveret: {line}")
    if FIGURES:
        terminalreporter.section("leveret: measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# PostgreSQL: the stores' tests run on SQLite and on PostgreSQL. The run makes a
# database of its own on the server (`LEVERET_TEST_DATABASE_URL`, a
# postgresql+asyncpg:// URL, else the local one) and drops it at the end; every test
# starts on an empty schema. Without a server the PostgreSQL cases skip on a laptop
# and fail in CI. asyncpg runs on a thread of its own, off the tests' event loop.

LOCAL_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


def _pg_run(statements: list[str], url: str, *, database: str | None = None) -> None:
    """Run `statements` one by one on the server of `url` (its `database`, by default
    the URL's), on a thread of its own; raises what asyncpg raised."""
    import asyncio
    import concurrent.futures

    import asyncpg
    from sqlalchemy.engine import make_url

    parts = make_url(url)

    async def run() -> None:
        conn = await asyncpg.connect(
            host=parts.host or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            database=database or parts.database or "postgres",
            timeout=10,
        )
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def _terminate_others(database: str) -> str:
    return (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """A PostgreSQL server URL (postgresql+asyncpg://…) that answers."""
    url = os.environ.get("LEVERET_TEST_DATABASE_URL") or LOCAL_DATABASE_URL
    try:
        _pg_run(["SELECT 1"], url)
    except Exception as exc:  # refused, timed out, authentication: no usable server
        reason = f"no PostgreSQL at {url}: {type(exc).__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """A database of this test run's own on that server, dropped at the end."""
    from sqlalchemy.engine import make_url

    name = f"leveret_test_{uuid.uuid4().hex[:10]}"
    # A time zone other than UTC: a timestamp that only round-trips by luck shows up.
    zone = f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kathmandu'"
    _pg_run([f'CREATE DATABASE "{name}"', zone], pg_server_url)
    ISOLATION.append(f"PostgreSQL database {name}")
    yield make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    _pg_run(
        [_terminate_others(name), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'], pg_server_url
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for one test, empty: a SQLite file, then the run's PostgreSQL
    database with a fresh schema (connections a previous test left are ended first)."""
    if request.param == "sqlite":
        from leveret.settings import sqlite_url

        return sqlite_url(tmp_path / "leveret.db")
    url: str = request.getfixturevalue("pg_database_url")
    from sqlalchemy.engine import make_url

    name = make_url(url).database or ""
    reset = ["DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public"]
    _pg_run([_terminate_others(name), *reset], url)
    return url
