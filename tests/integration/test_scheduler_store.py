"""The scheduler's store on SQLite and on PostgreSQL (no broker needed): accepted ids
(idempotency), the intake keys of AMQP submissions without an id (a redelivery
finds its first task), the tasks it holds (delayed until due, blocked until their
parents end), the kinds it knows, an old database brought up to date, and two replicas
sharing PostgreSQL never taking the same row twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from helpers import report
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, inspect

from leveret.contracts import TaskMessage, TaskStatus
from leveret.db import create_engine
from leveret.scheduler.holds import ParentOutcome
from leveret.scheduler.store import (
    BLOCKED,
    CLAIMED,
    DELAYED,
    DISPATCHED,
    ENDED,
    Ending,
    Submission,
    SubmissionStore,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
KATHMANDU = timezone(timedelta(hours=5, minutes=45))
PACIFIC = timezone(timedelta(hours=-8))
#: Scheduler replicas share PostgreSQL; SQLite serves one scheduler per file.
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sub(
    task_id: str,
    *,
    run_at: datetime | None = None,
    depends_on: tuple[str, ...] = (),
    payload: object = None,
    intake_key: str | None = None,
) -> Submission:
    message = TaskMessage(
        id=task_id, kind="echo", payload=payload, submitted_at=at(0), priority=7, requires=["gpu"]
    )
    return Submission(message, depends_on, run_at, intake_key)


def is_utc(moment: datetime | None, expected: datetime) -> bool:
    """True when `moment` is `expected`, timezone-aware and expressed in UTC."""
    return moment == expected and moment is not None and moment.utcoffset() == timedelta(0)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SubmissionStore]:
    opened = await SubmissionStore.open(database_url)
    yield opened
    await opened.close()


async def test_an_id_is_accepted_once(store: SubmissionStore) -> None:
    first = sub("t1", payload={"n": [1, 2]})
    assert await store.claim([(first, CLAIMED), (sub("t2"), CLAIMED)]) == {}
    assert [s.id for s in await store.undispatched()] == ["t1", "t2"]
    await store.mark_dispatched(["t1"])
    again = await store.claim([(sub("t1", payload="other"), CLAIMED), (sub("t3"), CLAIMED)])
    assert set(again) == {"t1"}
    assert (again["t1"].state, again["t1"].submission) == (DISPATCHED, first)  # the first copy
    # A claimed row left by a crash is dispatched again at the next start; dispatched ones not.
    assert [s.id for s in await store.undispatched()] == ["t2", "t3"]
    await store.mark_dispatched(["t2", "t3"])
    assert await store.undispatched() == []
    assert await store.lookup(["t1", "never"]) == {"t1": ParentOutcome(None)}


K1, K2 = "1" * 64, "2" * 64  # intake keys (SHA-256, hex)


async def test_an_id_less_submission_is_found_by_its_intake_key_until_acked(
    store: SubmissionStore,
) -> None:
    """A redelivered submission without an id finds the task(s) its key was written with,
    oldest first, until their acks are recorded; a row with an id has no key."""
    await store.claim([(sub("a", intake_key=K1), CLAIMED), (sub("with-id"), CLAIMED)])
    await store.claim([(sub("b", intake_key=K1), DELAYED), (sub("c", intake_key=K2), BLOCKED)])
    assert await store.unacked_intake(K1) == ["a", "b"]
    assert await store.unacked_intake(K2) == ["c"]
    assert await store.unacked_intake("0" * 64) == []
    # Claimed again (the redelivery, under the id it found): the first row stays as it was.
    again = await store.claim([(sub("a", intake_key=K2, payload="other"), CLAIMED)])
    assert again["a"].submission == sub("a")  # the key is not part of the submission
    assert await store.unacked_intake(K2) == ["c"]
    await store.forget_intake(["a", "with-id", "never"])
    await store.forget_intake([])
    assert await store.unacked_intake(K1) == ["b"]
    assert sorted(s.id for s in await store.undispatched()) == ["a", "with-id"]  # nothing moved
    ids = [f"k{i:04d}" for i in range(1200)]  # past the parameter chunks
    await store.claim([(sub(i, intake_key=K2), CLAIMED) for i in ids])
    assert len(await store.unacked_intake(K2, limit=2000)) == 1201
    await store.forget_intake([*ids, "c"])
    assert await store.unacked_intake(K2) == []


async def test_a_delayed_task_is_taken_once_when_due(store: SubmissionStore) -> None:
    # Due times in several offsets; the store orders and compares instants.
    held = [
        sub("late", run_at=at(30).astimezone(KATHMANDU)),
        sub("soon", run_at=at(10).astimezone(PACIFIC)),
        sub("sooner", run_at=at(5)),
    ]
    await store.claim([(s, DELAYED) for s in held])
    next_due = await store.next_due()
    assert is_utc(next_due, at(5))
    assert await store.take_due(at(4).astimezone(KATHMANDU), 10) == []
    due = sorted(await store.take_due(at(40).astimezone(PACIFIC), 2), key=lambda s: s.id)
    assert [s.id for s in due] == ["soon", "sooner"]  # the earliest two of the three due
    assert is_utc(due[0].run_at, at(10))
    assert due[0].message == held[1].message
    assert await store.take_due(at(20), 10) == []  # taken once
    assert sorted(s.id for s in await store.undispatched()) == ["soon", "sooner"]  # releasing
    await store.mark_dispatched(s.id for s in due)
    assert is_utc(await store.next_due(), at(30))
    assert [s.id for s in await store.take_due(at(31), 1)] == ["late"]
    assert await store.next_due() is None


async def test_a_blocked_task_waits_for_every_parent(store: SubmissionStore) -> None:
    await store.claim([(sub("p1"), CLAIMED), (sub("p2"), CLAIMED)])
    await store.mark_dispatched(["p1", "p2"])
    child = sub("child", depends_on=("p1", "p2"))
    later = sub("later", depends_on=("p1",), run_at=at(3600))
    await store.claim([(child, BLOCKED), (later, BLOCKED)])
    assert await store.undispatched() == []  # held, not lost
    assert await store.resolvable() == []

    waiting = await store.record_outcomes([("p1", "completed", None)])
    assert waiting == ["child", "later"]
    (blocked_child,) = await store.blocked(["child"])
    assert blocked_child.submission == child
    assert blocked_child.parents == {
        "p1": ParentOutcome(TaskStatus.COMPLETED),
        "p2": ParentOutcome(None),
    }
    # The first outcome recorded wins; a later one for the same id is ignored.
    await store.record_outcomes([("p1", "failed", "boom")])
    assert (await store.lookup(["p1"]))["p1"] == ParentOutcome(TaskStatus.COMPLETED)
    assert sorted(await store.resolvable()) == ["child", "later"]

    now, held = await store.release(["later"], at(0))
    assert (now, [s.id for s in held]) == ([], ["later"])  # not due yet: delayed instead
    assert is_utc(await store.next_due(), at(3600))
    assert await store.release(["later"], at(0)) == ([], [])  # no longer blocked

    await store.record_outcomes([("p2", "cancelled", None)])
    ending = Ending("child", TaskStatus.CANCELLED, "dependency_cancelled", "p2 was cancelled")
    assert [s.id for s in await store.end([ending])] == ["child"]
    assert await store.end([ending]) == []  # taken once
    ((failing, recorded),) = await store.failing()
    assert (failing, recorded) == (child, ending)
    await store.mark(["child"], ENDED)
    assert await store.failing() == []
    assert await store.waiting_children(["p1", "p2"]) == []


async def test_released_tasks_go_out_once(store: SubmissionStore) -> None:
    await store.claim([(sub("parent"), CLAIMED)])
    await store.claim([(sub(f"c{i}", depends_on=("parent",)), BLOCKED) for i in range(3)])
    assert await store.record_outcomes([("parent", "completed", None)]) == ["c0", "c1", "c2"]
    now, later = await store.release(["c0", "c1", "c2"], at(0))
    assert ([s.id for s in now], later) == (["c0", "c1", "c2"], [])
    assert await store.release(["c0", "c1", "c2"], at(0)) == ([], [])
    assert sorted(s.id for s in await store.undispatched()) == ["c0", "c1", "c2", "parent"]


async def test_known_kinds_are_remembered(store: SubmissionStore) -> None:
    assert await store.known_kinds() == set()
    await store.add_kinds(["resize", "echo"], at(0))
    await store.add_kinds(["echo", "checksum"])  # announced again by another worker
    await store.add_kinds([])
    assert await store.known_kinds() == {"resize", "echo", "checksum"}


async def test_a_big_batch_crosses_parameter_chunks(store: SubmissionStore) -> None:
    ids = [f"bulk-{i:04d}" for i in range(1200)]
    assert await store.claim([(sub(i), CLAIMED) for i in ids]) == {}
    assert set(await store.claim([(sub(i), CLAIMED) for i in ids])) == set(ids)
    await store.mark_dispatched(ids)
    assert await store.undispatched() == []
    assert len(await store.lookup(ids)) == 1200


def first_version_schema() -> MetaData:
    """The scheduler's tables as its first release made them (accepted ids and kinds)."""
    old = MetaData()
    Table(
        "submissions",
        old,
        Column("id", String(200), primary_key=True),
        Column("state", String(16), nullable=False, index=True),
        Column("envelope", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "kinds",
        old,
        Column("name", String(128), primary_key=True),
        Column("first_seen", DateTime(timezone=True), nullable=False),
    )
    return old


async def test_a_first_version_database_is_brought_up_to_date(database_url: str) -> None:
    old = first_version_schema()
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        rows = [
            {"id": i, "state": state, "envelope": sub(i).message.model_dump_json()}
            for i, state in (("old-claimed", CLAIMED), ("old-sent", DISPATCHED))
        ]
        await conn.execute(
            old.tables["submissions"].insert(), [r | {"created_at": T0} for r in rows]
        )
        await conn.execute(old.tables["kinds"].insert(), {"name": "resize", "first_seen": T0})
    await engine.dispose()

    store = await SubmissionStore.open(database_url)
    await store.close()
    store = await SubmissionStore.open(database_url)  # again: nothing to do
    try:
        assert [s.id for s in await store.undispatched()] == ["old-claimed"]
        assert set(await store.claim([(sub("old-sent"), CLAIMED)])) == {"old-sent"}
        assert await store.known_kinds() == {"resize"}
        # What the added columns and the edges table hold: due times, parents, outcomes.
        await store.claim([(sub("new-delayed", run_at=at(5)), DELAYED)])
        await store.claim([(sub("new-child", depends_on=("old-sent",)), BLOCKED)])
        assert is_utc(await store.next_due(), at(5))
        assert await store.record_outcomes([("old-sent", "completed", None)]) == ["new-child"]
        (blocked,) = await store.blocked(["new-child"])
        assert blocked.parents == {"old-sent": ParentOutcome(TaskStatus.COMPLETED)}
        async with store.engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("submissions")}
            )
        assert {"ix_submissions_state_run_at", "ix_submissions_intake_key"} <= indexes
        # An old row has no intake key; a new one keeps the one it was written with.
        await store.claim([(sub("new-keyed", intake_key=K1), CLAIMED)])
        assert await store.unacked_intake(K1) == ["new-keyed"]
    finally:
        await store.close()


@ON_POSTGRESQL
async def test_replicas_take_each_due_task_once(database_url: str) -> None:
    first = await SubmissionStore.open(database_url)
    second = await SubmissionStore.open(database_url)
    ids = [f"d{i:03d}" for i in range(300)]
    try:
        await first.claim([(sub(i, run_at=at(n % 7)), DELAYED) for n, i in enumerate(ids)])

        async def releaser(store: SubmissionStore) -> list[str]:
            taken: list[str] = []
            while True:
                due = await store.take_due(at(10), 7)
                taken += [s.id for s in due]
                # Empty when the other replica took the rows first: stop once none is held.
                if not due and await store.next_due() is None:
                    return taken

        a, b = await asyncio.gather(releaser(first), releaser(second))
        assert sorted(a + b) == ids  # every due task taken, none by both
        report(f"scheduler store, two releasers on PostgreSQL: took {len(a)} and {len(b)}")
    finally:
        await first.close()
        await second.close()


@ON_POSTGRESQL
async def test_replicas_claiming_the_same_ids_at_once_accept_each_once(database_url: str) -> None:
    first = await SubmissionStore.open(database_url)
    second = await SubmissionStore.open(database_url)
    ids = [f"s{i:03d}" for i in range(300)]
    batches = [ids[i : i + 10] for i in range(0, len(ids), 10)]
    try:

        async def replica(store: SubmissionStore) -> set[str]:
            accepted: set[str] = set()
            for batch in batches:
                existing = await store.claim([(sub(i), CLAIMED) for i in batch])
                accepted |= set(batch) - set(existing)
            return accepted

        a, b = await asyncio.gather(replica(first), replica(second))
        assert not a & b, f"{len(a & b)} ids accepted by both replicas"
        assert a | b == set(ids)
        report(f"scheduler store, two replicas claiming on PostgreSQL: {len(a)} and {len(b)}")
    finally:
        await first.close()
        await second.close()
