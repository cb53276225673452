"""Retention in the tracker's store, on SQLite and PostgreSQL, as a user of the tracker
API sees it: old finished tasks purged (410, then 404 naming retention), `/stats`
totals unchanged, running tasks and owed replies untouched, and registrations of
long-dead workers dropped without breaking the revival of a fenced worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from helpers import eventually

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStopped,
)
from leveret.settings import TrackerSettings
from leveret.tracker.api import create_app
from leveret.tracker.retention import Retention
from leveret.tracker.store import TrackerStore
from leveret.tracker.workers import Death

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
HOUR = 3600.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def accepted(*ids: str, reply_to: str | None = None) -> TasksAccepted:
    return TasksAccepted(
        tasks=[
            AcceptedTask(id=i, kind="echo", pool="default", submitted_at=at(0), reply_to=reply_to)
            for i in ids
        ]
    )


def started(*ids: str, when: float = 1) -> TasksStarted:
    return TasksStarted(
        worker="w1", tasks=[StartedTask(id=i, attempt=1, started_at=at(when)) for i in ids]
    )


def finished(task_id: str, when: float, status: str = "completed") -> TaskResult:
    return TaskResult.model_validate(
        {
            "id": task_id,
            "kind": "echo",
            "status": status,
            "attempt": 1,
            "worker": "w1",
            "submitted_at": at(0),
            "started_at": at(1),
            "finished_at": at(when),
        }
    )


def heartbeat(worker: str, seconds: float) -> WorkerHeartbeat:
    info = WorkerInfo(
        id=worker, host="h", pid=1, pool="default", concurrency=1, kinds=["echo"], version="1"
    )
    return WorkerHeartbeat(worker=info, in_flight=[], at=at(seconds))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TrackerStore]:
    opened = await TrackerStore.open(database_url, heartbeat_timeout_s=5)
    yield opened
    await opened.close()


def api(store: TrackerStore, retention_s: float, now: datetime) -> httpx.AsyncClient:
    settings = TrackerSettings(database_url="sqlite+aiosqlite://", retention=retention_s)
    app = create_app(store, settings, consuming=lambda: True, clock=lambda: now)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tracker")


async def test_old_finished_tasks_are_purged_and_answered_gone(store: TrackerStore) -> None:
    old = [f"old-{i}" for i in range(5)]
    await store.apply([accepted(*old, "recent", "running", "cancelled"), started(*old, "running")])
    await store.apply([finished(i, 10, "failed" if i == "old-0" else "completed") for i in old])
    await store.apply([finished("cancelled", 20, "cancelled"), finished("recent", 2 * HOUR)])
    await store.apply(
        [accepted("owes-reply", reply_to="amq.gen-reply"), finished("owes-reply", 10)]
    )
    now = at(2.5 * HOUR)  # old-* finished 2.5 h ago, `recent` 30 min ago
    async with api(store, HOUR, now) as http:
        before = (await http.get("/stats")).json()

    retention = Retention(
        store, retention_s=HOUR, worker_retention_s=HOUR, clock=lambda: now, batch=2
    )
    swept = await retention.sweep()
    assert swept.tasks == 6  # old-0..4 and cancelled, in batches of 2

    async with api(store, HOUR, now) as http:
        gone = await http.get("/tasks/old-3")
        assert gone.status_code == 410, gone.text
        assert "purged (LEVERET_RETENTION)" in gone.json()["detail"]
        assert "completed" in gone.json()["detail"] and "1h" in gone.json()["detail"]
        for kept, status in (("recent", "completed"), ("running", "running")):
            answer = await http.get(f"/tasks/{kept}")
            assert answer.status_code == 200 and answer.json()["status"] == status
        # Its reply is still owed: it stays until the reply is confirmed sent.
        assert (await http.get("/tasks/owes-reply")).json()["status"] == "completed"
        listed = (await http.get("/tasks", params={"limit": 100})).json()["tasks"]
        assert sorted(t["id"] for t in listed) == ["owes-reply", "recent", "running"]
        after = (await http.get("/stats")).json()
    assert after["counts"] == before["counts"] and after["total"] == before["total"] == 9
    assert after["purged"] == 6 and after["counts"]["failed"] == 1
    assert after["throughput"]["overall"] == pytest.approx(before["throughput"]["overall"])

    await store.mark_replies_sent(["owes-reply"], now)
    assert (await retention.sweep()).tasks == 1

    # One retention period later the purged ids are forgotten: 404, naming retention.
    later = now + timedelta(seconds=HOUR + 1)
    await Retention(store, retention_s=HOUR, worker_retention_s=HOUR, clock=lambda: later).sweep()
    async with api(store, HOUR, later) as http:
        forgotten = await http.get("/tasks/old-3")
        assert forgotten.status_code == 404 and "LEVERET_RETENTION" in forgotten.text
        assert (await http.get("/stats")).json()["total"] == 9
        assert (await http.get("/tasks/running")).json()["status"] == "running"


async def test_a_task_purged_then_submitted_again_is_live(store: TrackerStore) -> None:
    await store.apply([accepted("again"), started("again"), finished("again", 10)])
    now = at(2 * HOUR)
    await Retention(store, retention_s=HOUR, worker_retention_s=HOUR, clock=lambda: now).sweep()
    await store.apply([accepted("again")])
    async with api(store, HOUR, now) as http:
        answer = await http.get("/tasks/again")
        assert answer.status_code == 200 and answer.json()["status"] == "pending"
        assert (await http.get("/stats")).json()["total"] == 2


async def test_retention_loop_purges_with_a_tiny_retention(store: TrackerStore) -> None:
    await store.apply([TaskResult(id="quick", kind="echo", status="completed")])
    await store.apply([accepted("busy")])
    retention = Retention(store, retention_s=0.3, worker_retention_s=HOUR)
    stop = asyncio.Event()
    loop = asyncio.create_task(retention.run(stop))
    try:
        async with api(store, 0.3, datetime.now(UTC)) as http:

            async def purged() -> bool:
                return (await http.get("/stats")).json()["purged"] == 1

            await eventually(purged, 10, "the finished task purged")
            assert (await http.get("/tasks/quick")).status_code in (404, 410)
            assert (await http.get("/tasks/busy")).json()["status"] == "pending"
            assert (await http.get("/stats")).json()["total"] == 2
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


async def test_long_dead_workers_are_dropped_and_a_fenced_one_can_still_revive(
    store: TrackerStore,
) -> None:
    names = ("fenced", "gone", "unfenced", "stopped", "alive")
    await store.apply([heartbeat(w, 0) for w in names])
    await store.apply([WorkerStopped(worker="stopped", at=at(1))])
    for worker, death in (
        ("fenced", Death.FENCED),
        ("gone", Death.GONE),
        ("unfenced", Death.UNFENCED),
    ):
        await store.declare_dead(worker, at(10), death)
    now = at(2 * HOUR)
    await store.apply([heartbeat("alive", 2 * HOUR - 1)])

    async def listed(when: datetime) -> dict[str, Any]:
        async with api(store, HOUR, when) as http:
            return {w["id"]: w for w in (await http.get("/workers")).json()["workers"]}

    assert sorted(await listed(now)) == sorted(names)
    swept = await Retention(
        store, retention_s=0, worker_retention_s=HOUR, clock=lambda: now
    ).sweep()
    assert swept.workers == 3
    # The watchdog must still close an unfenced worker's connection: it stays.
    assert sorted(await listed(now)) == ["alive", "unfenced"]
    # A fenced worker heard from after its fence is watched again, registration or not.
    await store.apply([heartbeat("fenced", 2 * HOUR)])
    back = await listed(now)
    assert back["fenced"]["state"] == "alive" and back["fenced"]["death"] is None
    silent = await store.silent_workers(now + timedelta(seconds=60))
    assert "fenced" in {w.id for w in silent}
