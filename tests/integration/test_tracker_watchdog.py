"""The watchdog over a real SQLite store with a fake management API and a fake clock
(no broker): what it closes, what it records in one transaction, what it warns about."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from loguru import logger
from sqlalchemy import inspect

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
)
from leveret.errors import BrokerError
from leveret.settings import sqlite_url
from leveret.topology import Topology
from leveret.tracker.consumer import MAX_WORKER_IDS, Consumer
from leveret.tracker.state import AttemptOutcome
from leveret.tracker.store import TrackerStore
from leveret.tracker.watchdog import CONSEQUENCE, Watchdog
from leveret.tracker.workers import Death, WorkerState

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TIMEOUT_S = 3.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class FakeApi:
    """Answers like the management API; `closes` is what close_connections returns next."""

    def __init__(
        self, closes: int | BrokerError = 1, sees_all: bool = True, closes_all: bool = True
    ) -> None:
        self.closes = closes
        self.sees_all = sees_all
        self.closes_all = closes_all
        self.up = True
        self.calls: list[tuple[str, str | None, str]] = []

    async def available(self) -> bool:
        return self.up

    async def sees_all_connections(self) -> bool:
        return self.sees_all

    async def closes_all_connections(self) -> bool:
        return self.closes_all

    async def close_connections(
        self,
        connection_name: str,
        vhost: str | None,
        reason: str,
        users: frozenset[str] | None = None,
    ) -> int:
        self.calls.append((connection_name, vhost, reason))
        if isinstance(self.closes, BrokerError):
            raise self.closes
        return self.closes


class Clock:
    def __init__(self, seconds: float) -> None:
        self.now = at(seconds)

    def __call__(self) -> datetime:
        return self.now

    def to(self, seconds: float) -> None:
        self.now = at(seconds)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TrackerStore]:
    opened = await TrackerStore.open(sqlite_url(tmp_path / "t.db"), heartbeat_timeout_s=TIMEOUT_S)
    yield opened
    await opened.close()


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])))
    yield lines
    logger.remove(sink)


def heartbeat(worker: str, seconds: float) -> WorkerHeartbeat:
    info = WorkerInfo(
        id=worker, host="h", pid=1, pool="default", concurrency=2, kinds=["echo"], version="1"
    )
    return WorkerHeartbeat(worker=info, at=at(seconds))


def started(worker: str, task_id: str, attempt: int = 1) -> TasksStarted:
    return TasksStarted(
        worker=worker, tasks=[StartedTask(id=task_id, attempt=attempt, started_at=at(0.5))]
    )


def completed(task_id: str, worker: str, attempt: int = 1) -> TaskResult:
    return TaskResult(
        id=task_id, kind="echo", status="completed", result=attempt, attempt=attempt, worker=worker
    )


async def busy_worker(store: TrackerStore, worker: str = "w1") -> None:
    """`worker` heard at 0 s, running t1 and t2; t3 ran on it and completed; w2 runs t4."""
    ids = ["t1", "t2", "t3", "t4"]
    accepted = [AcceptedTask(id=i, kind="echo", pool="default", submitted_at=at(0)) for i in ids]
    await store.apply(
        [
            TasksAccepted(tasks=accepted),
            heartbeat(worker, 0),
            heartbeat("w2", 0),
            started(worker, "t1"),
            started(worker, "t2"),
            started(worker, "t3"),
            completed("t3", worker),
            started("w2", "t4"),
        ]
    )


def watchdog(store: TrackerStore, api: FakeApi, clock: Clock, **kw: object) -> Watchdog:
    return Watchdog(store, api, timeout_s=TIMEOUT_S, vhost="v1", clock=clock, **kw)  # type: ignore[arg-type]


async def states(store: TrackerStore, now: datetime) -> dict[str, WorkerState]:
    return {w.id: w.state for w in await store.list_workers(now)}


async def test_fences_a_silent_worker_and_releases_its_tasks_in_one_go(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    await busy_worker(store)
    await store.apply([heartbeat("w2", 9)])  # w2 keeps beating
    clock = Clock(-1)
    api = FakeApi(closes=1)
    dog = watchdog(store, api, clock)
    clock.to(3)
    await dog.tick()
    assert api.calls == []  # exactly one timeout of silence is not yet too long
    clock.to(10)
    await dog.tick()
    assert api.calls == [("w1", "v1", "leveret-fenced: no heartbeat for 10 s")]
    views = {w.id: w for w in await store.list_workers(at(10))}
    assert views["w1"].state is WorkerState.DEAD and views["w2"].state is WorkerState.ALIVE
    record = views["w1"].record
    assert record is not None and (record.death, record.dead_at) == (Death.FENCED, at(10))
    for task_id in ("t1", "t2"):
        task = await store.get_task(task_id)
        assert task is not None and (task.status, task.worker) == (TaskStatus.PENDING, None)
        assert [(a.attempt, a.outcome) for a in task.attempts] == [(1, AttemptOutcome.FENCED)]
    t3, t4 = await store.get_task("t3"), await store.get_task("t4")
    assert t3 is not None and t3.attempts[0].outcome is AttemptOutcome.COMPLETED
    assert t4 is not None and t4.status is TaskStatus.RUNNING
    assert (
        "INFO",
        "worker w1 declared dead after 10.0 s without heartbeat; closed 1 connections; "
        "released 2 tasks",
    ) in logs
    await dog.tick()
    assert len(api.calls) == 1  # a fenced worker is done with


async def test_fencing_then_late_messages_of_the_old_attempt_are_ignored(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    await busy_worker(store)
    clock = Clock(-1)
    dog = watchdog(store, FakeApi(closes=1), clock)
    clock.to(10)
    await dog.tick()
    # Sent before the fence, delivered after it: changes nothing.
    await store.apply([heartbeat("w1", 9), completed("t1", "w1")])
    assert (await states(store, at(11)))["w1"] is WorkerState.DEAD
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.PENDING
    assert (
        "INFO",
        "late result of fenced attempt 1 of task t1 from worker w1 ignored",
    ) in logs
    await store.apply([started("w1~1", "t1", attempt=2), completed("t1", "w1~1", attempt=2)])
    t1 = await store.get_task("t1")
    assert t1 is not None and (t1.status, t1.result, t1.worker) == (TaskStatus.COMPLETED, 2, "w1~1")


async def test_a_fenced_worker_heard_from_again_is_watched_and_fenced_again(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    await busy_worker(store)
    clock = Clock(-1)
    api = FakeApi(closes=1)
    dog = watchdog(store, api, clock)
    clock.to(10)
    await dog.tick()
    # Back under its fenced id (the close reason was lost in a connection reset).
    await store.apply([heartbeat("w1", 11)])
    assert (await states(store, at(11)))["w1"] is WorkerState.ALIVE
    assert any(
        level == "WARNING"
        and "worker w1 was fenced at 2024-05-01T12:00:10+00:00 and is heard from again: "
        "watched again"
        in message
        for level, message in logs
    )
    t1 = await store.get_task("t1")  # its fenced attempt stays written off
    assert t1 is not None and [a.outcome for a in t1.attempts] == [AttemptOutcome.FENCED]
    clock.to(13)
    await dog.tick()
    assert [c[0] for c in api.calls].count("w1") == 1  # heard from 2 s ago: fine
    clock.to(15)
    await dog.tick()  # silent again for longer than the timeout: fenced again
    assert [c[0] for c in api.calls].count("w1") == 2
    [w1] = [w for w in await store.list_workers(at(15)) if w.id == "w1"]
    assert w1.record is not None and (w1.record.death, w1.record.dead_at) == (Death.FENCED, at(15))


async def test_a_restarted_tracker_gives_each_worker_one_timeout(store: TrackerStore) -> None:
    await busy_worker(store)
    clock = Clock(100)  # the tracker (re)started long after w1 was last heard of
    api = FakeApi()
    dog = watchdog(store, api, clock)
    clock.to(102.9)
    await dog.tick()
    assert api.calls == []
    await store.apply([heartbeat("w2", 102.9)])
    clock.to(103.1)
    await dog.tick()
    assert [c[0] for c in api.calls] == ["w1"]


async def test_silence_counts_only_up_to_when_the_tracker_caught_up(store: TrackerStore) -> None:
    await busy_worker(store)
    clock = Clock(-1)
    caught_up = Clock(2)  # the consumer has a backlog since 2 s
    api = FakeApi()
    dog = watchdog(store, api, clock, caught_up=caught_up)
    clock.to(30)
    await dog.tick()
    assert api.calls == []
    caught_up.to(30)
    await dog.tick()
    assert {c[0] for c in api.calls} == {"w1", "w2"}


async def test_an_unlisted_connection_counts_as_gone_once_confirmed(store: TrackerStore) -> None:
    await busy_worker(store)
    clock = Clock(-1)
    api = FakeApi(closes=0)
    dog = watchdog(store, api, clock, gone_confirm_s=6)
    await store.apply([heartbeat("w2", 100)])
    clock.to(5)
    await dog.tick()
    assert (await states(store, at(5)))["w1"] is WorkerState.SUSPECT  # maybe not listed yet
    clock.to(10.9)
    await dog.tick()
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.RUNNING
    clock.to(11)
    await dog.tick()
    views = {w.id: w for w in await store.list_workers(at(11))}
    assert views["w1"].record is not None and views["w1"].record.death is Death.GONE
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.PENDING
    # It was only cut off: back on a new connection under the same id, it lives again.
    await store.apply([heartbeat("w1", 17)])
    assert (await states(store, at(17)))["w1"] is WorkerState.ALIVE


async def test_without_the_management_api_the_worker_keeps_its_tasks(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    await busy_worker(store)
    await store.apply([heartbeat("w2", 100)])
    clock = Clock(-1)
    api = FakeApi(closes=BrokerError("management API GET /api/connections failed: refused"))
    api.up = False
    dog = watchdog(store, api, clock)
    assert await dog.check_api() is False
    assert ("WARNING", f"RabbitMQ management API unavailable: {CONSEQUENCE}") in logs
    for second in (10, 10.5, 11, 11.5):
        clock.to(second)
        await dog.tick()
    assert len(api.calls) < 4  # it backs off
    assert (await states(store, at(12)))["w1"] is WorkerState.DEAD
    warnings = [m for level, m in logs if level == "WARNING" and m.startswith("worker w1")]
    assert len(warnings) == 1 and "could not be closed" in warnings[0]
    assert "consumer_timeout" in warnings[0]
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.RUNNING and t1.attempts[0].outcome is None
    # Its late result still counts, and a heartbeat brings it back.
    await store.apply([completed("t1", "w1"), heartbeat("w1", 12)])
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.COMPLETED
    assert (await states(store, at(12)))["w1"] is WorkerState.ALIVE


async def test_the_watchdog_keeps_trying_and_fences_once_the_api_is_back(
    store: TrackerStore,
) -> None:
    await busy_worker(store)
    await store.apply([heartbeat("w2", 1000)])
    clock = Clock(-1)
    api = FakeApi(closes=BrokerError("refused"))
    dog = watchdog(store, api, clock)
    clock.to(10)
    await dog.tick()
    api.closes = 1
    clock.to(100)
    await dog.tick()
    views = {w.id: w for w in await store.list_workers(at(100))}
    assert views["w1"].record is not None and views["w1"].record.death is Death.FENCED
    assert views["w1"].record.dead_at == at(10)  # dead since the first verdict
    t2 = await store.get_task("t2")
    assert t2 is not None and t2.status is TaskStatus.PENDING


async def test_a_user_who_cannot_see_every_connection_never_assumes_it_gone(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    await busy_worker(store)
    await store.apply([heartbeat("w2", 1000)])
    clock = Clock(-1)
    dog = watchdog(store, FakeApi(closes=0, sees_all=False), clock, gone_confirm_s=0)
    assert await dog.check_api() is False
    assert any("cannot see other users' connections" in m for _, m in logs)
    clock.to(60)
    await dog.tick()
    views = {w.id: w for w in await store.list_workers(at(60))}
    assert views["w1"].record is not None and views["w1"].record.death is Death.UNFENCED
    t1 = await store.get_task("t1")
    assert t1 is not None and t1.status is TaskStatus.RUNNING


async def test_a_user_who_sees_every_connection_but_cannot_close_them_is_warned_about(
    store: TrackerStore, logs: list[tuple[str, str]]
) -> None:
    dog = watchdog(store, FakeApi(sees_all=True, closes_all=False), Clock(0))
    assert await dog.check_api() is False
    [warning] = [m for level, m in logs if level == "WARNING"]
    assert "may close only its own (needs the administrator tag)" in warning
    assert CONSEQUENCE in warning
    assert await watchdog(store, FakeApi(), Clock(0)).check_api() is True


async def test_old_databases_gain_the_new_columns(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "old.db")
    store = await TrackerStore.open(url)
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql("DROP INDEX ix_attempts_worker_outcome")
        for table, column in (("tasks", "retry_at"), ("workers", "dead_at"), ("workers", "death")):
            await conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    await store.close()
    store = await TrackerStore.open(url)
    async with store.engine.connect() as conn:
        columns = await conn.run_sync(
            lambda c: {
                t: {col["name"] for col in inspect(c).get_columns(t)} for t in ("tasks", "workers")
            }
        )
        indexes = await conn.run_sync(
            lambda c: {i["name"] for i in inspect(c).get_indexes("attempts")}
        )
    await store.close()
    assert "retry_at" in columns["tasks"] and {"dead_at", "death"} <= columns["workers"]
    assert "ix_attempts_worker_outcome" in indexes


async def test_a_reconnected_tracker_gives_each_worker_one_timeout(store: TrackerStore) -> None:
    await busy_worker(store)
    await store.apply([heartbeat("w2", 1000)])
    clock = Clock(-1)
    reconnected = Clock(50)  # the consumer was cut off from the broker until 50 s
    api = FakeApi()
    dog = watchdog(store, api, clock, listening_since=reconnected)
    clock.to(52)
    await dog.tick()
    assert api.calls == []
    clock.to(53.5)
    await dog.tick()
    assert [c[0] for c in api.calls] == ["w1"]


def consumer(store: TrackerStore, clock: Clock) -> Consumer:
    return Consumer(store, Topology("t"), prefetch=1, batch_max=1, batch_wait_ms=1, clock=clock)


def delivery(user: str) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, SimpleNamespace(user_id=user))


async def test_a_worker_whose_clock_is_behind_is_not_fenced(store: TrackerStore) -> None:
    clock = Clock(0)
    heard = consumer(store, clock)
    api = FakeApi()
    dog = watchdog(store, api, clock)
    for second in range(0, 13):  # a heartbeat a second, each stamped 10 s in the past
        clock.to(second)
        await store.apply([heard._as_received(delivery("w"), heartbeat("w1", second - 10))])
        await dog.tick()
    assert api.calls == []
    assert (await states(store, at(12)))["w1"] is WorkerState.ALIVE
    clock.to(12 + TIMEOUT_S + 0.1)  # silence still counts, by the tracker's clock
    await dog.tick()
    assert [c[0] for c in api.calls] == ["w1"]


async def test_the_senders_remembered_per_worker_are_bounded(store: TrackerStore) -> None:
    heard = consumer(store, Clock(0))
    for n in range(MAX_WORKER_IDS + 5):
        heard._as_received(delivery("w"), heartbeat(f"w{n}", 0))
    assert len(heard.worker_users) == MAX_WORKER_IDS
    assert "w0" not in heard.worker_users  # the least recently heard went first
    assert heard.worker_users[f"w{MAX_WORKER_IDS + 4}"] == {"w"}
    heard.forget_workers([f"w{MAX_WORKER_IDS + 4}", "unknown"])
    assert len(heard.worker_users) == MAX_WORKER_IDS - 1
