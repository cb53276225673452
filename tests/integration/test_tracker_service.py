"""The tracker service in-process against a real broker, under a throwaway namespace,
with its database on SQLite and on PostgreSQL (the `database_url` fixture).

Skipped when no broker answers, unless ``CI`` is set (then it fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pydantic import BaseModel

from leveret.amqp import json_message, open_channel, stamp_sender
from leveret.contracts import (
    AcceptedTask,
    TaskError,
    TaskResult,
    TasksAccepted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    utcnow,
)
from leveret.settings import TrackerSettings
from leveret.topology import (
    RK_TASKS_ACCEPTED,
    RK_WORKER_HEARTBEAT,
    Topology,
    delete_namespace,
    result_routing_key,
)
from leveret.tracker.service import run

pytestmark = pytest.mark.broker

#: A generous bound for a condition on a busy machine (not a timing claim).
DEADLINE_S = 30.0
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Poll `check` until it returns something other than None, or fail after a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        value = await check()
        if value is not None:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # poll interval, not synchronisation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def broker(
    amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractRobustConnection]:
    """A connection named after the test, on the run's vhost (`amqp_url` skips, or fails
    in CI, without a broker)."""
    name = f"test-{request.node.name}"[:120]
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}, timeout=10
    )
    yield connection
    await connection.close()


async def publish(
    channel: AbstractChannel, exchange: str, routing_key: str, body: BaseModel | bytes
) -> None:
    """Publish (mandatory, confirmed) to one of the namespace's exchanges, with the
    verified `user_id` every leveret service sets (the tracker fences only the
    connections of users a worker's news came from)."""
    ex = await channel.get_exchange(exchange)
    await ex.publish(stamp_sender(ex, json_message(body)), routing_key, mandatory=True)


async def publish_result(channel: AbstractChannel, topology: Topology, result: TaskResult) -> None:
    """Publish a result the way a worker does."""
    key = result_routing_key(result.status, result.pool, result.kind)
    await publish(channel, topology.results_exchange, key, result)


@dataclass
class Tracker:
    """A running tracker and what a test needs to talk to it."""

    settings: TrackerSettings
    http: httpx.AsyncClient
    channel: AbstractChannel

    @property
    def topology(self) -> Topology:
        return self.settings.topology

    async def publish(self, exchange: str, routing_key: str, body: BaseModel | bytes) -> None:
        await publish(self.channel, exchange, routing_key, body)

    async def publish_result(self, result: TaskResult) -> None:
        await publish_result(self.channel, self.topology, result)

    async def task(self, task_id: str) -> dict[str, Any] | None:
        response = await self.http.get(f"/tasks/{task_id}")
        return response.json() if response.status_code == 200 else None

    async def task_with(self, task_id: str, status: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            task = await self.task(task_id)
            return task if task is not None and task["status"] == status else None

        return await eventually(check, f"task {task_id} {status}")


@contextlib.asynccontextmanager
async def running(settings: TrackerSettings) -> AsyncIterator[httpx.AsyncClient]:
    """Run the tracker in-process until the block ends; yields an HTTP client for it."""
    stop, ready = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(run(settings, stop, ready=ready), name="tracker-under-test")
    try:
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, service}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if service.done():
            service.result()  # raises what stopped it
        assert ready.is_set(), "tracker did not become ready"
        base = f"http://127.0.0.1:{settings.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            yield http
    finally:
        stop.set()
        await asyncio.wait_for(service, 15)


@pytest.fixture
async def tracker_settings(amqp_url: str, database_url: str) -> TrackerSettings:
    """Settings under a fresh namespace, with an empty database (SQLite, then PostgreSQL)."""
    return TrackerSettings(
        amqp_url=amqp_url,
        namespace=f"t-{uuid.uuid4().hex[:8]}",
        database_url=database_url,
        host="127.0.0.1",
        port=free_port(),
        batch_wait_ms=5,
        heartbeat_timeout_s=5,
    )


@pytest.fixture
async def channel(
    broker: AbstractRobustConnection, tracker_settings: TrackerSettings
) -> AsyncIterator[AbstractChannel]:
    """A publishing channel; deletes the test's namespace at the end."""
    opened = await open_channel(broker)
    yield opened
    await delete_namespace(opened, tracker_settings.topology, [])
    await opened.close()


@pytest.fixture
async def tracker(
    tracker_settings: TrackerSettings, channel: AbstractChannel
) -> AsyncIterator[Tracker]:
    """A tracker running in-process under its own namespace."""
    async with running(tracker_settings) as http:
        yield Tracker(tracker_settings, http, channel)


def task_result(task_id: str, status: str = "completed", **fields: Any) -> TaskResult:
    now = utcnow()
    base: dict[str, Any] = {
        "id": task_id,
        "kind": "echo",
        "status": status,
        "attempt": 1,
        "worker": "w1",
        "submitted_at": now - timedelta(seconds=2),
        "started_at": now - timedelta(seconds=1),
        "finished_at": now,
    }
    return TaskResult.model_validate({**base, **fields})


async def test_health_unknown_task_and_bad_status(tracker: Tracker) -> None:
    health = await tracker.http.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    missing = await tracker.http.get("/tasks/never-submitted")
    assert missing.status_code == 404
    assert "unknown task" in missing.json()["detail"]
    bad = await tracker.http.get("/tasks", params={"status": "bogus"})
    assert bad.status_code == 422
    assert "pending" in str(bad.json()["detail"])  # the message lists the valid statuses


async def test_accepted_then_result_is_recorded(tracker: Tracker) -> None:
    accepted = TasksAccepted(
        tasks=[
            AcceptedTask(
                id="t-1", kind="echo", pool="default", submitted_at=utcnow(), correlation_id="c"
            )
        ]
    )
    await tracker.publish(tracker.topology.events_exchange, RK_TASKS_ACCEPTED, accepted)
    pending = await tracker.task_with("t-1", "pending")
    assert pending["correlation_id"] == "c" and pending["error"] is None
    await tracker.publish_result(task_result("t-1", result={"echo": [1, 2]}))
    done = await tracker.task_with("t-1", "completed")
    assert done["result"] == {"echo": [1, 2]}
    assert done["worker"] == "w1" and done["attempt"] == 1
    assert [a["outcome"] for a in done["attempts"]] == ["completed"]
    page = (await tracker.http.get("/tasks", params={"status": "completed"})).json()
    assert [t["id"] for t in page["tasks"]] == ["t-1"] and page["next_cursor"] is None


async def test_second_terminal_result_does_not_overwrite(tracker: Tracker) -> None:
    await tracker.publish_result(task_result("t-2", result="first"))
    await tracker.task_with("t-2", "completed")
    failed = task_result(
        "t-2", "failed", attempt=2, worker="w2", error=TaskError(type="boom", message="late")
    )
    await tracker.publish_result(failed)
    # Same queue, same publisher: once the marker is recorded, the late result was applied.
    await tracker.publish_result(task_result("t-2-marker"))
    await tracker.task_with("t-2-marker", "completed")
    task = await tracker.task("t-2")
    assert task is not None
    assert (task["status"], task["result"], task["error"], task["worker"]) == (
        "completed",
        "first",
        None,
        "w1",
    )
    stats = (await tracker.http.get("/stats")).json()
    assert {w["id"]: w["failed"] for w in stats["workers"]}.get("w2", 0) == 0


async def test_undecodable_message_is_dead_lettered_and_tracker_keeps_going(
    tracker: Tracker,
) -> None:
    await tracker.publish(tracker.topology.results_exchange, "completed.default.echo", b"{oops")
    await tracker.publish(tracker.topology.events_exchange, "task.progress", b'{"type": "nope"}')
    rejected = await tracker.channel.declare_queue(tracker.topology.rejected.name, passive=True)
    bodies: set[bytes] = set()

    async def both_dead_lettered() -> bool | None:
        message = await rejected.get(no_ack=True, fail=False)
        if message is not None:
            bodies.add(message.body)
        return True if len(bodies) == 2 else None

    await eventually(both_dead_lettered, "both messages in the rejected queue")
    assert bodies == {b"{oops", b'{"type": "nope"}'}
    await tracker.publish_result(task_result("t-3"))
    await tracker.task_with("t-3", "completed")
    assert (await tracker.http.get("/healthz")).status_code == 200


async def test_heartbeat_registers_worker_and_stats_cover_every_status(tracker: Tracker) -> None:
    info = WorkerInfo(
        id="w-hb", host="h1", pid=42, pool="default", concurrency=3, kinds=["echo"], version="1"
    )
    beat = WorkerHeartbeat(worker=info, in_flight=["t-x"])
    await tracker.publish(tracker.topology.events_exchange, RK_WORKER_HEARTBEAT, beat)

    async def registered() -> dict[str, Any] | None:
        workers = (await tracker.http.get("/workers")).json()["workers"]
        return next((w for w in workers if w["id"] == "w-hb"), None)

    worker = await eventually(registered, "worker w-hb registered")
    assert (worker["state"], worker["in_flight"], worker["concurrency"]) == ("alive", ["t-x"], 3)
    assert (worker["completed"], worker["failed"], worker["busy_s"]) == (0, 0, 0)

    await tracker.publish_result(task_result("t-4", worker="w-hb"))
    await tracker.task_with("t-4", "completed")
    stats = (await tracker.http.get("/stats")).json()
    assert set(stats["counts"]) == {status.value for status in TaskStatus}
    assert stats["counts"]["completed"] == 1 and stats["total"] == 1
    assert stats["throughput"]["last_60s"] > 0
    assert stats["latency_s"]["p50"] == pytest.approx(2.0, abs=0.1)
    hb = next(w for w in stats["workers"] if w["id"] == "w-hb")
    assert (hb["state"], hb["completed"], hb["busy_s"]) == ("alive", 1, pytest.approx(1.0, 0.01))


async def test_nothing_is_lost_across_a_restart(
    tracker_settings: TrackerSettings, channel: AbstractChannel
) -> None:
    async with running(tracker_settings) as http:
        first = Tracker(tracker_settings, http, channel)
        await first.publish_result(task_result("before", result={"n": 1}))
        recorded = await first.task_with("before", "completed")
    # Published while no tracker runs: waits in the durable tracker queue.
    await publish_result(
        channel, tracker_settings.topology, task_result("while-down", result={"n": 2})
    )
    queue = await channel.declare_queue(tracker_settings.topology.tracker.name, passive=True)
    assert queue.declaration_result.message_count == 1, "the result should wait in the queue"
    async with running(tracker_settings) as http:
        second = Tracker(tracker_settings, http, channel)
        while_down = await second.task_with("while-down", "completed")
        assert (while_down["result"], while_down["worker"]) == ({"n": 2}, "w1")
        assert await second.task("before") == recorded  # as the first tracker recorded it
        page = (await http.get("/tasks")).json()
        assert [t["id"] for t in page["tasks"]] == ["while-down", "before"]
        stats = (await http.get("/stats")).json()
        assert (stats["counts"]["completed"], stats["total"]) == (2, 2)
