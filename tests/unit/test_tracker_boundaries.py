"""The tracker's boundaries, as pure logic: size bounds checked before parsing, the
consumer refusing oversized deliveries without touching the store (one log line for
a flood), and the API answering a store failure with a JSON message, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from loguru import logger
from sqlalchemy.exc import IntegrityError, OperationalError
from test_tracker_consumer import TOPOLOGY, FakeDelivery, FakeStore, feed, make_consumer

from leveret.contracts import (
    MAX_EVENT_BYTES,
    MAX_RESULT_BYTES,
    AcceptedTask,
    TaskResult,
    TasksAccepted,
    WorkerInfo,
    WorkerStarted,
)
from leveret.errors import StoreUnavailable
from leveret.settings import TrackerSettings, sqlite_url
from leveret.topology import RK_TASKS_ACCEPTED, RK_WORKER_STARTED
from leveret.tracker.api import create_app
from leveret.tracker.consumer import Oversized, decode
from leveret.tracker.store import TrackerStore

RESULTS = TOPOLOGY.results_exchange
EVENTS = TOPOLOGY.events_exchange


def big_result() -> bytes:
    body = TaskResult(id="big", kind="echo", status="completed", result="x" * MAX_RESULT_BYTES)
    return body.model_dump_json().encode()


def started_worker(kinds: int) -> bytes:
    info = WorkerInfo(
        id="w", host="h", pid=1, pool="default", concurrency=1, version="1",
        kinds=[f"kind_{i:020d}" for i in range(kinds)],
    )  # fmt: skip
    return WorkerStarted(worker=info).model_dump_json().encode()


def test_size_bounds_are_checked_before_parsing() -> None:
    with pytest.raises(Oversized, match=str(MAX_RESULT_BYTES)):
        decode(TOPOLOGY, RESULTS, big_result(), "completed.default.echo")
    with pytest.raises(Oversized):  # not even JSON: refused for its size alone
        decode(TOPOLOGY, EVENTS, b"[" * (MAX_EVENT_BYTES + 1), RK_WORKER_STARTED)
    with pytest.raises(Oversized):
        decode(TOPOLOGY, EVENTS, started_worker(3000), RK_WORKER_STARTED)
    assert isinstance(
        decode(TOPOLOGY, EVENTS, started_worker(10), RK_WORKER_STARTED), WorkerStarted
    )
    # A chunk of announcements may be bigger than an ordinary event...
    tasks = [
        AcceptedTask(id=f"t-{i:040d}", kind="echo", pool="default", submitted_at=0)
        for i in range(500)
    ]
    many = TasksAccepted(tasks=tasks).model_dump_json().encode()
    assert len(many) > MAX_EVENT_BYTES
    assert isinstance(decode(TOPOLOGY, EVENTS, many, RK_TASKS_ACCEPTED), TasksAccepted)
    # ...but another event does not get that bound by borrowing its routing key.
    with pytest.raises(Oversized):
        decode(TOPOLOGY, EVENTS, started_worker(3000), RK_TASKS_ACCEPTED)


async def test_a_flood_of_oversized_messages_is_dead_lettered_and_logged_once() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        store = FakeStore()
        consumer = make_consumer(store)
        flood = [FakeDelivery(big_result(), i) for i in range(1, 21)]
        good = FakeDelivery(
            TaskResult(id="ok", kind="echo", status="completed").model_dump_json().encode(), 21
        )
        await feed(consumer, [*flood, good])
    finally:
        logger.remove(sink)
    assert all(d.settled == [("reject", False)] for d in flood)
    assert store.committed == [["ok"]] and good.settled == [("ack", True)]
    assert consumer.oversized == 20
    assert len([line for line in lines if "oversized" in line]) == 1


class FailingStore:
    """A store whose reads fail with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def get_task(self, task_id: str) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (IntegrityError("SELECT", {}, Exception("a value it cannot hold")), 500),
        (OperationalError("SELECT", {}, Exception("database is locked")), 503),
    ],
)
async def test_api_answers_a_store_failure_with_a_message(
    error: Exception, status: int, tmp_path: Path
) -> None:
    settings = TrackerSettings(database_url=sqlite_url(tmp_path / "t.db"))
    app = create_app(cast(TrackerStore, FailingStore(error)), settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tracker") as http:
        answer = await http.get("/tasks/t1")
    assert answer.status_code == status
    detail = answer.json()["detail"]
    assert detail["error"] == ("store_error" if status == 500 else "unavailable")
    assert "database" in detail["message"]
    assert ("Retry-After" in answer.headers) is (status == 503)


class UnavailableThenFine(FakeStore):
    """Raises leveret's StoreUnavailable (what the store raises now) the first two times."""

    async def apply(self, messages: Any, *, resend: Any = (), sent: Any = ()) -> Any:
        self.calls += 1
        if self.calls <= 2:
            raise StoreUnavailable("database unavailable: database is locked")
        return await super().apply(messages, resend=resend)


async def test_consumer_waits_out_store_unavailable_from_the_error_tree() -> None:
    store = UnavailableThenFine()
    body = TaskResult(id="t1", kind="echo", status="completed").model_dump_json().encode()
    delivery = FakeDelivery(body, 1)
    await feed(make_consumer(store), [delivery])
    assert store.committed == [["t1"]]
    assert delivery.settled == [("ack", True)]  # retried, never dead-lettered
