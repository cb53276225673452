"""The records one transaction touches and what it changed, in memory (no I/O).

The store loads the records a batch (or a watchdog verdict) touches into a
:class:`Ledger`, applies messages in order with the pure functions of
:mod:`leveret.tracker.state` and :mod:`leveret.tracker.workers`, then writes
only what changed and logs the notes. A task that a step leaves owing its
producer a reply is marked so in the same step (:func:`leveret.tracker.state.owe_reply`),
so the mark commits with the outcome.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from leveret.contracts import (
    ENDED_STATUSES,
    EndedTask,
    TaskProgress,
    TaskResult,
    TaskRetrying,
    TaskReturned,
    TasksAccepted,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
    utcnow,
)
from leveret.tracker.state import (
    AttemptOutcome,
    ReplyState,
    TaskRecord,
    TrackerMessage,
    WorkerCounters,
    apply_accepted,
    apply_progress,
    apply_result,
    apply_retrying,
    apply_returned,
    apply_started,
    counted,
    fence_task,
    is_fenced,
    owe_reply,
)
from leveret.tracker.workers import (
    Death,
    WorkerRecord,
    apply_heartbeat,
    apply_worker_started,
    apply_worker_stopped,
    declare_dead,
    worker_change,
)


def message_ids(message: TrackerMessage) -> tuple[list[str], list[str]]:
    """The task ids and worker ids one message touches."""
    if isinstance(message, TaskResult | TaskRetrying | TaskReturned | TaskProgress):
        return [message.id], []
    if isinstance(message, TasksAccepted | TasksStarted):
        return [t.id for t in message.tasks], []
    if isinstance(message, WorkerStarted | WorkerHeartbeat):
        return [], [message.worker.id]
    if isinstance(message, WorkerStopped):
        return [], [message.worker]
    return [], []


def load_ids(messages: Iterable[TrackerMessage]) -> tuple[set[str], set[str]]:
    """Every task id and worker id a batch touches (what to load before applying it)."""
    tasks: set[str] = set()
    workers: set[str] = set()
    for message in messages:
        t, w = message_ids(message)
        tasks.update(t)
        workers.update(w)
    return tasks, workers


@dataclass(frozen=True, slots=True)
class TaskChange:
    """One task's status moved (or the task appeared): for DEBUG logs."""

    task_id: str
    before: TaskStatus | None
    after: TaskStatus


@dataclass(frozen=True, slots=True)
class FencedReport:
    """A worker's message about an attempt that was written off as lost: ignored."""

    what: str  # "result", "start", "retry" or "return"
    task_id: str
    attempt: int
    worker: str | None


@dataclass
class Ledger:
    """The records one transaction touches and what it changed.

    Load `tasks` and `workers` for the ids involved, :meth:`apply` each message in
    order (or :meth:`declare_dead`), then write what :meth:`changed_tasks` and
    :meth:`changed_workers` return, add `counters` to the per-worker totals, log
    `worker_notes`, `revived` and `fenced`, and after the commit send the replies
    :meth:`owed_replies` returns. `now` stamps the replies it marks owed.
    """

    tasks: dict[str, TaskRecord]
    workers: dict[str, WorkerRecord]
    heartbeat_timeout_s: float
    now: datetime = field(default_factory=utcnow)
    counters: dict[str, WorkerCounters] = field(default_factory=dict)
    worker_notes: list[tuple[str, str]] = field(default_factory=list)
    #: Fenced registrations heard from again (worker id, when it was fenced).
    revived: list[tuple[str, datetime]] = field(default_factory=list)
    fenced: list[FencedReport] = field(default_factory=list)
    _loaded_tasks: dict[str, TaskRecord] = field(init=False)
    _loaded_workers: dict[str, WorkerRecord] = field(init=False)

    def __post_init__(self) -> None:
        self._loaded_tasks = dict(self.tasks)
        self._loaded_workers = dict(self.workers)

    def apply(self, message: TrackerMessage) -> list[TaskChange]:
        """Apply one message; return the task status changes it made."""
        if isinstance(message, TaskResult):
            if message.worker is not None:
                self._check_fenced("result", message.id, message.attempt, message.worker)
            return self._task(message.id, apply_result(self.tasks.get(message.id), message))
        if isinstance(message, TaskProgress):
            return self._task(message.id, apply_progress(self.tasks.get(message.id), message))
        if isinstance(message, TaskRetrying):
            self._check_fenced("retry", message.id, message.attempt, message.worker)
            return self._task(message.id, apply_retrying(self.tasks.get(message.id), message))
        if isinstance(message, TaskReturned):
            self._check_fenced("return", message.id, message.attempt, message.worker)
            return self._task(message.id, apply_returned(self.tasks.get(message.id), message))
        changes: list[TaskChange] = []
        if isinstance(message, TasksAccepted):
            for acc in message.tasks:
                changes += self._task(acc.id, apply_accepted(self.tasks.get(acc.id), acc))
        elif isinstance(message, TasksStarted):
            for st in message.tasks:
                self._check_fenced("start", st.id, st.attempt, message.worker)
                after = apply_started(self.tasks.get(st.id), message.worker, st)
                changes += self._task(st.id, after)
        else:
            self._apply_worker(message)
        return changes

    def _apply_worker(self, message: TrackerMessage) -> None:
        if isinstance(message, WorkerStarted):
            wid = message.worker.id
            self._worker(wid, apply_worker_started(self.workers.get(wid), message))
        elif isinstance(message, WorkerHeartbeat):
            wid = message.worker.id
            self._worker(wid, apply_heartbeat(self.workers.get(wid), message))
        elif isinstance(message, WorkerStopped):
            wid = message.worker
            self._worker(wid, apply_worker_stopped(self.workers.get(wid), message))

    def declare_dead(self, worker_id: str, at: datetime, death: Death) -> list[TaskChange]:
        """The watchdog's verdict on a loaded worker; when its deliveries were released,
        its open attempts of the loaded tasks become `fenced` (the tracker closed its
        connection) or `lost` (it was gone); see :func:`fence_task`."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            self.workers[worker_id] = declare_dead(worker, at, death)
        changes: list[TaskChange] = []
        if death.releases:
            outcome = AttemptOutcome.FENCED if death is Death.FENCED else AttemptOutcome.LOST
            for task_id, record in list(self.tasks.items()):
                changes += self._task(task_id, fence_task(record, worker_id, at, outcome))
        return changes

    def _check_fenced(self, what: str, task_id: str, attempt: int, worker: str | None) -> None:
        if is_fenced(self.tasks.get(task_id), attempt):
            self.fenced.append(FencedReport(what, task_id, attempt, worker))

    def _task(self, task_id: str, after: TaskRecord | None) -> list[TaskChange]:
        before = self.tasks.get(task_id)
        if after is None or after is before:
            return []
        after = owe_reply(after, self.now)
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
        if before is not None and before.death is Death.FENCED and after.death is None:
            self.revived.append((worker_id, before.dead_at or after.last_seen))
        self.workers[worker_id] = after
        note = worker_change(before, after, self.heartbeat_timeout_s)
        if note is not None:
            self.worker_notes.append((worker_id, note))

    def ended(self, messages: Iterable[TrackerMessage]) -> list[EndedTask]:
        """The recorded outcome of each task a result in `messages` is about, when it
        ended completed, failed or cancelled: what the scheduler must hear (again after
        a redelivery, since the tracker may have died before it told the scheduler)."""
        found: dict[str, EndedTask] = {}
        for message in messages:
            if not isinstance(message, TaskResult) or message.id in found:
                continue
            record = self.tasks.get(message.id)
            if record is not None and record.status in ENDED_STATUSES:
                found[record.id] = EndedTask(
                    id=record.id, status=record.status.value, error_type=record.error_type
                )
        return list(found.values())

    def changed_tasks(self) -> Iterable[tuple[TaskRecord | None, TaskRecord]]:
        """(as loaded, as now) for every task changed; None = new task."""
        for task_id, now in self.tasks.items():
            loaded = self._loaded_tasks.get(task_id)
            if now is not loaded:
                yield loaded, now

    def owed_replies(self, resend: Collection[str] = ()) -> list[TaskRecord]:
        """The tasks that came to owe their producer a reply in this transaction, then
        those of `resend` whose reply is still owed (not yet marked sent)."""
        owed = [
            now
            for loaded, now in self.changed_tasks()
            if now.reply is ReplyState.OWED and (loaded is None or loaded.reply is None)
        ]
        new = {r.id for r in owed}
        for task_id in sorted(set(resend) - new):
            record = self.tasks.get(task_id)
            if record is not None and record.reply is ReplyState.OWED:
                owed.append(record)
        return owed

    def changed_workers(self) -> list[WorkerRecord]:
        """Every worker record created or changed."""
        return [w for i, w in self.workers.items() if w is not self._loaded_workers.get(i)]
