"""The tracker's view of held tasks: blocked/delayed announcements and their release."""

from __future__ import annotations

from datetime import UTC, datetime

from leveret.contracts import AcceptedTask, StartedTask, TaskStatus
from leveret.tracker.state import apply_accepted, apply_started, rank

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN_AT = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


def accepted(status: str, **extra: object) -> AcceptedTask:
    return AcceptedTask.model_validate(
        {
            "id": "t",
            "kind": "echo",
            "pool": "default",
            "submitted_at": T0,
            "status": status,
            **extra,
        }
    )


def test_held_statuses_share_rank_zero() -> None:
    assert rank(TaskStatus.BLOCKED) == rank(TaskStatus.DELAYED) == rank(TaskStatus.PENDING) == 0


def test_a_held_task_is_released_by_a_later_pending_announcement() -> None:
    blocked = apply_accepted(None, accepted("blocked", depends_on=["p"], run_at=RUN_AT))
    assert (blocked.status, blocked.depends_on, blocked.run_at) == (
        TaskStatus.BLOCKED,
        ("p",),
        RUN_AT,
    )
    delayed = apply_accepted(blocked, accepted("delayed", run_at=RUN_AT))
    assert delayed.status is TaskStatus.DELAYED
    released = apply_accepted(delayed, accepted("pending"))
    assert released.status is TaskStatus.PENDING
    assert released.depends_on == ("p",) and released.run_at == RUN_AT
    # A late (redelivered) hold announcement never takes the task back.
    assert apply_accepted(released, accepted("blocked")) is released
    assert apply_accepted(released, accepted("delayed")) is released


def test_running_and_terminal_tasks_never_move_back_to_held() -> None:
    running = apply_started(None, "w1", StartedTask(id="t", attempt=1, started_at=T0))
    after = apply_accepted(running, accepted("delayed", run_at=RUN_AT))
    assert after.status is TaskStatus.RUNNING and after.run_at == RUN_AT
    assert apply_accepted(after, accepted("pending")).status is TaskStatus.RUNNING
