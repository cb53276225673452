"""The tracker store on SQLite and on PostgreSQL (no broker needed).

Every test runs on both (the `database_url` fixture of ``tests/conftest.py``); the
PostgreSQL database of the run has a non-UTC time zone, so a timestamp that only
round-trips by luck of the server's clock shows up.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from helpers import report
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskError,
    TaskProgress,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStopped,
)
from leveret.db import UtcDateTime, create_engine
from leveret.tracker.state import AttemptOutcome, ReplyState, TrackerMessage
from leveret.tracker.store import InvalidCursor, TrackerStore, decode_cursor, encode_cursor
from leveret.tracker.workers import Death, WorkerState

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def accepted(*ids: str, kind: str = "echo") -> TasksAccepted:
    return TasksAccepted(
        tasks=[AcceptedTask(id=i, kind=kind, pool="default", submitted_at=at(0)) for i in ids]
    )


def started(worker: str, *ids: str, attempt: int = 1) -> TasksStarted:
    return TasksStarted(
        worker=worker, tasks=[StartedTask(id=i, attempt=attempt, started_at=at(1)) for i in ids]
    )


def result(
    task_id: str, status: str = "completed", *, worker: str = "w1", finished: float = 3
) -> TaskResult:
    return TaskResult.model_validate(
        {
            "id": task_id,
            "kind": "echo",
            "status": status,
            "result": {"n": task_id} if status == "completed" else None,
            "error": TaskError(type="boom", message="it broke") if status == "failed" else None,
            "attempt": 1,
            "worker": worker,
            "submitted_at": at(0),
            "started_at": at(1),
            "finished_at": at(finished),
        }
    )


def heartbeat(
    worker: str,
    seconds: float,
    in_flight: list[str] | None = None,
    *,
    concurrency: int = 2,
    host: str = "h",
) -> WorkerHeartbeat:
    info = WorkerInfo(
        id=worker,
        host=host,
        pid=1,
        pool="default",
        concurrency=concurrency,
        kinds=["echo"],
        version="1",
    )
    return WorkerHeartbeat(worker=info, in_flight=in_flight or [], at=at(seconds))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TrackerStore]:
    opened = await TrackerStore.open(database_url, heartbeat_timeout_s=5)
    yield opened
    await opened.close()


async def test_lifecycle_with_attempts_and_aware_timestamps(store: TrackerStore) -> None:
    await store.apply([accepted("t1")])
    pending = await store.get_task("t1")
    assert pending is not None and pending.status is TaskStatus.PENDING
    await store.apply([started("w1", "t1"), result("t1")])
    done = await store.get_task("t1")
    assert done is not None
    assert (done.status, done.result, done.worker) == (TaskStatus.COMPLETED, {"n": "t1"}, "w1")
    assert done.submitted_at == at(0) and done.finished_at == at(3)
    assert done.finished_at.tzinfo is not None
    assert [(a.attempt, a.worker, a.outcome) for a in done.attempts] == [
        (1, "w1", AttemptOutcome.COMPLETED)
    ]
    assert await store.get_task("never-seen") is None


async def test_first_terminal_wins_across_batches(store: TrackerStore) -> None:
    await store.apply([accepted("t1"), started("w1", "t1"), result("t1", "failed")])
    await store.apply([result("t1", "completed", worker="w2", finished=9)])
    await store.apply([result("t1", "failed")])  # redelivered
    task = await store.get_task("t1")
    assert task is not None
    assert (task.status, task.error_type, task.worker, task.finished_at) == (
        TaskStatus.FAILED,
        "boom",
        "w1",
        at(3),
    )
    stats = await store.stats(at(10))
    by_worker = {w.id: w.counters for w in stats.workers}
    assert by_worker["w1"].failed == 1 and by_worker["w1"].completed == 0
    assert "w2" not in by_worker  # its result was not the one recorded


async def test_out_of_order_events_in_one_batch(store: TrackerStore) -> None:
    await store.apply([result("t1"), started("w1", "t1"), accepted("t1")])
    task = await store.get_task("t1")
    assert task is not None
    assert (task.status, task.kind, task.pool) == (TaskStatus.COMPLETED, "echo", "default")


async def test_rejected_never_overwrites(store: TrackerStore) -> None:
    await store.apply([accepted("t1"), result("t1", "rejected"), result("r1", "rejected")])
    known = await store.get_task("t1")
    refused = await store.get_task("r1")
    assert known is not None and known.status is TaskStatus.PENDING
    assert refused is not None and refused.status is TaskStatus.REJECTED


async def test_list_tasks_filters_and_pages_newest_first(store: TrackerStore) -> None:
    ids = [f"t{i:02d}" for i in range(25)]
    await store.apply([accepted(*ids[:20]), accepted(*ids[20:], kind="other")])
    await store.apply([result(i) for i in ids[:5]])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_tasks(limit=10, cursor=cursor)
        seen += [t.id for t in page.tasks]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    done = await store.list_tasks(status=TaskStatus.COMPLETED)
    assert [t.id for t in done.tasks] == list(reversed(ids[:5])) and done.next_cursor is None
    other = await store.list_tasks(kind="other", status=TaskStatus.PENDING)
    assert [t.id for t in other.tasks] == list(reversed(ids[20:]))
    with pytest.raises(InvalidCursor):
        await store.list_tasks(cursor="not-a-cursor")


def test_cursor_round_trips() -> None:
    assert decode_cursor(encode_cursor(12345)) == 12345


async def test_workers_state_counters_and_notes(store: TrackerStore) -> None:
    await store.apply([heartbeat("w1", 0, ["t1"]), heartbeat("w2", 0)])
    await store.apply([accepted("t1", "t2"), started("w1", "t1", "t2"), result("t1")])
    await store.apply([result("t2", "failed", finished=4), heartbeat("w1", 4)])
    await store.apply([WorkerStopped(worker="w2", at=at(5))])
    views = {w.id: w for w in await store.list_workers(at(8))}
    assert views["w1"].state is WorkerState.ALIVE
    assert views["w1"].record is not None and views["w1"].record.in_flight == ()
    assert (views["w1"].counters.completed, views["w1"].counters.failed) == (1, 1)
    assert views["w1"].counters.busy_s == pytest.approx(5.0)
    assert views["w2"].state is WorkerState.STOPPED
    later = {w.id: w.state for w in await store.list_workers(at(13))}
    assert later["w1"] is WorkerState.SUSPECT
    assert {w.id: w.state for w in await store.list_workers(at(15))}["w1"] is WorkerState.DEAD


async def test_stats_counts_throughput_latency(store: TrackerStore) -> None:
    ids = [f"t{i}" for i in range(10)]
    await store.apply([accepted(*ids), started("w1", *ids)])
    await store.apply([result(i, finished=1 + n) for n, i in enumerate(ids[:6])])
    await store.apply([result("t6", "failed", finished=10), result("r", "rejected")])
    stats = await store.stats(at(30))
    assert stats.counts[TaskStatus.COMPLETED] == 6
    assert stats.counts[TaskStatus.FAILED] == 1
    assert stats.counts[TaskStatus.RUNNING] == 3
    assert stats.counts[TaskStatus.REJECTED] == 1
    assert stats.counts[TaskStatus.PENDING] == 0 and stats.counts[TaskStatus.CANCELLED] == 0
    assert stats.total == 11
    assert stats.throughput_60s == pytest.approx(7 / 60)
    assert stats.throughput_overall == pytest.approx(7 / 10)  # first submit at 0, last finish 10
    assert stats.latency_sample == 7
    assert stats.latency_s["p50"] == pytest.approx(4.0)
    assert stats.latency_s["p99"] == pytest.approx(10.0)
    far = await store.stats(at(1000))
    assert far.throughput_60s == 0


async def test_apply_is_idempotent_for_a_redelivered_batch(store: TrackerStore) -> None:
    batch: list[TrackerMessage] = [
        accepted("a", "b"),
        started("w1", "a", "b"),
        result("a"),
        heartbeat("w1", 2),
    ]
    first = await store.apply(batch)
    again = await store.apply(batch)
    assert first.transitions == 5 and again.transitions == 0
    stats = await store.stats(at(5))
    assert {w.id: w.counters.completed for w in stats.workers} == {"w1": 1}


async def test_a_reply_is_owed_in_the_outcomes_transaction_and_marked_sent_once(
    store: TrackerStore,
) -> None:
    asked = [
        AcceptedTask(id=i, kind="echo", pool="default", submitted_at=at(0), reply_to=f"r-{i}")
        for i in ("a", "b")
    ]
    quiet = await store.apply([TasksAccepted(tasks=asked), started("w1", "a", "b")])
    assert quiet.replies == ()  # nothing ended: nothing owed
    # Both end in one batch; a ran twice, and only its first result is replied.
    applied = await store.apply([result("a"), result("b", "failed"), result("a", worker="w2")])
    assert sorted((r.id, r.status, r.worker) for r in applied.replies) == [
        ("a", TaskStatus.COMPLETED, "w1"),
        ("b", TaskStatus.FAILED, "w1"),
    ]
    for task_id in ("a", "b"):
        owed = await store.get_task(task_id)
        assert owed is not None and (owed.reply, owed.reply_to) == (ReplyState.OWED, f"r-{task_id}")
    assert await store.mark_replies_sent(["a"], at(20)) == 1
    assert await store.mark_replies_sent(["a"], at(21)) == 0  # already sent
    b = await store.get_task("b")
    assert b is not None and b.reply is ReplyState.OWED
    # A redelivered batch owes nothing again; the record says where its reply stands.
    again = await store.apply([result("a"), result("b", "failed")])
    assert again.replies == ()
    a = await store.get_task("a")
    assert a is not None and (a.reply, a.reply_at) == (ReplyState.SENT, at(20))


async def test_replies_sent_are_marked_in_the_next_batchs_transaction(
    store: TrackerStore,
) -> None:
    asked = AcceptedTask(id="m", kind="echo", pool="default", submitted_at=at(0), reply_to="r-m")
    ended = await store.apply([TasksAccepted(tasks=[asked]), result("m")])
    assert [r.id for r in ended.replies] == ["m"]
    # The reply went out; the next batch (about anything) records it with its own writes.
    await store.apply([accepted("other")], sent=["m"])
    record = await store.get_task("m")
    assert record is not None and record.reply is ReplyState.SENT
    # A redelivery of its result no longer asks for the reply again.
    again = await store.apply([result("m")], resend={"m"})
    assert again.replies == ()


async def test_big_batch_crosses_parameter_chunks(store: TrackerStore) -> None:
    ids = [f"bulk-{i}" for i in range(1200)]
    await store.apply([accepted(*ids)])
    await store.apply([started("w1", *ids), *(result(i) for i in ids)])
    stats = await store.stats(at(10))
    assert stats.counts[TaskStatus.COMPLETED] == 1200


# PostgreSQL paths: time zones, upserts, the schema upgrade, the replicas' advisory lock

#: Tracker replicas share PostgreSQL; SQLite serves one tracker per file.
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
KATHMANDU = timezone(timedelta(hours=5, minutes=45))
PACIFIC = timezone(timedelta(hours=-8))


def utc_instant(moment: datetime | None, expected: datetime) -> bool:
    """True when `moment` is `expected`, timezone-aware and expressed in UTC."""
    return moment == expected and moment is not None and moment.utcoffset() == timedelta(0)


async def test_timestamps_come_back_in_utc_whatever_offset_they_came_in(
    store: TrackerStore,
) -> None:
    if store.engine.dialect.name == "postgresql":
        async with store.engine.connect() as conn:
            zone = await conn.scalar(text("SHOW timezone"))
        assert zone not in ("UTC", "Etc/UTC", "GMT"), "the server's time zone would hide offsets"
    east, west = KATHMANDU, PACIFIC
    task = AcceptedTask(
        id="tz", kind="echo", pool="default", submitted_at=at(0).astimezone(east), run_at=at(60)
    )
    run = TasksStarted(
        worker="w-east", tasks=[StartedTask(id="tz", attempt=1, started_at=at(1).astimezone(west))]
    )
    halfway = TaskProgress(
        id="tz", attempt=1, worker="w-east", fraction=0.5, at=at(2).astimezone(east)
    )
    await store.apply([TasksAccepted(tasks=[task]), run, halfway, heartbeat("w-east", 0)])
    await store.apply([heartbeat("w-west", 4)])
    running = await store.get_task("tz")
    assert running is not None and running.progress is not None
    assert utc_instant(running.progress.at, at(2))
    done = result("tz", worker="w-east").model_copy(
        update={"finished_at": at(3).astimezone(west), "started_at": at(1).astimezone(east)}
    )
    await store.apply([done])
    record = await store.get_task("tz")
    assert record is not None and record.status is TaskStatus.COMPLETED
    assert utc_instant(record.submitted_at, at(0))
    assert utc_instant(record.started_at, at(1))
    assert utc_instant(record.finished_at, at(3))
    assert utc_instant(record.run_at, at(60))
    (attempt,) = record.attempts
    assert utc_instant(attempt.started_at, at(1)) and utc_instant(attempt.finished_at, at(3))
    # Compared as instants, not wall clocks: 12:00 UTC is 17:45 in Kathmandu, 04:00 in the west.
    silent = await store.silent_workers(at(3).astimezone(west))
    assert [w.id for w in silent] == ["w-east"]
    assert utc_instant(silent[0].last_seen, at(0))
    states = {w.id: w.state for w in await store.list_workers(at(8).astimezone(east))}
    assert states == {"w-east": WorkerState.SUSPECT, "w-west": WorkerState.ALIVE}
    stats = await store.stats(at(30).astimezone(east))
    assert stats.throughput_60s == pytest.approx(1 / 60)
    assert stats.latency_s["p50"] == pytest.approx(3.0)


async def test_upserts_update_rows_in_place(store: TrackerStore) -> None:
    await store.apply([heartbeat("w1", 0)])
    await store.apply([heartbeat("w1", 1, concurrency=5, host="h2")])  # re-registered
    (view,) = await store.list_workers(at(2))
    assert view.record is not None
    assert (view.record.host, view.record.concurrency, view.record.last_seen) == ("h2", 5, at(1))
    await store.apply([accepted("t1", "t2", "t3"), started("w1", "t1", "t2", "t3")])
    running = await store.get_task("t1")
    assert running is not None
    assert [(a.attempt, a.outcome) for a in running.attempts] == [(1, None)]
    # One result per batch: the counters row is incremented, not replaced.
    for n, task_id in enumerate(("t1", "t2", "t3")):
        await store.apply([result(task_id, "failed" if n == 2 else "completed")])
    done = await store.get_task("t1")
    assert done is not None
    assert [(a.attempt, a.worker, a.outcome) for a in done.attempts] == [
        (1, "w1", AttemptOutcome.COMPLETED)
    ]
    (view,) = await store.list_workers(at(4))
    assert (view.counters.completed, view.counters.failed) == (2, 1)
    assert view.counters.busy_s == pytest.approx(6.0)


def first_version_schema() -> MetaData:
    """The tracker's tables as its first release made them (before retries, delays,
    dependencies, progress, capabilities and the watchdog's verdicts)."""
    old = MetaData()
    seq = BigInteger().with_variant(Integer, "sqlite")
    Table(
        "tasks",
        old,
        Column("seq", seq, primary_key=True, autoincrement=True),
        Column("id", String(200), nullable=False, unique=True),
        Column("kind", String(128)),
        Column("pool", String(64)),
        Column("status", String(16), nullable=False),
        Column("result", JSON),
        Column("error_type", String(200)),
        Column("error_message", Text),
        Column("attempt", Integer, nullable=False, default=0),
        Column("worker", String(200)),
        Column("correlation_id", String(200)),
        Column("submitted_at", UtcDateTime),
        Column("started_at", UtcDateTime),
        Column("finished_at", UtcDateTime, index=True),
    )
    Table(
        "attempts",
        old,
        Column("task_id", String(200), primary_key=True),
        Column("attempt", Integer, primary_key=True),
        Column("worker", String(200)),
        Column("started_at", UtcDateTime),
        Column("finished_at", UtcDateTime),
        Column("outcome", String(16)),
    )
    Table(
        "workers",
        old,
        Column("id", String(200), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("pool", String(64), nullable=False),
        Column("concurrency", Integer, nullable=False),
        Column("kinds", JSON, nullable=False),
        Column("capabilities", JSON, nullable=False),
        Column("version", String(64), nullable=False),
        Column("started_at", UtcDateTime, nullable=False),
        Column("last_seen", UtcDateTime, nullable=False),
        Column("in_flight", JSON, nullable=False),
        Column("stopped_at", UtcDateTime),
    )
    Table(
        "worker_counters",
        old,
        Column("worker", String(200), primary_key=True),
        Column("completed", BigInteger, nullable=False, default=0),
        Column("failed", BigInteger, nullable=False, default=0),
        Column("busy_s", Float, nullable=False, default=0.0),
    )
    return old


async def test_a_first_version_database_is_brought_up_to_date(database_url: str) -> None:
    old = first_version_schema()
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        await conn.execute(
            old.tables["tasks"].insert(),
            {
                "id": "old-1",
                "kind": "echo",
                "pool": "default",
                "status": "completed",
                "result": {"n": 1},
                "attempt": 1,
                "worker": "w-old",
                "submitted_at": at(0),
                "started_at": at(1),
                "finished_at": at(3),
            },
        )
        await conn.execute(
            old.tables["workers"].insert(),
            {
                "id": "w-old",
                "host": "h",
                "pid": 1,
                "pool": "default",
                "concurrency": 2,
                "kinds": ["echo"],
                "capabilities": [],
                "version": "0.1",
                "started_at": at(0),
                "last_seen": at(3),
                "in_flight": [],
            },
        )
    await engine.dispose()

    store = await TrackerStore.open(database_url, heartbeat_timeout_s=5)
    await store.close()
    store = await TrackerStore.open(database_url, heartbeat_timeout_s=5)  # again: nothing to do
    try:
        kept = await store.get_task("old-1")
        assert kept is not None
        assert (kept.status, kept.result, kept.worker) == (TaskStatus.COMPLETED, {"n": 1}, "w-old")
        assert utc_instant(kept.finished_at, at(3))
        assert (kept.run_at, kept.depends_on, kept.progress, kept.requires) == (None, (), None, ())
        # The columns added since hold what the new messages carry.
        held = AcceptedTask(
            id="new-1",
            kind="echo",
            pool="default",
            submitted_at=at(4),
            status="blocked",
            run_at=at(60),
            depends_on=["old-1"],
            requires=["gpu"],
        )
        await store.apply(
            [TasksAccepted(tasks=[held]), accepted("new-2"), started("w-old", "new-2")]
        )
        await store.apply(
            [TaskProgress(id="new-2", attempt=1, worker="w-old", fraction=0.25, at=at(5))]
        )
        new = await store.get_task("new-1")
        assert new is not None
        assert (new.status, new.run_at, new.depends_on, new.requires) == (
            TaskStatus.BLOCKED,
            at(60),
            ("old-1",),
            ("gpu",),
        )
        running = await store.get_task("new-2")
        assert running is not None and running.progress is not None
        assert running.progress.fraction == 0.25
        assert await store.declare_dead("w-old", at(20), Death.GONE) == 1  # new-2 back to pending
        (worker,) = await store.list_workers(at(21))
        assert worker.state is WorkerState.DEAD
        assert worker.record is not None and worker.record.death is Death.GONE
        async with store.engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {
                    i["name"] for t in ("tasks", "attempts") for i in inspect(c).get_indexes(t)
                }
            )
        assert {
            "ix_tasks_status_seq",
            "ix_tasks_kind_seq",
            "ix_attempts_worker_outcome",
        } <= indexes
        # ... and the reply a task owes its producer.
        asked = AcceptedTask(
            id="new-3", kind="echo", pool="default", submitted_at=at(4), reply_to="replies-1"
        )
        applied = await store.apply([TasksAccepted(tasks=[asked]), result("new-3")])
        assert [(r.id, r.reply_to, r.reply) for r in applied.replies] == [
            ("new-3", "replies-1", ReplyState.OWED)
        ]
        kept = await store.get_task("new-3")
        assert kept is not None and kept.reply is ReplyState.OWED
    finally:
        await store.close()


@ON_POSTGRESQL
async def test_replicas_starting_together_on_an_empty_database(database_url: str) -> None:
    opened = await asyncio.gather(*(TrackerStore.open(database_url) for _ in range(4)))
    try:
        await opened[0].apply([accepted("t1")])
        for replica in opened:
            task = await replica.get_task("t1")
            assert task is not None and task.status is TaskStatus.PENDING
    finally:
        for replica in opened:
            await replica.close()


@ON_POSTGRESQL
async def test_replicas_applying_the_same_tasks_at_once_stay_consistent(database_url: str) -> None:
    """Two stores (two tracker replicas) apply results for the same tasks concurrently:
    the advisory lock makes one result per task win, counted once, for its own worker."""
    first = await TrackerStore.open(database_url)
    second = await TrackerStore.open(database_url)
    ids = [f"c{i:03d}" for i in range(300)]
    batches = [ids[i : i + 10] for i in range(0, len(ids), 10)]
    try:
        await first.apply([accepted(*ids[:150]), started("w1", *ids[:150])])

        async def replica(store: TrackerStore, worker: str, finished: float) -> None:
            for batch in batches:  # the second half is new to both: inserted concurrently
                messages: list[TrackerMessage] = [accepted(*batch)]
                messages += [result(i, worker=worker, finished=finished) for i in batch]
                await store.apply(messages)

        await asyncio.gather(replica(first, "w1", 3), replica(second, "w2", 9))
        recorded: dict[str, Any] = {}
        for task_id in ids:
            task = await first.get_task(task_id)
            assert task is not None and task.status is TaskStatus.COMPLETED
            assert (task.worker, task.finished_at) in (("w1", at(3)), ("w2", at(9)))
            assert len([a for a in task.attempts if a.outcome is not None]) == 1
            recorded[task_id] = task.worker
        won = Counter(recorded.values())
        counters = {w.id: w.counters.completed for w in (await first.stats(at(10))).workers}
        assert counters == {w: n for w, n in won.items()}  # each result counted once, its winner's
        report(f"tracker store, two replicas on PostgreSQL: {dict(won)} of {len(ids)} tasks won")
    finally:
        await first.close()
        await second.close()
