"""The tracker store on a temporary SQLite file (no broker needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskError,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStopped,
)
from leveret.settings import sqlite_url
from leveret.tracker.state import AttemptOutcome, TrackerMessage
from leveret.tracker.store import InvalidCursor, TrackerStore, decode_cursor, encode_cursor
from leveret.tracker.workers import WorkerState

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


def heartbeat(worker: str, seconds: float, in_flight: list[str] | None = None) -> WorkerHeartbeat:
    info = WorkerInfo(
        id=worker, host="h", pid=1, pool="default", concurrency=2, kinds=["echo"], version="1"
    )
    return WorkerHeartbeat(worker=info, in_flight=in_flight or [], at=at(seconds))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TrackerStore]:
    opened = await TrackerStore.open(sqlite_url(tmp_path / "tracker.db"), heartbeat_timeout_s=5)
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


async def test_big_batch_crosses_parameter_chunks(store: TrackerStore) -> None:
    ids = [f"bulk-{i}" for i in range(1200)]
    await store.apply([accepted(*ids)])
    await store.apply([started("w1", *ids), *(result(i) for i in ids)])
    stats = await store.stats(at(10))
    assert stats.counts[TaskStatus.COMPLETED] == 1200
