"""How outcomes reach the scheduler: the tracker's `tasks.ended` (what it committed, first
result wins) and the scheduler's reading of it. Pure parts, no broker."""

from __future__ import annotations

import pytest

from leveret.contracts import (
    EndedTask,
    SchedulerStarted,
    TaskError,
    TaskResult,
    TasksEnded,
)
from leveret.scheduler.outcomes import _outcomes
from leveret.tracker.ledger import Ledger


def result(task_id: str, status: str, error: str | None = None) -> TaskResult:
    err = TaskError(type=error, message="m") if error else None
    return TaskResult(id=task_id, kind="echo", status=status, error=err, attempt=1, worker="w")


def test_the_tracker_tells_the_recorded_outcome_once_per_task() -> None:
    ledger = Ledger({}, {}, 5.0)
    batch = [
        result("a", "completed"),
        result("a", "failed", "late"),  # ran twice: the first result is the one recorded
        result("b", "failed", "boom"),
        result("r", "rejected", "invalid_task"),  # never ran: no dependant can wait for it
    ]
    for message in batch:
        ledger.apply(message)
    assert ledger.ended(batch) == [
        EndedTask(id="a", status="completed"),
        EndedTask(id="b", status="failed", error_type="boom"),
    ]


def test_a_redelivered_result_is_told_again() -> None:
    ledger = Ledger({}, {}, 5.0)
    ledger.apply(result("a", "completed"))
    again = Ledger(dict(ledger.tasks), {}, 5.0)
    again.apply(result("a", "completed"))  # changes nothing ...
    assert again.ended([result("a", "completed")]) == [EndedTask(id="a", status="completed")]


def test_the_scheduler_reads_tasks_ended_and_plain_results() -> None:
    event = TasksEnded(
        tasks=[EndedTask(id="a", status="completed"), EndedTask(id="b", status="cancelled")]
    )
    assert _outcomes(event.model_dump_json().encode()) == (
        "tasks.ended",
        [("a", "completed", None), ("b", "cancelled", None)],
    )
    legacy = result("c", "failed", "boom").model_dump_json().encode()
    assert _outcomes(legacy) == ("result", [("c", "failed", "boom")])
    assert _outcomes(result("d", "rejected", "x").model_dump_json().encode()) == ("result", [])


@pytest.mark.parametrize("body", [b"{oops", b"[]", SchedulerStarted().model_dump_json().encode()])
def test_anything_else_on_the_outcomes_queue_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        _outcomes(body)
