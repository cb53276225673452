"""The tracker's state machine: pure functions that apply one message to a record.

No I/O here. Records are frozen; every function returns the *same object* when a
message changes nothing, so a caller learns what to write with ``is``. Applying
a message twice is a no-op, because deliveries are at-least-once.

Rules (status rank: pending < running < terminal):

- A status never moves backwards; accepted/started events that arrive late only
  fill fields that are still missing.
- A `started` event is fenced by attempt: a lower attempt than the record's
  never takes the task back.
- The *first* terminal result is the task's result; a later one (the task ran
  twice) only marks its own attempt in the history. Worker counters count the
  recorded result only.
- A `rejected` result creates a record for an unknown id and never touches a
  known task; a `duplicate` result is a reply to a producer and is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias, TypeVar

from pydantic import JsonValue

from leveret.contracts import (
    AcceptedTask,
    Event,
    StartedTask,
    TaskResult,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    WorkerStopped,
)

#: Everything that arrives on the tracker queue.
TrackerMessage: TypeAlias = TaskResult | Event

R = TypeVar("R")


class WorkerState(StrEnum):
    """How a worker looks from its heartbeats, computed at read time."""

    ALIVE = "alive"  # heard from within heartbeat_timeout_s
    SUSPECT = "suspect"  # silent for one to two timeouts
    DEAD = "dead"  # silent for longer than two timeouts
    STOPPED = "stopped"  # said goodbye on a graceful stop
    UNKNOWN = "unknown"  # results name it, but it never announced itself


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a task on a worker, as far as the tracker has heard of it."""

    attempt: int
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: TaskStatus | None = None


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
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker as registered from its announcements and heartbeats."""

    id: str
    host: str
    pid: int
    pool: str
    concurrency: int
    kinds: tuple[str, ...]
    capabilities: tuple[str, ...]
    version: str
    started_at: datetime
    last_seen: datetime
    in_flight: tuple[str, ...] = ()
    stopped_at: datetime | None = None


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


def rank(status: TaskStatus) -> int:
    """Order of statuses: pending 0 < running 1 < any terminal 2."""
    if status is TaskStatus.PENDING:
        return 0
    if status is TaskStatus.RUNNING:
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


def _history_entry(history: tuple[Attempt, ...], attempt: int) -> Attempt | None:
    return next((a for a in history if a.attempt == attempt), None)


def apply_accepted(record: TaskRecord | None, item: AcceptedTask) -> TaskRecord:
    """The scheduler queued the task: a new record is `pending`; a known one only gains
    the fields it is missing (its status never moves back)."""
    if record is None:
        return TaskRecord(
            id=item.id,
            status=TaskStatus.PENDING,
            kind=item.kind,
            pool=item.pool,
            correlation_id=item.correlation_id,
            submitted_at=item.submitted_at,
        )
    return _keep(
        record,
        replace(
            record,
            kind=record.kind or item.kind,
            pool=record.pool or item.pool,
            correlation_id=record.correlation_id or item.correlation_id,
            submitted_at=record.submitted_at or item.submitted_at,
        ),
    )


def apply_started(record: TaskRecord | None, worker: str, item: StartedTask) -> TaskRecord:
    """A worker began an attempt: `running`, unless the task is terminal or the record
    already holds a higher attempt. The attempt joins the history either way."""
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
    history = merge_attempt(record.attempts, entry)
    if record.status.terminal:
        # The result overtook its own started event: fill in when the attempt began.
        started_at = record.started_at
        if started_at is None and record.attempt == item.attempt and record.worker == worker:
            started_at = item.started_at
        new = replace(record, started_at=started_at, attempts=history)
    elif item.attempt < record.attempt:
        new = replace(record, attempts=history)  # fenced: a newer attempt owns the task
    else:
        new = replace(
            record,
            status=TaskStatus.RUNNING,
            attempt=item.attempt,
            worker=worker,
            started_at=item.started_at,
            attempts=history,
        )
    return _keep(record, new)


def apply_result(record: TaskRecord | None, result: TaskResult) -> TaskRecord | None:
    """An outcome: the first terminal one is recorded, later ones only mark their attempt;
    `rejected` only creates unknown tasks; `duplicate` is ignored."""
    if result.status == "duplicate":
        return record
    status = TaskStatus(result.status)
    if status is TaskStatus.REJECTED:
        return record if record is not None else _rejected(result)
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        return record  # not an outcome; results are terminal by contract
    history = record.attempts if record is not None else ()
    if result.worker is not None or _history_entry(history, result.attempt) is not None:
        history = merge_attempt(
            history,
            Attempt(result.attempt, result.worker, result.started_at, result.finished_at, status),
        )
    if record is not None and record.status.terminal:
        return _keep(record, replace(record, attempts=history))
    base = record or TaskRecord(id=result.id, status=status)
    entry = _history_entry(history, result.attempt)
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


def _from_info(info: WorkerInfo, at: datetime) -> WorkerRecord:
    return WorkerRecord(
        id=info.id,
        host=info.host,
        pid=info.pid,
        pool=info.pool,
        concurrency=info.concurrency,
        kinds=tuple(info.kinds),
        capabilities=tuple(info.capabilities),
        version=info.version,
        started_at=at,
        last_seen=at,
    )


def _with_info(record: WorkerRecord, info: WorkerInfo) -> WorkerRecord:
    return replace(
        record,
        host=info.host,
        pid=info.pid,
        pool=info.pool,
        concurrency=info.concurrency,
        kinds=tuple(info.kinds),
        capabilities=tuple(info.capabilities),
        version=info.version,
    )


def apply_worker_started(record: WorkerRecord | None, event: WorkerStarted) -> WorkerRecord:
    """A worker announced itself (at start, and again when a scheduler starts)."""
    if record is None:
        return _from_info(event.worker, event.at)
    new = _with_info(record, event.worker)
    if event.at > record.last_seen:
        new = replace(new, last_seen=event.at)
    return _keep(record, replace(new, started_at=min(record.started_at, event.at)))


def apply_heartbeat(record: WorkerRecord | None, event: WorkerHeartbeat) -> WorkerRecord:
    """A heartbeat: registers an unknown worker; a newer one refreshes `last_seen` and
    `in_flight` (one older than the last heartbeat or the goodbye, delivered late, does not)."""
    base = record if record is not None else _from_info(event.worker, event.at)
    new = _with_info(base, event.worker)
    fresh = record is None or (
        event.at >= record.last_seen and (record.stopped_at is None or event.at > record.stopped_at)
    )
    if fresh:
        new = replace(new, last_seen=event.at, in_flight=tuple(event.in_flight))
    return new if record is None else _keep(record, new)


def apply_worker_stopped(record: WorkerRecord | None, event: WorkerStopped) -> WorkerRecord | None:
    """A worker stopped gracefully; a goodbye from a worker never seen is ignored."""
    if record is None:
        return None
    if record.stopped_at is not None and record.stopped_at >= event.at:
        return record
    return replace(record, stopped_at=event.at, in_flight=())


def worker_state(record: WorkerRecord, now: datetime, timeout_s: float) -> WorkerState:
    """The worker's state at `now`: stopped, else alive/suspect/dead by heartbeat age."""
    if record.stopped_at is not None and record.stopped_at >= record.last_seen:
        return WorkerState.STOPPED
    age = (now - record.last_seen).total_seconds()
    if age <= timeout_s:
        return WorkerState.ALIVE
    if age <= 2 * timeout_s:
        return WorkerState.SUSPECT
    return WorkerState.DEAD


def worker_change(before: WorkerRecord | None, after: WorkerRecord, timeout_s: float) -> str | None:
    """A sentence for the log when a message changed a worker's state, else None.

    States are judged at the time of the message (`after.last_seen`), not the clock.
    """
    at = max(after.last_seen, after.stopped_at or after.last_seen)
    new = worker_state(after, at, timeout_s)
    if before is None:
        return "registered" if new is not WorkerState.STOPPED else None
    old = worker_state(before, at, timeout_s)
    if old is new:
        return None
    if new is WorkerState.STOPPED:
        return "stopped"
    return f"{new} again (was {old})"


def message_ids(message: TrackerMessage) -> tuple[list[str], list[str]]:
    """The task ids and worker ids one message touches."""
    if isinstance(message, TaskResult):
        return [message.id], []
    if isinstance(message, TasksAccepted | TasksStarted):
        return [t.id for t in message.tasks], []
    if isinstance(message, WorkerStarted | WorkerHeartbeat):
        return [], [message.worker.id]
    if isinstance(message, WorkerStopped):
        return [], [message.worker]
    return [], []


@dataclass(frozen=True, slots=True)
class TaskChange:
    """One task's status moved (or the task appeared): for DEBUG logs."""

    task_id: str
    before: TaskStatus | None
    after: TaskStatus


@dataclass
class Ledger:
    """The records one batch touches and what the batch changed (in memory, no I/O).

    Load `tasks` and `workers` for the batch's ids, :meth:`apply` each message in
    order, then write what :meth:`changed_tasks` and :meth:`changed_workers` return
    and add `counters` to the per-worker totals.
    """

    tasks: dict[str, TaskRecord]
    workers: dict[str, WorkerRecord]
    heartbeat_timeout_s: float
    counters: dict[str, WorkerCounters] = field(default_factory=dict)
    worker_notes: list[tuple[str, str]] = field(default_factory=list)
    _loaded_tasks: dict[str, TaskRecord] = field(init=False)
    _loaded_workers: dict[str, WorkerRecord] = field(init=False)

    def __post_init__(self) -> None:
        self._loaded_tasks = dict(self.tasks)
        self._loaded_workers = dict(self.workers)

    def apply(self, message: TrackerMessage) -> list[TaskChange]:
        """Apply one message; return the task status changes it made."""
        changes: list[TaskChange] = []
        if isinstance(message, TaskResult):
            changes += self._task(message.id, apply_result(self.tasks.get(message.id), message))
        elif isinstance(message, TasksAccepted):
            for acc in message.tasks:
                changes += self._task(acc.id, apply_accepted(self.tasks.get(acc.id), acc))
        elif isinstance(message, TasksStarted):
            for st in message.tasks:
                changes += self._task(
                    st.id, apply_started(self.tasks.get(st.id), message.worker, st)
                )
        elif isinstance(message, WorkerStarted | WorkerHeartbeat):
            wid = message.worker.id
            before = self.workers.get(wid)
            if isinstance(message, WorkerStarted):
                self._worker(wid, apply_worker_started(before, message))
            else:
                self._worker(wid, apply_heartbeat(before, message))
        elif isinstance(message, WorkerStopped):
            self._worker(
                message.worker, apply_worker_stopped(self.workers.get(message.worker), message)
            )
        return changes

    def _task(self, task_id: str, after: TaskRecord | None) -> list[TaskChange]:
        before = self.tasks.get(task_id)
        if after is None or after is before:
            return []
        self.tasks[task_id] = after
        delta = counted(before, after)
        if delta is not None:
            worker, add = delta
            self.counters[worker] = self.counters.get(worker, WorkerCounters()) + add
        old = before.status if before is not None else None
        return [] if old is after.status else [TaskChange(task_id, old, after.status)]

    def _worker(self, worker_id: str, after: WorkerRecord | None) -> None:
        before = self.workers.get(worker_id)
        if after is None or after is before:
            return
        self.workers[worker_id] = after
        note = worker_change(before, after, self.heartbeat_timeout_s)
        if note is not None:
            self.worker_notes.append((worker_id, note))

    def changed_tasks(self) -> Iterable[tuple[TaskRecord | None, TaskRecord]]:
        """(as loaded, as now) for every task the batch changed; None = new task."""
        for task_id, now in self.tasks.items():
            loaded = self._loaded_tasks.get(task_id)
            if now is not loaded:
                yield loaded, now

    def changed_workers(self) -> list[WorkerRecord]:
        """Every worker record the batch created or changed."""
        return [w for i, w in self.workers.items() if w is not self._loaded_workers.get(i)]


def load_ids(messages: Iterable[TrackerMessage]) -> tuple[set[str], set[str]]:
    """Every task id and worker id a batch touches (what to load before applying it)."""
    tasks: set[str] = set()
    workers: set[str] = set()
    for message in messages:
        t, w = message_ids(message)
        tasks.update(t)
        workers.update(w)
    return tasks, workers
