"""Fault tolerance in the tracker against a real broker, in this run's own vhost: closing
connections through the management API, dead letters, and the watchdog end to end.

Skipped when no broker answers, unless ``CI`` is set (then it fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from helpers import report
from loguru import logger
from tcp_proxy import TcpProxy
from test_tracker_service import Tracker, free_port, running, task_result

from leveret.amqp import json_message, open_channel
from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskMessage,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    utcnow,
)
from leveret.management import ManagementApi, vhost_of
from leveret.settings import TrackerSettings, sqlite_url
from leveret.topology import (
    RK_POISON,
    RK_TASKS_ACCEPTED,
    RK_TASKS_STARTED,
    RK_WORKER_HEARTBEAT,
    RK_WORKER_STARTED,
    delete_namespace,
)

pytestmark = pytest.mark.broker

TIMEOUT_S = 1.0
#: A sanity bound on what should take about TIMEOUT_S, for a loaded machine.
SANITY_S = 30.0
#: The management API lists a new connection after its next statistics round (5 s default).
LISTED_WITHIN_S = 15.0
T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Poll `check` until it returns something other than None, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await check()
        if value is not None:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)  # poll interval, not synchronisation


class Closed(asyncio.Event):
    """Set by a connection's close callback; keeps why it closed."""

    reason = ""

    def __call__(self, _sender: object, exc: BaseException | None) -> None:
        self.reason = str(exc)
        self.set()


async def named_connection(amqp_url: str, name: str) -> tuple[AbstractConnection, Closed]:
    """A plain (not robust) connection called `name`, and an event set when it closes.

    aio-pika's `is_closed` only turns true on a client-side close; a close by the
    broker shows in the close callback and in `connected`.
    """
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": name})
    closed = Closed()
    connection.close_callbacks.add(closed)
    return connection, closed


async def listed(amqp_url: str, name: str) -> None:
    """Wait until the management API lists the connection called `name`."""
    api = ManagementApi.from_settings(None, amqp_url)

    async def check() -> bool | None:
        response = await api._http.get("/api/connections", params={"columns": "client_properties"})
        names = {c.get("client_properties", {}).get("connection_name") for c in response.json()}
        return True if name in names else None

    try:
        await until(check, LISTED_WITHIN_S, f"connection {name} listed")
    finally:
        await api.close()


@pytest.fixture
def settings(amqp_url: str, namespace: str, tmp_path: Path) -> TrackerSettings:
    return TrackerSettings(
        amqp_url=amqp_url,
        namespace=namespace,
        database_url=sqlite_url(tmp_path / "tracker.db"),
        host="127.0.0.1",
        port=free_port(),
        batch_wait_ms=5,
        heartbeat_timeout_s=TIMEOUT_S,
    )


@pytest.fixture
async def channel(
    amqp_url: str, settings: TrackerSettings, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractChannel]:
    """A publishing channel in the run's vhost; deletes the test's namespace at the end."""
    name = f"test-{request.node.name}"[:120]
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}
    )
    opened = await open_channel(connection)
    yield opened
    await delete_namespace(opened, settings.topology, [])
    await connection.close()


@pytest.fixture
async def tracker(settings: TrackerSettings, channel: AbstractChannel) -> AsyncIterator[Tracker]:
    async with running(settings) as http:
        yield Tracker(settings, http, channel)


async def bound_queue(channel: AbstractChannel, exchange: str, key: str = "#") -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, key)
    return queue


async def next_message(queue: AbstractQueue, what: str) -> aio_pika.IncomingMessage:
    async def check() -> aio_pika.IncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)  # type: ignore[return-value]

    return await until(check, 5, what)


def x_death(namespace: str, reason: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "count": count,
            "reason": reason,
            "queue": f"{namespace}.work.default",
            "time": datetime.now(UTC).replace(microsecond=0),
            "exchange": f"{namespace}.work",
            "routing-keys": ["default"],
        }
    ]


def work(task_id: str, **fields: Any) -> TaskMessage:
    return TaskMessage(id=task_id, kind="crash", submitted_at=utcnow(), **fields)


async def test_management_api_closes_a_named_connection(amqp_url: str) -> None:
    name = f"test-close-{uuid.uuid4().hex[:8]}"
    connection, closed = await named_connection(amqp_url, name)
    api = ManagementApi.from_settings(None, amqp_url)
    try:
        assert await api.available()
        await listed(amqp_url, name)
        assert await api.close_connections(name, "no-such-vhost", "leveret-fenced: test") == 0
        assert not connection.is_closed
        reason = "leveret-fenced: no heartbeat for 9 s"
        assert await api.close_connections(name, vhost_of(amqp_url), reason) == 1
        await asyncio.wait_for(closed.wait(), 5)
        assert not connection.connected.is_set()
        assert "CONNECTION_FORCED - leveret-fenced: no heartbeat for 9 s" in closed.reason
    finally:
        await api.close()
        await connection.close()


async def test_poison_dead_letter_is_recorded_failed_and_published(tracker: Tracker) -> None:
    topo = tracker.topology
    results = await bound_queue(tracker.channel, topo.results_exchange)
    replies = await tracker.channel.declare_queue(exclusive=True, auto_delete=True)
    task = work(f"p-{uuid.uuid4().hex[:6]}", correlation_id="corr-p", reply_to=replies.name)
    headers = {"x-death": x_death(topo.namespace, "delivery_limit", 4)}
    dead = await tracker.channel.get_exchange(topo.dead_exchange)
    await dead.publish(json_message(task, message_id=task.id, headers=headers), RK_POISON)

    recorded = await tracker.task_with(task.id, "failed")
    assert recorded["error"] == {
        "type": "poison",
        "message": "worker crashed 4 times running it (delivery limit reached)",
    }
    assert (recorded["kind"], recorded["pool"], recorded["worker"]) == ("crash", "default", None)
    for queue, what in ((results, "result on the results exchange"), (replies, "reply")):
        message = await next_message(queue, what)
        result = TaskResult.model_validate_json(message.body)
        assert (result.id, result.status, message.correlation_id) == (task.id, "failed", "corr-p")
        assert result.error is not None and result.error.type == "poison"
        if queue is results:
            assert message.routing_key == "failed.default.crash"

    async def acked() -> bool | None:
        queue = await tracker.channel.declare_queue(topo.dead_letters.name, passive=True)
        return True if queue.declaration_result.message_count == 0 else None

    await until(acked, 5, "the dead-letter queue to be empty")


async def test_dead_letter_of_a_finished_task_changes_nothing(tracker: Tracker) -> None:
    topo = tracker.topology
    await tracker.publish_result(task_result("done-1", kind="crash", result="ok"))
    await tracker.task_with("done-1", "completed")
    results = await bound_queue(tracker.channel, topo.results_exchange, "failed.#")
    dead = await tracker.channel.get_exchange(topo.dead_exchange)
    headers = {"x-death": x_death(topo.namespace, "delivery_limit", 1)}
    for task_id in ("done-1", "marker-1"):  # handled in order: the marker comes second
        await dead.publish(json_message(work(task_id), headers=headers), RK_POISON)
    message = await next_message(results, "the marker's failure")
    assert TaskResult.model_validate_json(message.body).id == "marker-1"
    done = await tracker.task("done-1")
    assert done is not None and (done["status"], done["result"]) == ("completed", "ok")


async def test_undecodable_dead_letters_end_in_the_rejected_queue(tracker: Tracker) -> None:
    topo = tracker.topology
    dead = await tracker.channel.get_exchange(topo.dead_exchange)
    rejected = await tracker.channel.declare_queue(topo.rejected.name, passive=True)
    headers = {"x-death": x_death(topo.namespace, "rejected", 1)}
    await dead.publish(json_message(b"{not json", message_id="bad-1", headers=headers), RK_POISON)
    await dead.publish(json_message(b'{"id": "x"}', headers=headers), RK_POISON)

    parked = [await next_message(rejected, "a parked dead letter") for _ in range(2)]
    assert [m.body for m in parked] == [b"{not json", b'{"id": "x"}']
    for message in parked:
        headers_out = message.headers or {}
        assert "not a task" in str(headers_out["x-leveret-reason"])
        assert headers_out["x-leveret-error-type"] == "invalid_message"
        assert headers_out["x-death"]  # the broker's account travels with it
    bad = await tracker.task_with("bad-1", "failed")
    assert bad["error"]["type"] == "invalid_message"
    assert (await tracker.http.get("/healthz")).status_code == 200


async def test_watchdog_fences_a_silent_worker_end_to_end(tracker: Tracker, amqp_url: str) -> None:
    topo = tracker.topology
    worker_id = f"w-{uuid.uuid4().hex[:8]}"
    task_id = f"t-{uuid.uuid4().hex[:6]}"
    connection, closed = await named_connection(amqp_url, worker_id)
    await listed(amqp_url, worker_id)  # the API cannot close what it does not list yet
    info = WorkerInfo(
        id=worker_id, host="h", pid=1, pool="default", concurrency=1, kinds=["e"], version="1"
    )

    async def beat() -> None:
        while True:
            hb = WorkerHeartbeat(worker=info, in_flight=[task_id])
            await tracker.publish(topo.events_exchange, RK_WORKER_HEARTBEAT, hb)
            await asyncio.sleep(TIMEOUT_S / 5)  # the heartbeat interval

    accepted = AcceptedTask(id=task_id, kind="e", pool="default", submitted_at=utcnow())
    await tracker.publish(topo.events_exchange, RK_TASKS_ACCEPTED, TasksAccepted(tasks=[accepted]))
    await tracker.publish(topo.events_exchange, RK_WORKER_STARTED, WorkerStarted(worker=info))
    beats = asyncio.create_task(beat())
    try:
        begun = StartedTask(id=task_id, attempt=1, started_at=utcnow())
        started = TasksStarted(worker=worker_id, tasks=[begun])
        await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, started)
        await tracker.task_with(task_id, "running")
        assert (await worker_state(tracker, worker_id)) == "alive"
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
    loop = asyncio.get_running_loop()
    silent_since = loop.time()
    assert connection.connected.is_set()  # it holds its task on a live connection

    # A generous sanity bound: fencing takes the timeout plus management round trips,
    # which a loaded machine may stretch; the claims are about order, checked below.
    await asyncio.wait_for(closed.wait(), SANITY_S)
    fenced_after_s = loop.time() - silent_since
    assert "leveret-fenced: no heartbeat for" in closed.reason
    assert not connection.connected.is_set()

    async def released() -> dict[str, Any] | None:
        task = await tracker.task(task_id)
        dead = await worker_state(tracker, worker_id) == "dead"
        return task if dead and task is not None and task["status"] == "pending" else None

    task = await until(released, SANITY_S, f"{worker_id} dead and {task_id} pending")
    released_after_s = loop.time() - silent_since
    report(
        f"tracker watchdog: silent worker's connection closed {fenced_after_s:.2f} s and its "
        f"task pending {released_after_s:.2f} s after its last heartbeat "
        f"(heartbeat timeout {TIMEOUT_S} s)"
    )
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in task["attempts"]] == [
        (1, worker_id, "fenced")
    ]
    listed_workers = (await tracker.http.get("/workers")).json()["workers"]
    fenced = next(w for w in listed_workers if w["id"] == worker_id)
    # Death "fenced" is recorded only once its connection was closed, in the transaction
    # that writes its attempt off: the task went back to pending after the fence.
    assert fenced["death"] == "fenced" and fenced["in_flight"] == []
    # Judged dead only after a full heartbeat timeout of silence (the tracker's clocks).
    silence = datetime.fromisoformat(fenced["dead_at"]) - datetime.fromisoformat(
        fenced["last_seen"]
    )
    assert silence.total_seconds() >= TIMEOUT_S

    # The woken worker's late result, and a heartbeat sent before the fence, change nothing ...
    last_heard = datetime.fromisoformat(fenced["last_seen"])
    late = WorkerHeartbeat(worker=info, in_flight=[task_id], at=last_heard)
    await tracker.publish_result(task_result(task_id, attempt=1, worker=worker_id, kind="e"))
    await tracker.publish(topo.events_exchange, RK_WORKER_HEARTBEAT, late)
    await tracker.publish_result(task_result(f"{task_id}-marker"))
    await tracker.task_with(f"{task_id}-marker", "completed")
    assert (await tracker.task(task_id) or {})["status"] == "pending"
    assert (await worker_state(tracker, worker_id)) == "dead"
    # ... but one sent after it (back under its old id) makes it watched again.
    await tracker.publish(topo.events_exchange, RK_WORKER_HEARTBEAT, WorkerHeartbeat(worker=info))

    async def watched() -> bool | None:
        return True if await worker_state(tracker, worker_id) == "alive" else None

    await until(watched, SANITY_S, f"{worker_id} watched again")
    assert [a["outcome"] for a in (await tracker.task(task_id) or {})["attempts"]] == ["fenced"]
    # ... while attempt 2, on its new registration, is recorded.
    again = TasksStarted(
        worker=f"{worker_id}~1", tasks=[StartedTask(id=task_id, attempt=2, started_at=utcnow())]
    )
    await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, again)
    await tracker.publish_result(
        task_result(task_id, attempt=2, worker=f"{worker_id}~1", kind="e", result="second")
    )
    done = await tracker.task_with(task_id, "completed")
    assert (done["result"], done["attempt"]) == ("second", 2)
    assert [a["outcome"] for a in done["attempts"]] == ["fenced", "completed"]


async def worker_state(tracker: Tracker, worker_id: str) -> str | None:
    response = await tracker.http.get("/workers")
    states = {w["id"]: w["state"] for w in response.json()["workers"]}
    return states.get(worker_id)


async def test_management_api_unreachable_is_not_fatal(
    settings: TrackerSettings, channel: AbstractChannel
) -> None:
    unreachable = settings.model_copy(update={"management_url": f"http://127.0.0.1:{free_port()}"})
    async with running(unreachable) as http:
        tracker = Tracker(unreachable, http, channel)
        info = WorkerInfo(
            id="w-nomgmt", host="h", pid=1, pool="default", concurrency=1, kinds=["e"], version="1"
        )
        topo = tracker.topology
        await tracker.publish(topo.events_exchange, RK_WORKER_STARTED, WorkerStarted(worker=info))
        started = TasksStarted(
            worker="w-nomgmt", tasks=[StartedTask(id="t-held", attempt=1, started_at=utcnow())]
        )
        await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, started)

        async def declared_dead() -> bool | None:
            return True if await worker_state(tracker, "w-nomgmt") == "dead" else None

        await until(declared_dead, SANITY_S, "w-nomgmt dead for display")
        held = await tracker.task("t-held")
        assert held is not None and held["status"] == "running"  # it still holds it
        await tracker.publish_result(task_result("t-held", worker="w-nomgmt"))
        await tracker.task_with("t-held", "completed")
        hb = WorkerHeartbeat(worker=info)
        await tracker.publish(topo.events_exchange, RK_WORKER_HEARTBEAT, hb)

        async def alive() -> bool | None:
            return True if await worker_state(tracker, "w-nomgmt") == "alive" else None

        await until(alive, 5, "w-nomgmt alive again")
        assert (await http.get("/healthz")).status_code == 200


# The watchdog against the real management API: a connection already gone, the API down
# and back, and a user who cannot see or close other users' connections.


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO"
    )
    yield lines
    logger.remove(sink)


async def silent_worker_holding_a_task(
    tracker: Tracker, amqp_url: str
) -> tuple[str, str, AbstractConnection, Closed]:
    """A worker on a listed connection of its own, running a task, heard once and then
    never again: its id, the task's id, its connection and that connection's close event."""
    topo = tracker.topology
    worker_id = f"w-{uuid.uuid4().hex[:8]}"
    task_id = f"t-{uuid.uuid4().hex[:6]}"
    connection, closed = await named_connection(amqp_url, worker_id)
    await listed(amqp_url, worker_id)
    info = WorkerInfo(
        id=worker_id, host="h", pid=1, pool="default", concurrency=1, kinds=["e"], version="1"
    )
    accepted = AcceptedTask(id=task_id, kind="e", pool="default", submitted_at=utcnow())
    await tracker.publish(topo.events_exchange, RK_TASKS_ACCEPTED, TasksAccepted(tasks=[accepted]))
    await tracker.publish(topo.events_exchange, RK_WORKER_STARTED, WorkerStarted(worker=info))
    started = TasksStarted(
        worker=worker_id, tasks=[StartedTask(id=task_id, attempt=1, started_at=utcnow())]
    )
    await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, started)
    beat = WorkerHeartbeat(worker=info, in_flight=[task_id])
    await tracker.publish(topo.events_exchange, RK_WORKER_HEARTBEAT, beat)
    await tracker.task_with(task_id, "running")
    return worker_id, task_id, connection, closed


async def worker_view(tracker: Tracker, worker_id: str) -> dict[str, Any]:
    workers = (await tracker.http.get("/workers")).json()["workers"]
    return next(w for w in workers if w["id"] == worker_id)


async def wait_death(tracker: Tracker, worker_id: str, death: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await worker_view(tracker, worker_id)
        return view if view["state"] == "dead" and view["death"] == death else None

    return await until(check, SANITY_S, f"{worker_id} dead ({death})")


async def holds_its_task(tracker: Tracker, task_id: str, connection: AbstractConnection) -> None:
    """The worker was not written off: its task runs, its connection is open."""
    task = await tracker.task(task_id)
    assert task is not None and task["status"] == "running"
    assert [a["outcome"] for a in task["attempts"]] == [None]
    assert connection.connected.is_set()


async def released(tracker: Tracker, task_id: str, worker_id: str, outcome: str) -> None:
    """The task is pending again, its attempt on the worker written off (`outcome`)."""

    async def pending() -> dict[str, Any] | None:
        task = await tracker.task(task_id)
        return task if task is not None and task["status"] == "pending" else None

    task = await until(pending, SANITY_S, f"{task_id} pending")
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in task["attempts"]] == [
        (1, worker_id, outcome)
    ]


async def said(logs: list[tuple[str, str]], warning: str) -> None:
    """Wait for the tracker's check of the management API at start to warn `warning`."""

    async def check() -> bool | None:
        return True if any(lv == "WARNING" and warning in m for lv, m in logs) else None

    await until(check, SANITY_S, f"the warning {warning!r}")


async def keeps_going(tracker: Tracker) -> None:
    """The tracker still records results and says it is healthy."""
    marker = f"marker-{uuid.uuid4().hex[:6]}"
    await tracker.publish_result(task_result(marker))
    await tracker.task_with(marker, "completed")
    assert (await tracker.http.get("/healthz")).status_code == 200


async def test_a_worker_whose_connection_is_already_gone_is_written_off_quietly(
    tracker: Tracker, amqp_url: str, logs: list[tuple[str, str]]
) -> None:
    worker_id, task_id, connection, closed = await silent_worker_holding_a_task(tracker, amqp_url)
    await connection.close()  # it died: its connection is gone before the watchdog acts
    assert closed.is_set()

    # Nothing to close: once the connection stayed unlisted for a while, the broker has
    # certainly requeued its deliveries, so its attempt is written off.
    view = await wait_death(tracker, worker_id, "gone")
    assert view["in_flight"] == []
    await released(tracker, task_id, worker_id, "lost")
    assert "leveret-fenced" not in closed.reason  # closed by itself, not by the tracker
    noise = [(level, m) for level, m in logs if level in ("WARNING", "ERROR", "CRITICAL")]
    assert noise == []
    assert any(f"worker {worker_id} declared dead" in m and "closed 0" in m for _, m in logs)
    await keeps_going(tracker)


async def test_management_api_down_then_back(
    settings: TrackerSettings,
    channel: AbstractChannel,
    amqp_url: str,
    logs: list[tuple[str, str]],
) -> None:
    amqp = urlsplit(amqp_url)
    proxy = TcpProxy(amqp.hostname or "127.0.0.1", 15672)  # refuses until it serves
    url = f"http://{amqp.username}:{amqp.password}@127.0.0.1:{proxy.port}"
    down_then_up = settings.model_copy(update={"management_url": url})
    try:
        async with running(down_then_up) as http:
            tracker = Tracker(down_then_up, http, channel)
            await said(logs, "RabbitMQ management API unavailable")
            worker_id, task_id, connection, closed = await silent_worker_holding_a_task(
                tracker, amqp_url
            )
            # Silent, but the API is down: dead for display only, and it keeps its task.
            await wait_death(tracker, worker_id, "unfenced")
            await holds_its_task(tracker, task_id, connection)
            warned = [m for _, m in logs if f"worker {worker_id} silent" in m]
            assert len(warned) == 1 and "could not be closed" in warned[0]
            await keeps_going(tracker)

            loop = asyncio.get_running_loop()
            back_at = loop.time()
            await proxy.serve()
            await asyncio.wait_for(closed.wait(), SANITY_S)
            fenced_s = loop.time() - back_at
            assert "leveret-fenced: no heartbeat for" in closed.reason
            assert proxy.accepted > 0
            await released(tracker, task_id, worker_id, "fenced")
            view = await worker_view(tracker, worker_id)
            assert (view["state"], view["death"]) == ("dead", "fenced")
            await keeps_going(tracker)
            report(f"tracker watchdog: fenced {fenced_s:.2f} s after the management API came back")
    finally:
        await proxy.close()


@pytest.fixture(params=["management", "monitoring"])
async def limited_user(
    request: pytest.FixtureRequest, amqp_url: str
) -> AsyncIterator[tuple[str, str]]:
    """A management API user with only the `management` or the `monitoring` tag (and
    every permission on the run's vhost): its (tag, management URL). Deleted after."""
    tag: str = request.param
    amqp = urlsplit(amqp_url)
    user, password = f"leveret-test-{tag}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin = ManagementApi.from_settings(None, amqp_url)
    vhost = quote(vhost_of(amqp_url), safe="")
    try:
        made = await admin._http.put(f"/api/users/{user}", json={"password": password, "tags": tag})
        assert made.status_code in (201, 204), made.text
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        allowed = await admin._http.put(f"/api/permissions/{vhost}/{user}", json=everything)
        assert allowed.status_code in (201, 204), allowed.text
        yield tag, f"http://{user}:{password}@{amqp.hostname}:15672"
    finally:
        deleted = await admin._http.delete(f"/api/users/{user}")
        await admin.close()
        assert deleted.status_code in (204, 404), deleted.text


async def test_a_user_who_cannot_close_other_users_connections_fences_nobody(
    settings: TrackerSettings,
    channel: AbstractChannel,
    amqp_url: str,
    limited_user: tuple[str, str],
    logs: list[tuple[str, str]],
) -> None:
    tag, url = limited_user
    limited = settings.model_copy(update={"management_url": url})
    async with running(limited) as http:
        tracker = Tracker(limited, http, channel)
        # It says so at start ...
        warning = {
            "management": "cannot see other users' connections (needs the administrator tag)",
            "monitoring": "may close only its own (needs the administrator tag)",
        }[tag]
        await said(logs, warning)
        # ... and a silent worker of another user (the AMQP URL's) is dead for display
        # only: neither closed nor assumed gone, so it keeps its task.
        worker_id, task_id, connection, _ = await silent_worker_holding_a_task(tracker, amqp_url)
        await wait_death(tracker, worker_id, "unfenced")
        await holds_its_task(tracker, task_id, connection)
        why = {
            "management": "its connection is not visible to the API user",
            "monitoring": "401",
        }[tag]
        [warned] = [m for _, m in logs if f"worker {worker_id} silent" in m]
        assert "could not be closed" in warned and why in warned
        await keeps_going(tracker)
        await connection.close()
