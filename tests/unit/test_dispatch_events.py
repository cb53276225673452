"""How `tasks.accepted` events are cut: by count and by encoded size (pure logic)."""

from __future__ import annotations

from leveret.contracts import AcceptedTask, utcnow
from leveret.scheduler.dispatch import EVENT_MAX_BYTES, EVENT_MAX_TASKS, accepted_events


def accepted(i: int, parents: int = 0) -> AcceptedTask:
    return AcceptedTask(
        id=f"t{i}",
        kind="echo",
        pool="default",
        submitted_at=utcnow(),
        status="blocked" if parents else "pending",
        depends_on=[f"parent-{i}-{p:06d}" for p in range(parents)],
    )


def test_events_hold_at_most_500_tasks_in_order() -> None:
    events = list(accepted_events([accepted(i) for i in range(1201)]))
    assert [len(e.tasks) for e in events] == [EVENT_MAX_TASKS, EVENT_MAX_TASKS, 201]
    assert [t.id for e in events for t in e.tasks] == [f"t{i}" for i in range(1201)]


def test_tasks_with_many_parents_are_cut_by_size() -> None:
    tasks = [accepted(i, parents=100_000) for i in range(6)]  # about 2.3 MB each
    events = list(accepted_events(tasks))
    assert len(events) > 1
    assert all(len(e.model_dump_json().encode()) <= EVENT_MAX_BYTES for e in events)
    assert [t.id for e in events for t in e.tasks] == [f"t{i}" for i in range(6)]


def test_a_task_larger_than_the_cap_goes_alone() -> None:
    events = list(
        accepted_events([accepted(0), accepted(1, parents=50), accepted(2)], max_bytes=500)
    )
    assert [[t.id for t in e.tasks] for e in events] == [["t0"], ["t1"], ["t2"]]
