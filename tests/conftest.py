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
