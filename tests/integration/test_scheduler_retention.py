"""Retention in the scheduler's store, on SQLite and on PostgreSQL: rows of tasks that
ended before the cutoff are purged in batches; held tasks, parents whose dependants
are not yet released and rows whose intake key is still set stay; a purged id is new
again. Then the scheduler itself with a one-second retention, over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from helpers import eventually
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, func, select

from leveret.cli.procs import Cluster
from leveret.contracts import TaskMessage, TaskStatus, utcnow
from leveret.db import create_engine
from leveret.scheduler.holds import End, ParentOutcome, decide
from leveret.scheduler.retention import Purger
from leveret.scheduler.store import (
    BLOCKED,
    CLAIMED,
    DELAYED,
    DISPATCHED,
    ENDED,
    Ending,
    PurgeCursor,
    Submission,
    SubmissionStore,
)
from leveret.scheduler.tables import edges

LATER = datetime(2099, 1, 1, tzinfo=UTC)


def sub(task_id: str, *, depends_on: tuple[str, ...] = (), key: str | None = None) -> Submission:
    message = TaskMessage(id=task_id, kind="echo", submitted_at=utcnow())
    run_at = LATER if task_id.startswith("delayed") else None
    return Submission(message, depends_on, run_at, key)


async def finish(store: SubmissionStore, ids: list[str], state: str = CLAIMED) -> None:
    """Claim, dispatch and record these tasks' outcomes, as the scheduler does."""
    await store.claim([(sub(i), state) for i in ids])
    await store.mark_dispatched(ids)
    await store.record_outcomes([(i, "completed", None) for i in ids])


async def purge_all(store: SubmissionStore, cutoff: datetime, batch: int = 500) -> list[int]:
    """Purge as the purger does, batch after batch; return how many each deleted."""
    counts: list[int] = []
    after: PurgeCursor | None = None
    while True:
        deleted, after = await store.purge(cutoff, batch, after)
        counts.append(deleted)
        if after is None:
            return counts


async def known(store: SubmissionStore, ids: list[str]) -> set[str]:
    return set(await store.lookup(ids))


async def edge_count(store: SubmissionStore) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(edges)) or 0)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SubmissionStore]:
    opened = await SubmissionStore.open(database_url)
    yield opened
    await opened.close()


async def test_ended_tasks_are_purged_in_batches_and_what_is_needed_stays(
    store: SubmissionStore,
) -> None:
    old = [f"old-{i:04d}" for i in range(1100)]
    await finish(store, [*old, "parent"])
    await store.claim([(sub("running"), CLAIMED)])  # dispatched, never heard of again
    await store.mark_dispatched(["running"])
    await store.claim([(sub("delayed"), DELAYED), (sub("child", depends_on=("parent",)), BLOCKED)])
    await store.claim([(sub("keyed", key="1" * 64), CLAIMED)])  # id-less, its ack not recorded
    await store.mark_dispatched(["keyed"])
    await store.record_outcomes([("keyed", "failed", "boom")])
    cutoff = utcnow()
    await finish(store, ["recent"])  # inside the retention window

    assert await purge_all(store, cutoff) == [500, 500, 100]  # parent and keyed stay
    assert await known(store, old) == set()
    kept = ["running", "delayed", "child", "parent", "keyed", "recent"]
    assert await known(store, kept) == set(kept)
    # Inside the window an id is still a duplicate; a purged one is a new task.
    assert set(await store.claim([(sub("recent"), CLAIMED), (sub("old-0000"), CLAIMED)])) == {
        "recent"
    }

    # The child released and dispatched, the key forgotten: nothing needs them any more.
    assert await store.record_outcomes([]) == []
    now_, later = await store.release(["child"], utcnow())
    assert ([s.id for s in now_], later) == (["child"], [])
    await store.mark_dispatched(["child"])
    await store.forget_intake(["keyed"])
    assert await purge_all(store, cutoff) == [2]
    assert await known(store, kept) == {"running", "delayed", "child", "recent"}
    assert await edge_count(store) == 0


async def test_a_dependant_purged_with_its_edges_and_ended_ones_too(store: SubmissionStore) -> None:
    """A child that ended without running (its parent failed) is settled: both go."""
    await store.claim([(sub("p"), CLAIMED), (sub("c", depends_on=("p",)), BLOCKED)])
    await store.mark_dispatched(["p"])
    assert await store.record_outcomes([("p", "failed", "boom")]) == ["c"]
    assert await purge_all(store, utcnow()) == [0]  # c still blocked: p stays
    (blocked,) = await store.blocked(["c"])
    decision = decide(blocked.parents)
    assert isinstance(decision, End)
    await store.end([Ending("c", decision.status, decision.error_type, decision.message)])
    assert await purge_all(store, utcnow()) == [0]  # c failing: its ending not yet published
    await store.mark(["c"], ENDED)
    assert await purge_all(store, utcnow()) == [2]
    assert await edge_count(store) == 0


async def test_a_parent_purged_under_a_new_dependant_ends_it_expired(
    store: SubmissionStore,
) -> None:
    """Admission found the parent, the purge took it before the child's claim: the child
    is not left blocked forever."""
    await store.claim([(sub("orphan", depends_on=("purged-parent",)), BLOCKED)])
    assert await store.resolvable() == ["orphan"]  # the start-up re-check finds it too
    (blocked,) = await store.blocked(["orphan"])
    assert blocked.parents == {"purged-parent": ParentOutcome(None, gone=True)}
    decision = decide(blocked.parents)
    assert isinstance(decision, End)
    assert (decision.status, decision.error_type) == (TaskStatus.FAILED, "dependency_expired")
    assert "purged-parent" in decision.message and "LEVERET_RETENTION" in decision.message


async def test_the_purger_runs_until_the_store_holds_only_the_window(
    store: SubmissionStore,
) -> None:
    await store.claim([(sub("keyed", key="1" * 64), CLAIMED)])  # ended first, but kept
    await store.mark_dispatched(["keyed"])
    await store.record_outcomes([("keyed", "completed", None)])
    ids = [f"t{i}" for i in range(7)]
    await finish(store, ids)
    purger = Purger(store, 0.2, batch=3)
    runner = asyncio.create_task(purger.run())
    try:

        async def emptied() -> bool:
            return not await known(store, ids)

        await eventually(emptied, 10, "the purger to purge every ended task")
    finally:
        runner.cancel()
    assert purger.purged == 7
    assert await known(store, ["keyed"]) == {"keyed"}


async def test_tasks_that_ended_before_the_upgrade_are_purged_too(database_url: str) -> None:
    """A database from before `ended_at`: its ended tasks age from their submission."""
    old = MetaData()
    Table(
        "submissions",
        old,
        Column("id", String(200), primary_key=True),
        Column("state", String(16), nullable=False),
        Column("envelope", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("outcome", String(16)),
    )
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        rows = [("ended", "completed"), ("running", None)]
        await conn.execute(
            old.tables["submissions"].insert(),
            [
                {
                    "id": i,
                    "state": DISPATCHED,
                    "envelope": sub(i).message.model_dump_json(),
                    "created_at": utcnow() - timedelta(days=30),
                    "outcome": outcome,
                }
                for i, outcome in rows
            ],
        )
    await engine.dispose()
    store = await SubmissionStore.open(database_url)
    try:
        assert await purge_all(store, utcnow() - timedelta(days=7)) == [1]
        assert await known(store, ["ended", "running"]) == {"running"}
    finally:
        await store.close()


@pytest.mark.broker
async def test_the_scheduler_forgets_an_ended_task_after_the_retention(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_RETENTION"] = "1s"
    scheduler = cluster.start_scheduler()
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        task = {"id": "p1", "kind": "echo", "delay_s": 3600}
        assert (await http.post("/tasks", json=task)).json()["status"] == "delayed"
        assert (await http.post("/tasks", json=task)).json()["status"] == "duplicate"
        assert (await http.delete("/tasks/p1")).status_code == 202  # ended while held
        assert (await http.delete("/tasks/p1")).status_code == 409  # known: finished

        async def forgotten() -> bool:
            return (await http.delete("/tasks/p1")).status_code == 404

        await eventually(forgotten, 15, "the scheduler to purge p1")
        child = await http.post("/tasks", json={"kind": "echo", "depends_on": ["p1"]})
        assert child.status_code == 422, child.text
        assert child.json()["detail"]["error"] == "unknown_dependency"
        again = await http.post("/tasks", json={"id": "p1", "kind": "echo"})
        assert (again.status_code, again.json()["status"]) == (202, "pending")  # a new task
    assert "purged 1 task(s)" in scheduler.log()


async def test_a_row_ended_long_ago_goes_though_its_intake_key_was_left_set(
    store: SubmissionStore,
) -> None:
    await store.claim([(sub(i, key="2" * 64), CLAIMED) for i in ("stale", "admitting")])
    await store.mark_dispatched(["stale"])
    await store.record_outcomes([("stale", "completed", None)])  # its key never forgotten
    later = utcnow() + timedelta(hours=2)
    assert await Purger(store, 60, clock=lambda: later).purge() == 1
    assert await known(store, ["stale", "admitting"]) == {"admitting"}
    await store.claim([(sub("left", key="2" * 64), CLAIMED)])
    assert await store.clear_stale_intake(later, keep=["admitting"]) == 1
    assert await store.unacked_intake("2" * 64) == ["admitting"]
