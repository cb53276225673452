"""Fault handling in the tracker's pure state: fencing by attempt, retrying, worker deaths
and the watchdog's decision (records + now in, verdicts out; no I/O)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from leveret.contracts import (
    StartedTask,
    TaskError,
    TaskResult,
    TaskRetrying,
    TaskReturned,
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
    TaskRecord,
    apply_result,
    apply_retrying,
    apply_returned,
    apply_started,
    fence_task,
    is_fenced,
    rank,
)
from leveret.tracker.workers import (
    Death,
    WorkerRecord,
    WorkerState,
    apply_heartbeat,
    apply_worker_started,
    apply_worker_stopped,
    declare_dead,
    overdue,
    worker_state,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def started(attempt: int = 1, seconds: float = 1, task_id: str = "t1") -> StartedTask:
    return StartedTask(id=task_id, attempt=attempt, started_at=at(seconds))


def result(attempt: int = 1, worker: str | None = "w1", status: str = "completed") -> TaskResult:
    return TaskResult.model_validate(
        {
            "id": "t1",
            "kind": "echo",
            "status": status,
            "result": f"from attempt {attempt}",
            "error": {"type": "boom", "message": "no"} if status == "failed" else None,
            "attempt": attempt,
            "worker": worker,
            "started_at": at(1),
            "finished_at": at(5),
        }
    )


def retrying(attempt: int = 1, worker: str = "w1", seconds: float = 3) -> TaskRetrying:
    return TaskRetrying(
        id="t1",
        attempt=attempt,
        worker=worker,
        error=TaskError(type="timeout", message="took longer than 2 s"),
        started_at=at(1),
        retry_in_s=4,
        retry_at=at(seconds + 4),
        at=at(seconds),
    )


def returned(attempt: int = 1, worker: str = "w1", seconds: float = 4) -> TaskReturned:
    return TaskReturned(
        id="t1",
        attempt=attempt,
        worker=worker,
        reason="grace period over",
        started_at=at(1),
        at=at(seconds),
    )


def running(worker: str = "w1", attempt: int = 1) -> TaskRecord:
    return apply_started(None, worker, started(attempt))


def info(worker_id: str = "w1") -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, host="h", pid=7, pool="default", concurrency=4, kinds=["echo"], version="1"
    )


def beat(seconds: float, worker_id: str = "w1") -> WorkerHeartbeat:
    return WorkerHeartbeat(worker=info(worker_id), at=at(seconds))


def worker(last_seen: float = 0, **fields: object) -> WorkerRecord:
    record = apply_heartbeat(None, beat(last_seen, str(fields.pop("id", "w1"))))
    return replace(record, **fields)  # type: ignore[arg-type]


# --- fencing by attempt ---------------------------------------------------------------


def test_fencing_a_worker_loses_its_open_attempts_and_requeues_the_task() -> None:
    record = fence_task(running(), "w1", at(10))
    assert (record.status, record.attempt, record.worker) == (TaskStatus.PENDING, 1, None)
    assert [(a.attempt, a.outcome, a.finished_at) for a in record.attempts] == [
        (1, AttemptOutcome.LOST, at(10))
    ]
    assert is_fenced(record, 1) and not is_fenced(record, 2)
    assert fence_task(record, "w1", at(11)) is record  # nothing left to lose


def test_fencing_leaves_other_workers_and_finished_attempts_alone() -> None:
    second = apply_started(running("w1"), "w2", started(attempt=2, seconds=4))
    fenced = fence_task(second, "w1", at(10))
    assert (fenced.status, fenced.worker, fenced.attempt) == (TaskStatus.RUNNING, "w2", 2)
    assert [a.outcome for a in fenced.attempts] == [AttemptOutcome.LOST, None]
    done = apply_result(running(), result())
    assert done is not None and fence_task(done, "w1", at(10)) is done
    assert fence_task(running("w2"), "w1", at(10)).status is TaskStatus.RUNNING


def test_late_result_of_a_lost_attempt_is_ignored_but_a_newer_one_counts() -> None:
    fenced = fence_task(running(), "w1", at(10))
    assert apply_result(fenced, result(attempt=1)) is fenced
    again = apply_started(fenced, "w2", started(attempt=2, seconds=11))
    assert (again.status, again.worker) == (TaskStatus.RUNNING, "w2")
    done = apply_result(again, result(attempt=2, worker="w2"))
    assert done is not None
    assert (done.status, done.result, done.attempt) == (
        TaskStatus.COMPLETED,
        "from attempt 2",
        2,
    )
    assert [a.outcome for a in done.attempts] == [AttemptOutcome.LOST, AttemptOutcome.COMPLETED]


def test_late_start_or_retry_of_a_lost_attempt_does_not_take_the_task_back() -> None:
    fenced = fence_task(running(), "w1", at(10))
    assert apply_started(fenced, "w1", started(attempt=1)).status is TaskStatus.PENDING
    assert apply_retrying(fenced, retrying(attempt=1)) is fenced


def test_a_result_without_worker_is_not_fenced() -> None:
    # The tracker's own dead-letter verdict names no worker: it must always land.
    fenced = fence_task(running(), "w1", at(10))
    failed = apply_result(fenced, result(attempt=1, worker=None, status="failed"))
    assert failed is not None and failed.status is TaskStatus.FAILED


def test_ledger_reports_ignored_messages_of_fenced_attempts() -> None:
    ledger = Ledger({"t1": fence_task(running(), "w1", at(10))}, {}, heartbeat_timeout_s=3)
    assert ledger.apply(result(attempt=1)) == []
    ledger.apply(TasksStarted(worker="w1", tasks=[started(attempt=1)]))
    assert [(f.what, f.task_id, f.attempt, f.worker) for f in ledger.fenced] == [
        ("result", "t1", 1, "w1"),
        ("start", "t1", 1, "w1"),
    ]
    assert list(ledger.changed_tasks()) == []


def test_ledger_declare_dead_releases_only_when_the_broker_requeued() -> None:
    loaded = {"t1": running(), "t2": running("w2")}
    kept = Ledger(dict(loaded), {"w1": worker()}, heartbeat_timeout_s=3)
    assert kept.declare_dead("w1", at(10), Death.UNFENCED) == []
    assert kept.workers["w1"].death is Death.UNFENCED and list(kept.changed_tasks()) == []
    released = Ledger(dict(loaded), {"w1": worker()}, heartbeat_timeout_s=3)
    changes = released.declare_dead("w1", at(10), Death.FENCED)
    assert [(c.task_id, c.before, c.after) for c in changes] == [
        ("t1", TaskStatus.RUNNING, TaskStatus.PENDING)
    ]
    assert released.changed_workers()[0].dead_at == at(10)


@pytest.mark.parametrize(
    ("death", "outcome"),
    [(Death.FENCED, AttemptOutcome.FENCED), (Death.GONE, AttemptOutcome.LOST)],
)
def test_the_written_off_attempt_says_how_its_worker_died(
    death: Death, outcome: AttemptOutcome
) -> None:
    ledger = Ledger({"t1": running()}, {"w1": worker()}, heartbeat_timeout_s=3)
    ledger.declare_dead("w1", at(10), death)
    record = ledger.tasks["t1"]
    assert [(a.attempt, a.outcome, a.finished_at) for a in record.attempts] == [
        (1, outcome, at(10))
    ]
    assert is_fenced(record, 1)
    # Written off either way: the woken worker's late messages about it change nothing.
    assert apply_result(record, result(attempt=1)) is record
    assert apply_retrying(record, retrying(attempt=1)) is record
    assert apply_started(record, "w1", started(attempt=1)).status is TaskStatus.PENDING
    assert apply_returned(record, returned(attempt=1)) is record


# --- retrying --------------------------------------------------------------------------


def test_retrying_marks_the_attempt_failed_and_the_task_retrying() -> None:
    record = apply_retrying(running(), retrying(attempt=1))
    assert (record.status, record.attempt, record.error_type, record.retry_at) == (
        TaskStatus.RETRYING,
        1,
        "timeout",
        at(7),
    )
    assert record.error_message == "took longer than 2 s"
    assert [(a.attempt, a.outcome, a.finished_at) for a in record.attempts] == [
        (1, AttemptOutcome.FAILED, at(3))
    ]
    assert rank(TaskStatus.RETRYING) == rank(TaskStatus.RUNNING)
    assert not TaskStatus.RETRYING.terminal
    assert apply_retrying(record, retrying(attempt=1)) is record


def test_next_attempt_moves_a_retrying_task_on_and_clears_the_error() -> None:
    record = apply_retrying(running(), retrying(attempt=1))
    late_start = apply_started(record, "w1", started(attempt=1))
    assert late_start.status is TaskStatus.RETRYING  # attempt 1 already ended
    second = apply_started(record, "w2", started(attempt=2, seconds=8))
    assert (second.status, second.worker, second.attempt) == (TaskStatus.RUNNING, "w2", 2)
    assert (second.error_type, second.error_message, second.retry_at) == (None, None, None)
    done = apply_result(second, result(attempt=2, worker="w2"))
    assert done is not None and (done.status, done.retry_at) == (TaskStatus.COMPLETED, None)


def test_retrying_for_a_lower_attempt_is_ignored() -> None:
    second = apply_started(running(), "w2", started(attempt=2, seconds=8))
    late = apply_retrying(second, retrying(attempt=1))
    assert (late.status, late.attempt, late.error_type) == (TaskStatus.RUNNING, 2, None)
    assert [a.outcome for a in late.attempts] == [AttemptOutcome.FAILED, None]


def test_retrying_for_an_unknown_or_terminal_task() -> None:
    fresh = apply_retrying(None, retrying(attempt=3))
    assert (fresh.status, fresh.attempt, fresh.worker) == (TaskStatus.RETRYING, 3, "w1")
    done = apply_result(running(), result())
    assert done is not None
    assert apply_retrying(done, retrying(attempt=2)).status is TaskStatus.COMPLETED


def test_a_terminal_result_ends_a_retrying_task() -> None:
    record = apply_retrying(running(), retrying(attempt=1))
    failed = apply_result(record, result(attempt=2, worker="w2", status="failed"))
    assert failed is not None and (failed.status, failed.retry_at) == (TaskStatus.FAILED, None)


# --- worker deaths ---------------------------------------------------------------------


def test_a_fenced_worker_is_not_revived_by_news_older_than_its_fence() -> None:
    dead = declare_dead(worker(last_seen=0), at(5), Death.FENCED)
    assert worker_state(dead, at(5), 3) is WorkerState.DEAD
    # Sent before the fence, delivered late: nothing changes.
    assert apply_heartbeat(dead, beat(4)) is dead
    assert apply_heartbeat(dead, beat(5)) is dead
    assert apply_worker_started(dead, WorkerStarted(worker=info(), at=at(4))) is dead
    assert apply_worker_stopped(dead, WorkerStopped(worker="w1", at=at(6))) is dead


def test_a_fenced_worker_heard_from_after_its_fence_is_watched_again() -> None:
    # Its close reason was lost in a connection reset: it is back under its old id.
    dead = declare_dead(worker(last_seen=0, in_flight=("t1",)), at(5), Death.FENCED)
    back = apply_heartbeat(dead, WorkerHeartbeat(worker=info(), in_flight=["t9"], at=at(7)))
    assert (back.death, back.dead_at, back.last_seen, back.in_flight) == (
        None,
        None,
        at(7),
        ("t9",),
    )
    assert worker_state(back, at(7), 3) is WorkerState.ALIVE
    [due] = overdue([back], at(11), since=at(0), timeout_s=3)  # silent again: due again
    assert due.worker.id == "w1"
    announced = apply_worker_started(dead, WorkerStarted(worker=info(), at=at(6)))
    assert (announced.death, announced.last_seen) == (None, at(6))
    fenced_again = declare_dead(back, at(12), Death.FENCED)
    assert (fenced_again.death, fenced_again.dead_at) == (Death.FENCED, at(12))


def test_ledger_notes_a_fenced_worker_that_is_heard_from_again() -> None:
    dead = declare_dead(worker(last_seen=0), at(5), Death.FENCED)
    ledger = Ledger({}, {"w1": dead}, heartbeat_timeout_s=3)
    ledger.apply(beat(4))  # late: no note
    assert ledger.revived == [] and ledger.changed_workers() == []
    ledger.apply(beat(7))
    assert ledger.revived == [("w1", at(5))]
    assert [w.death for w in ledger.changed_workers()] == [None]


@pytest.mark.parametrize("death", [Death.UNFENCED, Death.GONE])
def test_an_unfenced_or_gone_worker_comes_back_with_a_newer_heartbeat(death: Death) -> None:
    dead = declare_dead(worker(last_seen=0), at(5), death)
    assert apply_heartbeat(dead, beat(0)).death is death  # not newer: stays dead
    back = apply_heartbeat(dead, beat(6))
    assert (back.death, back.dead_at) == (None, None)
    assert worker_state(back, at(6), 3) is WorkerState.ALIVE
    again = apply_worker_started(dead, WorkerStarted(worker=info(), at=at(6)))
    assert worker_state(again, at(6), 3) is WorkerState.ALIVE


def test_declare_dead_clears_in_flight_only_when_released() -> None:
    busy = worker(in_flight=("t1",))
    assert declare_dead(busy, at(5), Death.UNFENCED).in_flight == ("t1",)
    fenced = declare_dead(declare_dead(busy, at(5), Death.UNFENCED), at(9), Death.FENCED)
    assert (fenced.in_flight, fenced.dead_at, fenced.death) == ((), at(5), Death.FENCED)


# --- the watchdog's decision -----------------------------------------------------------


def test_overdue_after_the_timeout_only() -> None:
    w = worker(last_seen=0)
    assert overdue([w], at(3), since=at(-100), timeout_s=3) == []
    [due] = overdue([w], at(3.5), since=at(-100), timeout_s=3)
    assert (due.worker.id, due.silent_s) == ("w1", 3.5)


def test_a_restarted_tracker_gives_every_worker_one_timeout() -> None:
    silent_long = worker(last_seen=0)
    assert overdue([silent_long], at(102), since=at(100), timeout_s=3) == []
    [due] = overdue([silent_long], at(103.5), since=at(100), timeout_s=3)
    assert due.silent_s == 103.5  # the log tells the real silence


def test_overdue_skips_stopped_and_released_workers_but_retries_unfenced() -> None:
    stopped = apply_worker_stopped(worker(id="s", last_seen=0), WorkerStopped(worker="s", at=at(1)))
    assert stopped is not None
    fenced = declare_dead(worker(id="f"), at(5), Death.FENCED)
    gone = declare_dead(worker(id="g"), at(5), Death.GONE)
    unfenced = declare_dead(worker(id="u"), at(5), Death.UNFENCED)
    silent = worker(id="a")
    due = overdue([stopped, fenced, gone, unfenced, silent], at(60), at(0), timeout_s=3)
    assert [d.worker.id for d in due] == ["a", "u"]
