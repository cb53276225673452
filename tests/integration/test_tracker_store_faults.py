"""Database failures on a real broker: the tracker acks nothing it has not committed, and
both HTTP APIs answer 503 + ``Retry-After`` while their store or broker is unavailable.

The failures are real: another SQLite connection holding ``BEGIN EXCLUSIVE`` on the
tracker's file, a PostgreSQL database that stops accepting connections (its sessions
terminated), a broker connection cut by a TCP proxy. A tracker is SIGKILLed while it
holds deliveries it could not commit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from helpers import TrackerApi, drop_namespace, eventually, report
from loguru import logger
from tcp_proxy import TcpProxy
from test_tracker_service import free_port, publish_result, running, task_result

from leveret.amqp import open_channel
from leveret.cli.procs import Cluster
from leveret.management import ManagementApi, vhost_of
from leveret.settings import TrackerSettings
from leveret.topology import Band, Topology

pytestmark = pytest.mark.broker

PG_SERVER = os.environ.get("LEVERET_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
#: Deliveries the tracker may hold unacked (its prefetch window), and messages published.
PREFETCH = 8
N = 40
#: The management API refreshes queue figures every 5 s (collect_statistics_interval).
STATS_WITHIN_S = 20.0
WORKER = "w-faults"


# a PostgreSQL database of the test's own, which can be made to refuse connections


class PgDatabase:
    """A database on the local server: `url` for SQLAlchemy, `refuse()` and `accept()`."""

    def __init__(self, admin: asyncpg.Connection, name: str) -> None:
        self.admin = admin
        self.name = name
        parts = urlsplit(PG_SERVER)
        self.url = f"postgresql+asyncpg://{parts.netloc}/{name}"

    async def refuse(self) -> int:
        """No new sessions, and every open one terminated; returns how many were."""
        await self.admin.execute(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false')
        rows = await self.admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            self.name,
        )
        return len(rows)

    async def accept(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true')


@pytest.fixture
async def pg() -> AsyncIterator[PgDatabase]:
    try:
        admin = await asyncpg.connect(PG_SERVER, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no PostgreSQL at {PG_SERVER}: {exc}")
        pytest.skip(f"no PostgreSQL at {PG_SERVER}: {exc}")
    name = f"leveret_faults_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PgDatabase(admin, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# the broker's view of a queue


class Queues:
    """Counts of a queue: from a passive declare (exact and at once, but on a quorum queue
    it leaves out messages returned by a consumer), and from the management API (ready
    and unacknowledged, sampled every 5 s)."""

    def __init__(self, amqp_url: str, channel: AbstractChannel) -> None:
        self.channel = channel
        self.vhost = vhost_of(amqp_url)
        self.api = ManagementApi.from_settings(None, amqp_url)

    async def declared(self, name: str) -> int:
        queue = await self.channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count

    async def figures(self, name: str) -> dict[str, Any]:
        """``messages_ready`` and ``messages_unacknowledged`` as the API last sampled them."""
        response = await self.api._http.get(f"/api/queues/{quote(self.vhost, safe='')}/{name}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def wait_figures(self, name: str, ready: int, unacked: int, what: str) -> None:
        async def check() -> bool:
            f = await self.figures(name)
            return (f.get("messages_ready"), f.get("messages_unacknowledged")) == (ready, unacked)

        await eventually(check, STATS_WITHIN_S, what)


@pytest.fixture
async def channel(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[AbstractChannel]:
    name = f"test-{request.node.name}"[:120]
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}
    )
    yield await open_channel(connection)
    await connection.close()


@pytest.fixture
async def queues(amqp_url: str, channel: AbstractChannel) -> AsyncIterator[Queues]:
    q = Queues(amqp_url, channel)
    yield q
    await q.api.close()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


async def publish_results(channel: AbstractChannel, topology: Topology, ids: list[str]) -> None:
    """One result message per id, from `WORKER`, each confirmed by the broker."""
    for task_id in ids:
        await publish_result(channel, topology, task_result(task_id, worker=WORKER))


async def recorded_exactly_once(api: TrackerApi, ids: list[str], total: int) -> None:
    """Every id completed with one attempt, and the counts add up to each result once."""

    async def all_completed() -> bool:
        tasks = await api.tasks_in_full(ids)
        return all(t.get("status") == "completed" for t in tasks)

    await eventually(all_completed, 60, f"all {len(ids)} tasks completed")
    for task in await api.tasks_in_full(ids):
        attempts = [(a["attempt"], a["worker"], a["outcome"]) for a in task["attempts"]]
        assert attempts == [(1, WORKER, "completed")], task["id"]
    stats = await api.stats()
    assert stats["counts"]["completed"] == total and stats["total"] == total
    # The per-worker counters are added to on each application: a result applied twice
    # would count twice.
    counters = {w["id"]: w["completed"] for w in stats["workers"]}
    assert counters[WORKER] == total  # every result published came from WORKER


async def test_nothing_is_acked_while_sqlite_is_locked_and_a_killed_tracker_loses_nothing(
    cluster: Cluster, channel: AbstractChannel, queues: Queues
) -> None:
    cluster.extra_env.update({"LEVERET_PREFETCH": str(PREFETCH), "LEVERET_BATCH_MAX": "4"})
    tracker = await asyncio.to_thread(cluster.start_tracker)
    topology = Topology(cluster.namespace)
    inbox = topology.tracker.name
    api = TrackerApi(cluster.tracker_url)
    try:
        await publish_results(channel, topology, ["before"])
        await eventually(
            lambda: _has_status(api, "before", "completed"), 30, "the tracker consuming"
        )

        database = cluster.workdir / "data" / "tracker.db"
        lock = sqlite3.connect(database, isolation_level=None, timeout=1)
        lock.execute("BEGIN EXCLUSIVE")  # another process's writer: the tracker cannot commit
        ids = [f"locked-{i:02d}" for i in range(N)]
        await publish_results(channel, topology, ids)

        # While the store cannot commit, the tracker holds a full prefetch window unacked
        # and the broker keeps the rest: nothing was acked.
        await queues.wait_figures(
            inbox, N - PREFETCH, PREFETCH, f"{PREFETCH} unacked and {N - PREFETCH} ready"
        )
        assert await queues.declared(inbox) == N - PREFETCH
        assert [await api.task(i) for i in ids] == [{}] * N  # nothing recorded (404s)
        assert tracker.alive()

        tracker.send(signal.SIGKILL)
        await asyncio.to_thread(tracker.proc.wait, 10)

        # Every message is back, ready for the next tracker. (A passive declare's count
        # leaves out returned messages on a quorum queue: ask the management API.)
        await queues.wait_figures(inbox, N, 0, f"all {N} messages back in the queue")
        lock.execute("ROLLBACK")
        lock.close()

        await asyncio.to_thread(cluster.start_tracker)
        await recorded_exactly_once(api, ids, total=N + 1)
        await queues.wait_figures(inbox, 0, 0, "the tracker queue empty, nothing unacked")
    finally:
        await api.close()


async def _has_status(api: TrackerApi, task_id: str, status: str) -> bool:
    return (await api.task(task_id)).get("status") == status


async def test_postgresql_refusing_connections_retries_answers_503_then_records_once(
    amqp_url: str,
    namespace: str,
    channel: AbstractChannel,
    queues: Queues,
    pg: PgDatabase,
    logs: list[str],
) -> None:
    settings = TrackerSettings(
        amqp_url=amqp_url,
        namespace=namespace,
        database_url=pg.url,
        host="127.0.0.1",
        port=free_port(),
        prefetch=PREFETCH,
        batch_max=4,
        batch_wait_ms=5,
        heartbeat_timeout_s=60,
    )
    topology = settings.topology
    inbox = topology.tracker.name
    try:
        async with running(settings) as http:
            api = TrackerApi(str(http.base_url))
            await publish_results(channel, topology, ["before"])
            await eventually(lambda: _has_status(api, "before", "completed"), 10, "consuming")

            assert await pg.refuse() > 0  # the tracker's pooled sessions, among others
            ids = [f"refused-{i:02d}" for i in range(N)]
            await publish_results(channel, topology, ids)

            async def unavailable() -> bool:
                return (await http.get("/tasks/before")).status_code == 503

            await eventually(unavailable, 10, "GET /tasks/{id} answering 503")
            answer = await http.get("/tasks/before")
            assert answer.headers["Retry-After"] == "1"
            assert answer.json()["detail"]["error"] == "unavailable"
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert "database unreachable" in health.json()["problems"]
            await queues.wait_figures(
                inbox, N - PREFETCH, PREFETCH, f"{PREFETCH} unacked and {N - PREFETCH} ready"
            )
            retries = sum("tracker store write failed; retrying" in line for line in logs)
            assert retries >= 1  # waited out as transient, not refused
            assert await queues.declared(topology.rejected.name) == 0  # nothing dead-lettered

            await pg.accept()
            await recorded_exactly_once(api, ids, total=N + 1)
            assert (await http.get("/healthz")).status_code == 200
            await queues.wait_figures(inbox, 0, 0, "the tracker queue empty, nothing unacked")
            assert await queues.declared(topology.rejected.name) == 0
            report(f"tracker store faults: {retries} store write retries while PostgreSQL refused")
            await api.close()
    finally:
        drop_namespace(amqp_url, namespace)


async def _post(http: httpx.AsyncClient, task_id: str) -> httpx.Response:
    return await http.post("/tasks", json={"kind": "echo", "payload": task_id, "id": task_id})


async def work_queued(channel: AbstractChannel, topology: Topology) -> int:
    """Messages waiting on the default pool's work queues (every band)."""
    total = 0
    for band in Band:
        queue = await channel.declare_queue(topology.work("default", band).name, passive=True)
        total += queue.declaration_result.message_count or 0
    return total


async def test_scheduler_answers_503_while_its_database_refuses_connections(
    amqp_url: str, namespace: str, tmp_path: Path, channel: AbstractChannel, pg: PgDatabase
) -> None:
    cluster = Cluster(
        namespace=namespace,
        amqp_url=amqp_url,
        workdir=tmp_path / "cluster",
        extra_env={"LEVERET_SCHEDULER_DATABASE_URL": pg.url},
    )
    try:
        await asyncio.to_thread(cluster.start_scheduler)
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=60) as http:
            assert (await _post(http, "first")).status_code == 202
            await pg.refuse()
            refused = await _post(http, "second")
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["detail"]["error"] == "unavailable"
            await pg.accept()
            again = await _post(http, "second")  # the client retries as told
            assert (again.status_code, again.json()["status"]) == (202, "pending")
        assert await work_queued(channel, Topology(namespace)) == 2
        assert cluster.services[0].alive()
    finally:
        await asyncio.to_thread(cluster.stop_all, 15)
        drop_namespace(amqp_url, namespace)


async def test_amqp_submissions_during_a_database_outage_are_admitted_once_after_it(
    amqp_url: str,
    namespace: str,
    tmp_path: Path,
    channel: AbstractChannel,
    pg: PgDatabase,
    queues: Queues,
) -> None:
    """Submissions that reach the AMQP intake while the scheduler's database refuses
    connections wait (unacked, retried with backoff), then are each admitted once."""
    cluster = Cluster(
        namespace=namespace,
        amqp_url=amqp_url,
        workdir=tmp_path / "cluster",
        extra_env={"LEVERET_SCHEDULER_DATABASE_URL": pg.url},
    )
    topology = Topology(namespace)
    ids = [f"outage-{i}" for i in range(5)]
    try:
        await asyncio.to_thread(cluster.start_scheduler)
        scheduler = cluster.services[0]
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=60) as http:
            assert (await _post(http, "first")).status_code == 202
            await pg.refuse()
            submit = await channel.get_exchange(topology.submit_exchange, ensure=False)
            for task_id in ids:
                body = json.dumps({"kind": "echo", "id": task_id, "payload": task_id}).encode()
                await submit.publish(aio_pika.Message(body, delivery_mode=2), "default")

            async def retrying() -> bool:
                return scheduler.log().count("intake retrying") >= len(ids)

            await eventually(retrying, 30, "the intake retrying while the database refuses")
            refused = await _post(http, "second")
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"]
            await pg.accept()

        # A passive declare undercounts a quorum queue here: ask the management API.
        normal = topology.work("default", Band.NORMAL).name
        everything = 1 + len(ids)
        await queues.wait_figures(normal, everything, 0, "the held submissions queued, once each")
        await queues.wait_figures(topology.intake.name, 0, 0, "an intake with nothing held")
        queued = []
        for band in Band:
            queue = await channel.declare_queue(topology.work("default", band).name, passive=True)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                queued.append(json.loads(message.body)["id"])
        assert sorted(queued) == sorted(["first", *ids])
        assert scheduler.alive()
    finally:
        await asyncio.to_thread(cluster.stop_all, 15)
        drop_namespace(amqp_url, namespace)


async def test_scheduler_answers_503_while_the_broker_is_unreachable(
    amqp_url: str, namespace: str, tmp_path: Path, channel: AbstractChannel
) -> None:
    parts = urlsplit(amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.serve()
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    cluster = Cluster(namespace=namespace, amqp_url=via_proxy.geturl(), workdir=tmp_path / "c")
    try:
        await asyncio.to_thread(cluster.start_scheduler)  # the proxy runs on this loop
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=60) as http:
            assert (await _post(http, "first")).status_code == 202
            proxy.cut()  # the broker is gone for the scheduler (reconnects are reset)
            refused = await _post(http, "second")
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["detail"]["error"] == "unavailable"
            await proxy.serve()

            async def accepted() -> bool:
                answer = await _post(http, "second")  # the client retries as told
                if answer.status_code == 503:
                    return False
                assert (answer.status_code, answer.json()["status"]) == (202, "pending")
                return True

            await eventually(accepted, 30, "the scheduler accepting again", interval_s=0.5)
        # Refused while the broker was gone, then queued once: not lost, not twice.
        assert await work_queued(channel, Topology(namespace)) == 2
        assert cluster.services[0].alive()
    finally:
        await asyncio.to_thread(cluster.stop_all, 15)
        await proxy.close()
        drop_namespace(amqp_url, namespace)
