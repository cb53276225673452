"""The tracker's task state machine: pure functions that apply one message to a record.

No I/O here. Records are frozen; every function returns the *same object* when a
message changes nothing, so a caller learns what to write with ``is``. Applying
a message twice is a no-op, because deliveries are at-least-once.

Rules (status rank: pending = blocked = delayed < running = retrying < terminal):

- A status never moves backwards; accepted/started events that arrive late only
  fill fields that are still missing. Within rank 0 an announcement moves a task
  only forward along blocked → delayed → pending: the scheduler announces a held
  task `blocked` or `delayed`, then `pending` when it releases it.
- A `started` event is fenced by attempt: a lower attempt than the record's, or
  an attempt that already ended (failed, returned, lost, fenced), never takes the
  task back.
- A `retrying` event marks its attempt `failed` and the task `retrying` until a
  higher attempt starts; one for an attempt lower than the current one only
  joins the history.
- A `returned` event (a worker handed the attempt back on a graceful stop) marks
  its attempt `returned`; if that was the current attempt of a task still
  running, the task is `pending` again. No retry is spent.
- The *first* terminal result is the task's result; a later one (the task ran
  twice) only marks its own attempt in the history. Worker counters count the
  recorded result only.
- Fencing by attempt: when the watchdog wrote a worker off, its open attempts
  became `fenced` (the tracker closed its connection) or `lost` (the connection
  was gone already); either way the broker requeued their deliveries. A worker's
  late started, retrying or returned event or result for such an attempt never
  touches the task.
- A `rejected` result creates a record for an unknown id and never touches a
  known task; a `duplicate` result is a reply to a producer and is ignored.
- The producer's one reply: a task that ends completed, failed or cancelled with a
  known `reply_to` (from `task.accepted`, which may come after the result) *owes*
  a reply, marked in the same step (:func:`owe_reply`); see
  :mod:`leveret.tracker.replies` for how it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias, TypeVar

from pydantic import JsonValue

from leveret.contracts import (
    ENDED_STATUSES,
    AcceptedTask,
    Event,
    StartedTask,
    TaskProgress,
    TaskResult,
    TaskRetrying,
    TaskReturned,
    TaskStatus,
)

#: Everything that arrives on the tracker queue.
TrackerMessage: TypeAlias = TaskResult | Event

R = TypeVar("R")


class AttemptOutcome(StrEnum):
    """How one attempt ended: `completed`, `failed` or `cancelled` (its result);
    `returned` (its worker handed it back on a graceful stop; no retry spent);
    `fenced` (its worker went silent and the tracker closed its connection) or `lost`
    (its worker's connection was already gone): the broker gave the task to another.
    No outcome while the attempt runs."""

    COMPLETED = "completed"  # the handler returned
    FAILED = "failed"  # the handler raised, timed out, or the task could not run
    CANCELLED = "cancelled"  # cancelled while it ran
    LOST = "lost"  # its worker's connection was gone; the broker gave the task to another
    FENCED = "fenced"  # the tracker closed its silent worker's connection; requeued likewise
    RETURNED = "returned"  # handed back on a graceful stop; it spends no retry

    @property
    def written_off(self) -> bool:
        """True when the tracker gave up on the attempt (its worker was declared dead):
        nothing its worker says about it later counts."""
        return self in (AttemptOutcome.LOST, AttemptOutcome.FENCED)


class ReplyState(StrEnum):
    """Where a task's one reply to its producer's `reply_to` stands."""

    OWED = "owed"  # the task ended; the reply is not confirmed sent yet
    SENT = "sent"  # the broker confirmed it


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a task on a worker, as far as the tracker has heard of it."""

    attempt: int
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: AttemptOutcome | None = None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """Everything the tracker knows about one task."""

    id: str
    status: TaskStatus
    kind: str | None = None
    pool: str | None = None
    result: JsonValue = None
    error_type: str | None = None
    error_message: str | None = None
    attempt: int = 0
    worker: str | None = None
    correlation_id: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retry_at: datetime | None = None
    attempts: tuple[Attempt, ...] = ()
    run_at: datetime | None = None
    depends_on: tuple[str, ...] = ()
    progress: Progress | None = None
    requires: tuple[str, ...] = ()
    reply_to: str | None = None
    reply: ReplyState | None = None
    reply_at: datetime | None = None  # when the reply became owed, then when it was sent


@dataclass(frozen=True, slots=True)
class Progress:
    """The latest progress report of a task's current attempt."""

    fraction: float | None
    message: str | None
    at: datetime


def apply_progress(record: TaskRecord | None, event: TaskProgress) -> TaskRecord | None:
    """Keep the newest report of the current attempt while it runs; ignore the rest."""
    if record is None or record.status.terminal or event.attempt != record.attempt:
        return record
    if record.progress is not None and record.progress.at >= event.at:
        return record
    return replace(record, progress=Progress(event.fraction, event.message, event.at))


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    """Recorded results per worker: how many completed or failed, and seconds spent."""

    completed: int = 0
    failed: int = 0
    busy_s: float = 0.0

    def __add__(self, other: WorkerCounters) -> WorkerCounters:
        return WorkerCounters(
            self.completed + other.completed, self.failed + other.failed, self.busy_s + other.busy_s
        )


#: Rank-0 statuses in the only order an announcement may move a task through them.
_HELD_ORDER = {TaskStatus.BLOCKED: 0, TaskStatus.DELAYED: 1, TaskStatus.PENDING: 2}


def rank(status: TaskStatus) -> int:
    """Order of statuses: pending = blocked = delayed 0 < running = retrying 1 < terminal 2."""
    if status in _HELD_ORDER:
        return 0
    if status in (TaskStatus.RUNNING, TaskStatus.RETRYING):
        return 1
    return 2


def _keep(old: R, new: R) -> R:
    """`old` itself when `new` equals it, so callers can detect changes with ``is``."""
    return old if new == old else new


def merge_attempt(history: tuple[Attempt, ...], incoming: Attempt) -> tuple[Attempt, ...]:
    """Add an attempt to the history, or fill the missing fields of the one already there."""
    for i, known in enumerate(history):
        if known.attempt == incoming.attempt:
            merged = Attempt(
                known.attempt,
                known.worker or incoming.worker,
                known.started_at or incoming.started_at,
                known.finished_at or incoming.finished_at,
                known.outcome or incoming.outcome,
            )
            if merged == known:
                return history
            return (*history[:i], merged, *history[i + 1 :])
    return tuple(sorted((*history, incoming), key=lambda a: a.attempt))


def history_entry(history: tuple[Attempt, ...], attempt: int) -> Attempt | None:
    """The history entry of one attempt, if the tracker heard of it."""
    return next((a for a in history if a.attempt == attempt), None)


def is_fenced(record: TaskRecord | None, attempt: int) -> bool:
    """True when this attempt of the task was written off (`lost` or `fenced`): its
    worker was declared dead and the broker gave the task to another."""
    if record is None:
        return False
    entry = history_entry(record.attempts, attempt)
    return entry is not None and entry.outcome is not None and entry.outcome.written_off


def owe_reply(record: TaskRecord, at: datetime) -> TaskRecord:
    """The record with its reply marked owed (at `at`) when it owes one now: it ended
    completed, failed or cancelled (not `rejected`: the scheduler answers refusals),
    its producer gave a `reply_to`, and no reply is owed or sent yet."""
    if record.reply is None and record.reply_to and record.status in ENDED_STATUSES:
        return replace(record, reply=ReplyState.OWED, reply_at=at)
    return record


def apply_accepted(record: TaskRecord | None, item: AcceptedTask) -> TaskRecord:
    """The scheduler queued (`pending`) or held (`blocked`, `delayed`) the task: a new
    record takes that status; a known one moves only forward within rank 0 (blocked →
    delayed → pending: a release) and otherwise only gains the fields it is missing."""
    status = TaskStatus(item.status)
    if record is None:
        return TaskRecord(
            id=item.id,
            status=status,
            kind=item.kind,
            pool=item.pool,
            correlation_id=item.correlation_id,
            submitted_at=item.submitted_at,
            run_at=item.run_at,
            depends_on=tuple(item.depends_on),
            requires=tuple(item.requires),
            reply_to=item.reply_to,
        )
    if record.status in _HELD_ORDER and _HELD_ORDER[status] > _HELD_ORDER[record.status]:
        record_status = status
    else:
        record_status = record.status
    return _keep(
        record,
        replace(
            record,
            status=record_status,
            kind=record.kind or item.kind,
            pool=record.pool or item.pool,
            correlation_id=record.correlation_id or item.correlation_id,
            submitted_at=record.submitted_at or item.submitted_at,
            run_at=record.run_at or item.run_at,
            depends_on=record.depends_on or tuple(item.depends_on),
            requires=record.requires or tuple(item.requires),
            reply_to=record.reply_to or item.reply_to,
        ),
    )


def apply_started(record: TaskRecord | None, worker: str, item: StartedTask) -> TaskRecord:
    """A worker began an attempt: `running`, unless the task is terminal, the record
    already holds a higher attempt, or this attempt already ended (failed, returned,
    written off).
    The attempt joins the history either way."""
    entry = Attempt(item.attempt, worker, started_at=item.started_at)
    if record is None:
        return TaskRecord(
            id=item.id,
            status=TaskStatus.RUNNING,
            attempt=item.attempt,
            worker=worker,
            started_at=item.started_at,
            attempts=(entry,),
        )
    known = history_entry(record.attempts, item.attempt)
    history = merge_attempt(record.attempts, entry)
    if record.status.terminal:
        # The result overtook its own started event: fill in when the attempt began.
        started_at = record.started_at
        if started_at is None and record.attempt == item.attempt and record.worker == worker:
            started_at = item.started_at
        new = replace(record, started_at=started_at, attempts=history)
    elif item.attempt < record.attempt or (known is not None and known.outcome is not None):
        new = replace(record, attempts=history)  # fenced: a newer attempt owns the task
    else:
        new = replace(
            record,
            status=TaskStatus.RUNNING,
            attempt=item.attempt,
            worker=worker,
            started_at=item.started_at,
            error_type=None,
            error_message=None,
            retry_at=None,
            attempts=history,
        )
    return _keep(record, new)


def apply_retrying(record: TaskRecord | None, event: TaskRetrying) -> TaskRecord:
    """An attempt failed and the broker holds the task until the next one: the attempt is
    `failed`, the task `retrying` with that error, unless a higher attempt owns it already
    or it is terminal (then only the history learns). Ignored for a written-off attempt."""
    entry = Attempt(event.attempt, event.worker, event.started_at, event.at, AttemptOutcome.FAILED)
    if record is None:
        return _retrying(TaskRecord(id=event.id, status=TaskStatus.RETRYING), event, (entry,))
    if is_fenced(record, event.attempt):
        return record
    history = merge_attempt(record.attempts, entry)
    if record.status.terminal or event.attempt < record.attempt:
        return _keep(record, replace(record, attempts=history))
    return _keep(record, _retrying(record, event, history))


def apply_returned(record: TaskRecord | None, event: TaskReturned) -> TaskRecord:
    """A worker handed an attempt back on a graceful stop: the attempt is `returned`
    (ended at `event.at`); if it is the current attempt of a task that is not terminal,
    the task is `pending` again (no worker). Ignored for a written-off attempt."""
    entry = Attempt(
        event.attempt, event.worker, event.started_at, event.at, AttemptOutcome.RETURNED
    )
    if record is None:
        return TaskRecord(
            id=event.id, status=TaskStatus.PENDING, attempt=event.attempt, attempts=(entry,)
        )
    if is_fenced(record, event.attempt):
        return record
    new = replace(record, attempts=merge_attempt(record.attempts, entry))
    if not record.status.terminal and event.attempt == record.attempt:
        new = replace(new, status=TaskStatus.PENDING, worker=None, started_at=None)
    return _keep(record, new)


def _retrying(base: TaskRecord, event: TaskRetrying, history: tuple[Attempt, ...]) -> TaskRecord:
    return replace(
        base,
        status=TaskStatus.RETRYING,
        attempt=event.attempt,
        worker=event.worker,
        error_type=event.error.type,
        error_message=event.error.message,
        started_at=event.started_at,
        finished_at=None,
        retry_at=event.retry_at,
        attempts=history,
    )


def apply_result(record: TaskRecord | None, result: TaskResult) -> TaskRecord | None:
    """An outcome: the first terminal one is recorded, later ones only mark their attempt;
    `rejected` only creates unknown tasks; `duplicate` is ignored; a worker's result for
    a written-off attempt is ignored (fencing)."""
    if result.status == "duplicate":
        return record
    status = TaskStatus(result.status)
    if status is TaskStatus.REJECTED:
        return record if record is not None else _rejected(result)
    if not status.terminal:
        return record  # not an outcome; results are terminal by contract
    if result.worker is not None and is_fenced(record, result.attempt):
        return record
    history = record.attempts if record is not None else ()
    if result.worker is not None or history_entry(history, result.attempt) is not None:
        outcome = AttemptOutcome(status.value)
        history = merge_attempt(
            history,
            Attempt(result.attempt, result.worker, result.started_at, result.finished_at, outcome),
        )
    if record is not None and record.status.terminal:
        return _keep(record, replace(record, attempts=history))
    base = record or TaskRecord(id=result.id, status=status)
    entry = history_entry(history, result.attempt)
    started_at = result.started_at or (entry.started_at if entry is not None else None)
    error = result.error
    return replace(
        base,
        status=status,
        kind=base.kind or result.kind,
        pool=base.pool or result.pool,
        result=result.result,
        error_type=error.type if error is not None else None,
        error_message=error.message if error is not None else None,
        attempt=result.attempt,
        worker=result.worker,
        submitted_at=base.submitted_at or result.submitted_at,
        started_at=started_at,
        finished_at=result.finished_at,
        retry_at=None,
        attempts=history,
    )


def _rejected(result: TaskResult) -> TaskRecord:
    error = result.error
    return TaskRecord(
        id=result.id,
        status=TaskStatus.REJECTED,
        kind=result.kind,
        pool=result.pool,
        result=result.result,
        error_type=error.type if error is not None else None,
        error_message=error.message if error is not None else None,
        submitted_at=result.submitted_at,
        finished_at=result.finished_at,
    )


def fence_task(
    record: TaskRecord,
    worker: str,
    at: datetime,
    outcome: AttemptOutcome = AttemptOutcome.LOST,
) -> TaskRecord:
    """`worker` was declared dead and its deliveries went back to the queue: each of its
    attempts of this task without an outcome gets `outcome` (`fenced` when the tracker
    closed its connection, `lost` when it was gone); if the task's current attempt is
    one of them and the task is not terminal, it is `pending` again."""
    assert outcome.written_off
    lost = {a.attempt for a in record.attempts if a.worker == worker and a.outcome is None}
    if not lost:
        return record
    history = tuple(
        replace(a, outcome=outcome, finished_at=a.finished_at or at) if a.attempt in lost else a
        for a in record.attempts
    )
    new = replace(record, attempts=history)
    if not record.status.terminal and record.attempt in lost:
        new = replace(new, status=TaskStatus.PENDING, worker=None, started_at=None)
    return new


def counted(before: TaskRecord | None, after: TaskRecord) -> tuple[str, WorkerCounters] | None:
    """What a step adds to its worker's counters: only the recorded (first) terminal result."""
    if after.worker is None or not after.status.terminal or after.status is TaskStatus.REJECTED:
        return None
    if before is not None and before.status.terminal:
        return None
    busy = 0.0
    if after.started_at is not None and after.finished_at is not None:
        busy = max(0.0, (after.finished_at - after.started_at).total_seconds())
    return after.worker, WorkerCounters(
        completed=int(after.status is TaskStatus.COMPLETED),
        failed=int(after.status is TaskStatus.FAILED),
        busy_s=busy,
    )
