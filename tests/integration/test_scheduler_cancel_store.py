"""The scheduler store's side of cancelling a held task, on SQLite and PostgreSQL (no
broker needed): only a `delayed` or `blocked` row is ended, its outcome is what later
requests see, a released one is left to the workers, and a failed publish puts it back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from leveret.contracts import TaskMessage, TaskStatus
from leveret.scheduler.holds import ParentOutcome
from leveret.scheduler.store import (
    BLOCKED,
    CLAIMED,
    DELAYED,
    Ending,
    Submission,
    SubmissionStore,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def sub(
    task_id: str, *, run_at: datetime | None = None, depends_on: tuple[str, ...] = ()
) -> Submission:
    return Submission(TaskMessage(id=task_id, kind="echo", submitted_at=T0), depends_on, run_at)


def cancelled(task_id: str) -> Ending:
    return Ending(task_id, TaskStatus.CANCELLED, "cancelled", "not wanted")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SubmissionStore]:
    opened = await SubmissionStore.open(database_url)
    yield opened
    await opened.close()


async def test_only_a_held_task_is_ended(store: SubmissionStore) -> None:
    later = T0 + timedelta(hours=48)  # beyond the cancellations stream's retention
    await store.claim(
        [
            (sub("parent"), CLAIMED),
            (sub("late", run_at=later), DELAYED),
            (sub("child", depends_on=("parent",)), BLOCKED),
        ]
    )
    await store.mark_dispatched(["parent"])
    for task_id, state in (("late", DELAYED), ("child", BLOCKED)):
        held = await store.end_held(cancelled(task_id))
        assert held is not None and (held[0].id, held[1]) == (task_id, state)
    # A dispatched task is the workers' business; an unknown id is nobody's.
    assert await store.end_held(cancelled("parent")) is None
    assert await store.end_held(cancelled("never")) is None
    # Ended once: a second request finds it no longer held, and sees its outcome.
    assert await store.end_held(cancelled("late")) is None
    outcomes = await store.lookup(["late", "child", "parent"])
    assert outcomes["late"] == ParentOutcome(TaskStatus.CANCELLED, "cancelled")
    assert outcomes["child"] == ParentOutcome(TaskStatus.CANCELLED, "cancelled")
    assert outcomes["parent"] == ParentOutcome(None)
    # Neither the releaser nor the resolver takes them any more; a crash before their
    # results went out leaves them to be published again at the next start.
    assert await store.take_due(later + timedelta(seconds=1), 10) == []
    assert await store.blocked(["child"]) == []
    assert sorted(s.id for s, _ in await store.failing()) == ["child", "late"]


async def test_a_failed_publish_puts_the_task_back_on_hold(store: SubmissionStore) -> None:
    due = T0 + timedelta(seconds=30)
    await store.claim([(sub("late", run_at=due), DELAYED)])
    held = await store.end_held(cancelled("late"))
    assert held is not None
    await store.hold_again("late", held[1])
    assert await store.lookup(["late"]) == {"late": ParentOutcome(None)}
    assert await store.failing() == []
    assert [s.id for s in await store.take_due(due, 10)] == ["late"]  # held, as before
