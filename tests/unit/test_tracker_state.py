"""The tracker's state machine: pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskError,
    TaskResult,
    TaskReturned,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    WorkerStopped,
)
from leveret.tracker.ledger import Ledger
from leveret.tracker.state import (
    AttemptOutcome,
    WorkerCounters,
    apply_accepted,
    apply_result,
    apply_returned,
    apply_started,
    counted,
    history_entry,
    rank,
)
from leveret.tracker.workers import (
    WorkerState,
    apply_heartbeat,
    apply_worker_started,
    apply_worker_stopped,
    worker_change,
    worker_state,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def accepted(task_id: str = "t1", corr: str | None = "c1") -> AcceptedTask:
    return AcceptedTask(
        id=task_id, kind="echo", pool="default", submitted_at=at(0), correlation_id=corr
    )


def started(task_id: str = "t1", attempt: int = 1, seconds: float = 1) -> StartedTask:
    return StartedTask(id=task_id, attempt=attempt, started_at=at(seconds))


def result(
    status: str = "completed",
    *,
    task_id: str = "t1",
    attempt: int = 1,
    worker: str | None = "w1",
    value: object = 42,
    finished: float = 3,
    started_s: float | None = 1,
) -> TaskResult:
    error = TaskError(type="boom", message="it broke") if status == "failed" else None
    return TaskResult.model_validate(
        {
            "id": task_id,
            "kind": "echo",
            "status": status,
            "result": value if status == "completed" else None,
            "error": error,
            "attempt": attempt,
            "worker": worker,
            "submitted_at": at(0),
            "started_at": at(started_s) if started_s is not None else None,
            "finished_at": at(finished),
        }
    )


def info(worker_id: str = "w1") -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, host="h", pid=7, pool="default", concurrency=4, kinds=["echo"], version="1"
    )


def test_status_rank_orders_pending_running_terminal() -> None:
    assert rank(TaskStatus.PENDING) < rank(TaskStatus.RUNNING) < rank(TaskStatus.COMPLETED)
    assert {rank(s) for s in TaskStatus if s.terminal} == {2}


def test_accepted_creates_pending_and_is_idempotent() -> None:
    record = apply_accepted(None, accepted())
    assert record.status is TaskStatus.PENDING
    assert (record.kind, record.pool, record.correlation_id) == ("echo", "default", "c1")
    assert apply_accepted(record, accepted()) is record


def test_started_before_accepted_creates_running_and_accepted_only_fills_in() -> None:
    record = apply_started(None, "w1", started())
    assert record.status is TaskStatus.RUNNING
    assert record.kind is None
    later = apply_accepted(record, accepted())
    assert later.status is TaskStatus.RUNNING  # never moves back to pending
    assert (later.kind, later.pool, later.submitted_at, later.correlation_id) == (
        "echo",
        "default",
        at(0),
        "c1",
    )
    assert later.worker == "w1"


def test_accepted_after_terminal_does_not_reopen() -> None:
    done = apply_result(None, result())
    assert done is not None
    assert apply_accepted(done, accepted()).status is TaskStatus.COMPLETED


def test_started_moves_pending_to_running_with_history() -> None:
    record = apply_started(apply_accepted(None, accepted()), "w1", started())
    assert (record.status, record.worker, record.attempt) == (TaskStatus.RUNNING, "w1", 1)
    assert record.started_at == at(1)
    assert [(a.attempt, a.worker, a.outcome) for a in record.attempts] == [(1, "w1", None)]
    assert apply_started(record, "w1", started()) is record


def test_started_is_fenced_by_attempt() -> None:
    second = apply_started(None, "w2", started(attempt=2, seconds=5))
    stale = apply_started(second, "w1", started(attempt=1, seconds=1))
    assert (stale.status, stale.worker, stale.attempt) == (TaskStatus.RUNNING, "w2", 2)
    assert stale.started_at == at(5)
    assert [a.attempt for a in stale.attempts] == [1, 2]  # the stale run is still history


def test_higher_attempt_takes_over() -> None:
    first = apply_started(None, "w1", started(attempt=1))
    second = apply_started(first, "w2", started(attempt=2, seconds=9))
    assert (second.worker, second.attempt, second.started_at) == ("w2", 2, at(9))


def test_started_never_reopens_a_terminal_task() -> None:
    done = apply_result(apply_started(None, "w1", started()), result())
    assert done is not None
    again = apply_started(done, "w2", started(attempt=2, seconds=10))
    assert again.status is TaskStatus.COMPLETED
    assert again.worker == "w1"
    assert [a.attempt for a in again.attempts] == [1, 2]


def test_result_overtaking_its_started_event_gets_started_at_filled() -> None:
    done = apply_result(None, result(started_s=None))
    assert done is not None and done.started_at is None
    filled = apply_started(done, "w1", started(seconds=1))
    assert filled.status is TaskStatus.COMPLETED
    assert filled.started_at == at(1)
    assert filled.attempts[0].outcome is AttemptOutcome.COMPLETED


def test_first_terminal_result_wins() -> None:
    running = apply_started(apply_accepted(None, accepted()), "w1", started())
    first = apply_result(running, result("failed", finished=3))
    assert first is not None
    later = apply_result(first, result("completed", attempt=2, worker="w2", finished=4))
    assert later is not None
    assert later.status is TaskStatus.FAILED
    assert (later.error_type, later.error_message) == ("boom", "it broke")
    assert (later.worker, later.attempt, later.finished_at, later.result) == ("w1", 1, at(3), None)
    # The second run still shows in the history, with its own outcome.
    assert [(a.attempt, a.outcome) for a in later.attempts] == [
        (1, AttemptOutcome.FAILED),
        (2, AttemptOutcome.COMPLETED),
    ]


def test_same_result_twice_changes_nothing() -> None:
    done = apply_result(apply_started(None, "w1", started()), result())
    assert done is not None
    assert apply_result(done, result()) is done


def test_result_for_unknown_task_creates_a_terminal_record() -> None:
    done = apply_result(None, result(value={"x": 1}))
    assert done is not None
    assert (done.status, done.result, done.kind, done.submitted_at) == (
        TaskStatus.COMPLETED,
        {"x": 1},
        "echo",
        at(0),
    )


def test_terminal_result_from_lower_attempt_still_wins_while_running() -> None:
    second = apply_started(None, "w2", started(attempt=2, seconds=5))
    done = apply_result(second, result(attempt=1, worker="w1", started_s=1))
    assert done is not None
    assert (done.status, done.worker, done.attempt, done.started_at) == (
        TaskStatus.COMPLETED,
        "w1",
        1,
        at(1),
    )


def test_rejected_creates_unknown_only() -> None:
    rejected = apply_result(None, result("rejected", worker=None))
    assert rejected is not None and rejected.status is TaskStatus.REJECTED
    pending = apply_accepted(None, accepted())
    assert apply_result(pending, result("rejected", worker=None)) is pending
    done = apply_result(None, result())
    assert apply_result(done, result("rejected", worker=None)) is done


def test_duplicate_is_ignored() -> None:
    assert apply_result(None, result("duplicate")) is None
    pending = apply_accepted(None, accepted())
    assert apply_result(pending, result("duplicate")) is pending


def test_cancelled_without_worker_is_terminal_and_uncounted() -> None:
    pending = apply_accepted(None, accepted())
    cancelled = apply_result(pending, result("cancelled", attempt=0, worker=None, started_s=None))
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
    assert cancelled.attempts == ()
    assert counted(pending, cancelled) is None


def test_counted_only_for_the_recorded_terminal() -> None:
    running = apply_started(None, "w1", started(seconds=1))
    done = apply_result(running, result(finished=3.5))
    assert done is not None
    assert counted(running, done) == ("w1", WorkerCounters(completed=1, failed=0, busy_s=2.5))
    later = apply_result(done, result("failed", attempt=2, worker="w2"))
    assert later is not None
    assert counted(done, later) is None


def returned(attempt: int = 1, worker: str = "w1", seconds: float = 5) -> TaskReturned:
    return TaskReturned(
        id="t1",
        attempt=attempt,
        worker=worker,
        reason="stopping: grace period over",
        started_at=at(1),
        at=at(seconds),
    )


def test_returned_attempt_ends_returned_and_the_task_is_pending_again() -> None:
    record = apply_started(apply_accepted(None, accepted()), "w1", started())
    back = apply_returned(record, returned())
    assert (back.status, back.worker, back.started_at, back.attempt) == (
        TaskStatus.PENDING,
        None,
        None,
        1,
    )
    assert [(a.attempt, a.worker, a.outcome, a.finished_at) for a in back.attempts] == [
        (1, "w1", AttemptOutcome.RETURNED, at(5))
    ]
    assert apply_returned(back, returned()) is back  # redelivered
    # Its late started event does not take the task back; the next attempt does.
    assert apply_started(back, "w1", started()).status is TaskStatus.PENDING
    again = apply_started(back, "w2", started(attempt=2, seconds=6))
    assert (again.status, again.worker, again.attempt) == (TaskStatus.RUNNING, "w2", 2)
    done = apply_result(again, result(attempt=2, worker="w2"))
    assert done is not None
    assert [a.outcome for a in done.attempts] == [AttemptOutcome.RETURNED, AttemptOutcome.COMPLETED]


def test_returned_for_an_old_attempt_or_a_finished_task_only_joins_the_history() -> None:
    second = apply_started(apply_started(None, "w1", started()), "w2", started(attempt=2))
    late = apply_returned(second, returned(attempt=1))
    assert (late.status, late.worker, late.attempt) == (TaskStatus.RUNNING, "w2", 2)
    entry = history_entry(late.attempts, 1)
    assert entry is not None and entry.outcome is AttemptOutcome.RETURNED
    done = apply_result(apply_started(None, "w1", started()), result())
    assert done is not None
    assert apply_returned(done, returned(attempt=1)).status is TaskStatus.COMPLETED
    unknown = apply_returned(None, returned(attempt=3))
    assert (unknown.status, unknown.attempt) == (TaskStatus.PENDING, 3)
    assert [a.outcome for a in unknown.attempts] == [AttemptOutcome.RETURNED]


def test_ledger_applies_a_returned_event() -> None:
    ledger = Ledger({}, {}, heartbeat_timeout_s=5)
    ledger.apply(TasksStarted(worker="w1", tasks=[started()]))
    changes = ledger.apply(returned())
    assert [(c.task_id, c.before, c.after) for c in changes] == [
        ("t1", TaskStatus.RUNNING, TaskStatus.PENDING)
    ]
    assert ledger.counters == {}  # a hand-back is no result


def test_ledger_counts_each_task_once_and_reports_changes() -> None:
    ledger = Ledger({}, {}, heartbeat_timeout_s=5)
    changes = ledger.apply(TasksAccepted(tasks=[accepted("a"), accepted("b")]))
    assert [(c.task_id, c.before, c.after) for c in changes] == [
        ("a", None, TaskStatus.PENDING),
        ("b", None, TaskStatus.PENDING),
    ]
    ledger.apply(TasksStarted(worker="w1", tasks=[started("a"), started("b")]))
    ledger.apply(result(task_id="a"))
    ledger.apply(result("failed", task_id="b"))
    ledger.apply(result(task_id="a"))  # redelivered
    ledger.apply(result(task_id="b", attempt=2, worker="w2"))  # ran twice
    assert ledger.counters == {"w1": WorkerCounters(completed=1, failed=1, busy_s=4.0)}
    assert {now.id: (old, now.status) for old, now in ledger.changed_tasks()} == {
        "a": (None, TaskStatus.COMPLETED),
        "b": (None, TaskStatus.FAILED),
    }


def test_ledger_only_reports_tasks_that_changed() -> None:
    pending = apply_accepted(None, accepted())
    ledger = Ledger({"t1": pending}, {}, heartbeat_timeout_s=5)
    assert ledger.apply(TasksAccepted(tasks=[accepted()])) == []
    assert list(ledger.changed_tasks()) == []


@pytest.mark.parametrize(
    ("age_s", "state"),
    [
        (0, WorkerState.ALIVE),
        (5, WorkerState.ALIVE),
        (5.1, WorkerState.SUSPECT),
        (10, WorkerState.SUSPECT),
        (10.1, WorkerState.DEAD),
    ],
)
def test_worker_state_by_heartbeat_age(age_s: float, state: WorkerState) -> None:
    record = apply_heartbeat(None, WorkerHeartbeat(worker=info(), at=at(0)))
    assert worker_state(record, at(age_s), timeout_s=5) is state


def test_stopped_worker_is_stopped_and_old_heartbeat_does_not_revive_it() -> None:
    record = apply_worker_started(None, WorkerStarted(worker=info(), at=at(0)))
    stopped = apply_worker_stopped(record, WorkerStopped(worker="w1", at=at(2)))
    assert stopped is not None
    assert worker_state(stopped, at(100), timeout_s=5) is WorkerState.STOPPED
    late = apply_heartbeat(stopped, WorkerHeartbeat(worker=info(), in_flight=["x"], at=at(1)))
    assert worker_state(late, at(2), timeout_s=5) is WorkerState.STOPPED
    assert late.in_flight == ()


def test_stopped_for_unknown_worker_is_ignored() -> None:
    assert apply_worker_stopped(None, WorkerStopped(worker="ghost", at=at(0))) is None


def test_heartbeat_updates_last_seen_and_in_flight_only_when_newer() -> None:
    first = apply_heartbeat(None, WorkerHeartbeat(worker=info(), in_flight=["a"], at=at(5)))
    older = apply_heartbeat(first, WorkerHeartbeat(worker=info(), in_flight=["b"], at=at(4)))
    assert older is first
    newer = apply_heartbeat(first, WorkerHeartbeat(worker=info(), in_flight=["c"], at=at(6)))
    assert (newer.last_seen, newer.in_flight, newer.started_at) == (at(6), ("c",), at(5))


def test_repeated_announcement_keeps_first_start() -> None:
    record = apply_worker_started(None, WorkerStarted(worker=info(), at=at(0)))
    again = apply_worker_started(record, WorkerStarted(worker=info(), at=at(30)))
    assert (again.started_at, again.last_seen) == (at(0), at(30))


def test_worker_change_notes() -> None:
    first = apply_heartbeat(None, WorkerHeartbeat(worker=info(), at=at(0)))
    assert worker_change(None, first, 5) == "registered"
    steady = apply_heartbeat(first, WorkerHeartbeat(worker=info(), at=at(1)))
    assert worker_change(first, steady, 5) is None
    back = apply_heartbeat(first, WorkerHeartbeat(worker=info(), at=at(30)))
    assert worker_change(first, back, 5) == "alive again (was dead)"
    stopped = apply_worker_stopped(first, WorkerStopped(worker="w1", at=at(1)))
    assert stopped is not None
    assert worker_change(first, stopped, 5) == "stopped"
