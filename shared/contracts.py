"""Wire contract v1: every message leveret puts on the broker, as a pydantic model.

These models *are* the protocol. ``docs/protocol.md`` explains them and
``docs/schema/*.json`` is generated from them (``leveret schema``); a test fails
when the two drift. Producers in other languages only ever need
:class:`SubmitTask` (what they publish) and :class:`TaskResult` (what they get
back).

Compatibility rule for v1: fields may be added (optional, with a default); none
is removed or changes meaning. Unknown fields in a submission are refused, so a
typo never silently drops an option.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    TypeAdapter,
    field_validator,
    model_validator,
)

PROTOCOL_VERSION = 1

#: Priority of a task that names none (0 lowest … 9 highest; bands: 0-2, 3-6, 7-9).
DEFAULT_PRIORITY = 4

#: The AMQP `type` property of messages sent to a producer's `reply_to`: the task's
#: result (or a rejection / duplicate notice), or a progress report while it runs.
REPLY_RESULT = "task.result"
REPLY_PROGRESS = "task.progress"
#: The AMQP `type` of a cancellation request published to the submit exchange.
CANCEL_TYPE = "task.cancel"

#: In the reason of a connection the tracker closed because its worker stopped
#: heartbeating; a worker that sees it re-registers under a new id.
FENCED_MARKER = "leveret-fenced"

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,199}$"
KIND_PATTERN = r"^[A-Za-z][A-Za-z0-9_.:\-]{0,127}$"
POOL_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:=\-]{0,63}$"

#: At most this many capability tags in one task's `requires`.
MAX_REQUIRES = 16

# Bounds on what a producer controls (see docs/protocol.md, "Limits"); a submission
# past one is refused with a 4xx, never half-accepted.
#: Arrays and objects in a payload nest at most this deep (``[[1]]`` is 2 levels).
MAX_PAYLOAD_DEPTH = 64
#: Integers in a payload fit in 64 bits (signed or unsigned), as most JSON readers need.
MIN_PAYLOAD_INT = -(2**63)
MAX_PAYLOAD_INT = 2**64 - 1
#: Parents one task may name in `depends_on`.
MAX_DEPENDS_ON = 1000
#: Tasks in one `POST /tasks/batch`.
MAX_BATCH = 10_000
#: Dependency edges (`depends_on` entries) in one request, all its tasks together.
MAX_EDGES_PER_REQUEST = 10_000
#: Longest `delay_s`, and how far ahead `run_at` may be: 366 days.
MAX_DELAY_S = 366 * 24 * 3600
#: Longest `timeout_s`: 7 days.
MAX_TIMEOUT_S = 7 * 24 * 3600
#: A `reply_to` address is an AMQP short string.
MAX_REPLY_TO = 255
#: A result message (the JSON body a worker publishes on the results exchange) is at
#: most this big; a worker fails an attempt whose result is bigger with
#: `result_too_large`, and the tracker refuses a bigger message unrecorded.
MAX_RESULT_BYTES = 1024 * 1024
#: An error's `message` (and any error text) holds at most this many characters; a
#: worker truncates a longer one, marking the cut.
MAX_ERROR_MESSAGE_CHARS = 8192
#: An error's `type` holds at most this many characters; a worker cuts a longer one.
MAX_ERROR_TYPE_CHARS = 128
#: Any other message a worker or producer publishes to the events exchange
#: (heartbeats, progress, announcements, cancel requests) is at most this big.
MAX_EVENT_BYTES = 64 * 1024
#: The earliest `run_at` accepted (an earlier one is surely a mistake, not "run now").
MIN_RUN_AT = datetime(2000, 1, 1, tzinfo=UTC)

TaskId = Annotated[str, Field(pattern=ID_PATTERN, description="Task id; also the idempotency key.")]
Kind = Annotated[str, Field(pattern=KIND_PATTERN, description="Name of the handler that runs it.")]
Pool = Annotated[str, Field(pattern=POOL_PATTERN, description="Worker pool (one work queue each).")]
Tag = Annotated[str, Field(pattern=TAG_PATTERN)]


def new_task_id() -> str:
    """A fresh task id (random, URL-safe), for submissions that bring none."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (every timestamp on the wire is UTC)."""
    return datetime.now(UTC)


class TaskStatus(StrEnum):
    """Where a task is in its life; the tracker only ever moves it forward."""

    PENDING = "pending"  # accepted by the scheduler, waiting in a work queue
    BLOCKED = "blocked"  # held by the scheduler until every task in `depends_on` completed
    DELAYED = "delayed"  # held by the scheduler until `run_at`
    RUNNING = "running"  # a worker holds it (see `worker`, `attempt`)
    RETRYING = "retrying"  # an attempt failed; the broker holds it until the next one
    COMPLETED = "completed"  # terminal: the handler returned; `result` holds its value
    FAILED = "failed"  # terminal: the handler raised or the task could not run; see `error`
    CANCELLED = "cancelled"  # terminal: cancelled before it finished
    REJECTED = "rejected"  # terminal: the submission was refused and never ran

    @property
    def terminal(self) -> bool:
        """True for the statuses a task never leaves."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.REJECTED}
)
#: How an accepted task can end, and so end its dependants' wait. Not `rejected`: a
#: refused submission never reached the scheduler, and a refused second copy of a known
#: id must not end the task the first copy made.
ENDED_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SubmitTask(BaseModel):
    """A task as a producer submits it: to the `leveret.submit` exchange or `POST /tasks`.

    Only `kind` is required. `id` is the idempotency key: submitting the same id
    twice makes one task. Over AMQP the `message_id` property serves when `id` is
    absent, and the routing key names the pool when `pool` is absent.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    payload: JsonValue = None
    id: TaskId | None = None
    pool: Pool | None = None
    priority: int | None = Field(
        default=None, ge=0, le=9, description="0 (lowest) … 9 (highest); 4 when absent."
    )
    depends_on: list[TaskId] | None = Field(
        default=None,
        max_length=MAX_DEPENDS_ON,
        description="Ids of tasks that must complete first (earlier, or in the same batch).",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, description="Seconds one attempt may run."
    )
    max_retries: int | None = Field(
        default=None, ge=0, le=100, description="Attempts after the first that a failure may use."
    )
    requires: list[Tag] | None = Field(
        default=None,
        max_length=MAX_REQUIRES,
        description="Capabilities a worker must have, all of them, to run the task.",
    )
    delay_s: float | None = Field(
        default=None, ge=0, le=MAX_DELAY_S, description="Run no earlier than this from now."
    )
    run_at: datetime | None = Field(
        default=None,
        description="Run no earlier than this time (ISO 8601; UTC if no offset); "
        "from 2000-01-01 to 366 days ahead.",
    )

    @model_validator(mode="after")
    def _one_way_to_delay(self) -> SubmitTask:
        if self.delay_s is not None and self.run_at is not None:
            raise ValueError("give delay_s or run_at, not both")
        return self

    @field_validator("run_at")
    @classmethod
    def _sane_run_at(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:  # an offset can push the far ends of the calendar out of range
            moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError as exc:
            raise ValueError("run_at is out of range") from exc
        if moment < MIN_RUN_AT:
            raise ValueError(f"run_at is before {MIN_RUN_AT.isoformat()}")
        if moment > utcnow() + timedelta(seconds=MAX_DELAY_S):
            raise ValueError(f"run_at is more than {MAX_DELAY_S // 86400} days ahead")
        return moment


class SubmitBatch(BaseModel):
    """Body of `POST /tasks/batch`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[SubmitTask] = Field(min_length=1, max_length=MAX_BATCH)


class Accepted(_Model):
    """The scheduler's answer to one submission over HTTP: `pending` (on its work queue),
    `delayed` or `blocked` (held by the scheduler), or `duplicate` (a known id)."""

    id: TaskId
    status: Literal["pending", "delayed", "blocked", "duplicate"]


class TaskError(_Model):
    """Why a task failed or was rejected: a machine-readable `type` and a human `message`."""

    type: str
    message: str


class TaskMessage(_Model):
    """The work item the scheduler puts on a pool's work queue (internal, but documented)."""

    v: Literal[1] = 1
    id: TaskId
    kind: Kind
    payload: JsonValue = None
    pool: Pool = "default"
    submitted_at: datetime
    correlation_id: str | None = None
    reply_to: str | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)
    requires: list[Tag] = Field(
        default=[], description="Capabilities the task needs (sorted, each once)."
    )
    attempt_offset: int = Field(
        default=0, ge=0, description="Attempts made before this message (retries republish it)."
    )
    returned: int = Field(
        default=0,
        ge=0,
        description=(
            "How many of those attempts a worker handed back on a graceful stop: they do "
            "not spend the task's retries (see `task.returned`)."
        ),
    )


class TaskResult(_Model):
    """One outcome of a task, published on `leveret.results` and to the producer's `reply_to`.

    Routing key on `leveret.results`: ``<status>.<pool>.<kind>``.
    """

    v: Literal[1] = 1
    id: str
    kind: str
    pool: str = "default"
    status: TaskStatus | Literal["duplicate"]
    result: JsonValue = None
    error: TaskError | None = None
    attempt: int = 0
    worker: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)


class AcceptedTask(_Model):
    """One task in a :class:`TasksAccepted` event.

    `status` is `pending` (on its work queue), `delayed` (held until `run_at`) or
    `blocked` (held until its `depends_on` complete); a held task is announced
    again with `pending` when the scheduler releases it.
    """

    id: TaskId
    kind: Kind
    pool: Pool
    submitted_at: datetime
    correlation_id: str | None = None
    status: Literal["pending", "delayed", "blocked"] = "pending"
    run_at: datetime | None = None
    depends_on: list[TaskId] = []
    requires: list[Tag] = []
    reply_to: str | None = Field(
        default=None,
        max_length=MAX_REPLY_TO,
        description="The producer's reply address: the tracker sends it the one terminal reply.",
    )


class TasksAccepted(_Model):
    """Event: the scheduler put these tasks on their work queues (status `pending`)."""

    type: Literal["tasks.accepted"] = "tasks.accepted"
    v: Literal[1] = 1
    tasks: list[AcceptedTask]


class EndedTask(_Model):
    """One task in a :class:`TasksEnded` event: its recorded (first) terminal outcome."""

    id: str
    status: Literal["completed", "failed", "cancelled"]
    error_type: str | None = None


class TasksEnded(_Model):
    """Event: the tracker committed these outcomes. Sent after its database commit,
    one event per batch; the scheduler releases or ends the tasks that wait for them."""

    type: Literal["tasks.ended"] = "tasks.ended"
    v: Literal[1] = 1
    tasks: list[EndedTask]


class StartedTask(_Model):
    """One task in a :class:`TasksStarted` event."""

    id: TaskId
    attempt: int
    started_at: datetime


class TasksStarted(_Model):
    """Event: a worker began these attempts (status `running`)."""

    type: Literal["tasks.started"] = "tasks.started"
    v: Literal[1] = 1
    worker: str
    tasks: list[StartedTask]


class TaskRetrying(_Model):
    """Event: an attempt failed and the task will run again after a broker-held delay."""

    type: Literal["task.retrying"] = "task.retrying"
    v: Literal[1] = 1
    id: TaskId
    attempt: int
    worker: str
    error: TaskError
    started_at: datetime
    retry_in_s: float
    retry_at: datetime
    at: datetime = Field(default_factory=utcnow)


class TaskReturned(_Model):
    """Event: a worker handed an attempt back to its queue without an outcome, on a
    graceful stop (the grace period ran out) or while it waited for a slot. The task
    is `pending` again; the attempt's outcome is `returned`, and it spends no retry."""

    type: Literal["task.returned"] = "task.returned"
    v: Literal[1] = 1
    id: TaskId
    attempt: int
    worker: str
    reason: str = Field(max_length=500)
    started_at: datetime | None = None
    at: datetime = Field(default_factory=utcnow)


class TaskProgress(_Model):
    """Event: a running attempt reported progress (`fraction` 0..1 and/or a message)."""

    type: Literal["task.progress"] = "task.progress"
    v: Literal[1] = 1
    id: TaskId
    attempt: int
    worker: str
    fraction: float | None = Field(default=None, ge=0, le=1)
    message: str | None = Field(default=None, max_length=1000)
    at: datetime = Field(default_factory=utcnow)


class CancelTask(_Model):
    """Command: cancel a task. A held or queued task never runs; a running attempt is
    stopped on its worker; a finished task is left as it is. Recorded `cancelled`."""

    type: Literal["task.cancel"] = "task.cancel"
    v: Literal[1] = 1
    id: TaskId
    reason: str = Field(default="cancelled on request", max_length=500)
    at: datetime = Field(default_factory=utcnow)


class KindLimit(_Model):
    """A cluster-wide limit on one kind: at most `max_running` attempts at once and/or
    at most `max_starts_per_s` starts per second, across all workers together."""

    max_running: int | None = Field(default=None, ge=1, le=100_000)
    max_starts_per_s: float | None = Field(default=None, gt=0, le=100_000)


class WorkerInfo(_Model):
    """What a worker says about itself when it starts."""

    id: str
    host: str
    pid: int
    pool: Pool
    concurrency: int
    kinds: list[str]
    capabilities: list[str] = []
    limits: dict[str, KindLimit] = {}
    version: str


class _WorkerNews(_Model):
    """A worker's news as the tracker hears it: `at` becomes the time it was received
    (liveness never trusts the sender's clock); :attr:`sent_at` keeps when the worker
    says it sent it, never later than that, to tell news sent before a fence from
    news sent after it. Not part of the message."""

    _sent_at: datetime | None = PrivateAttr(default=None)

    @property
    def sent_at(self) -> datetime:
        return self._sent_at or self.at  # type: ignore[attr-defined]

    def heard(self, at: datetime) -> Self:
        """This news as received at `at` (see the class docstring)."""
        copy = self.model_copy(update={"at": at})
        copy._sent_at = min(self.sent_at, at)
        return copy


class WorkerStarted(_WorkerNews):
    """Event: a worker registered."""

    type: Literal["worker.started"] = "worker.started"
    v: Literal[1] = 1
    worker: WorkerInfo
    at: datetime = Field(default_factory=utcnow)


class WorkerHeartbeat(_WorkerNews):
    """Event: a worker is alive; sent every heartbeat interval."""

    type: Literal["worker.heartbeat"] = "worker.heartbeat"
    v: Literal[1] = 1
    worker: WorkerInfo
    in_flight: list[str] = []
    completed: int = 0
    failed: int = 0
    at: datetime = Field(default_factory=utcnow)


class WorkerStopped(_Model):
    """Event: a worker deregistered on a graceful stop."""

    type: Literal["worker.stopped"] = "worker.stopped"
    v: Literal[1] = 1
    worker: str
    at: datetime = Field(default_factory=utcnow)


class SchedulerStarted(_Model):
    """Event: a scheduler started; workers answer by announcing themselves again."""

    type: Literal["scheduler.started"] = "scheduler.started"
    v: Literal[1] = 1
    at: datetime = Field(default_factory=utcnow)


class RequirementsDeclared(_Model):
    """Record on the `requirements` stream: the scheduler routes tasks that need exactly
    these capabilities, in this pool, to a queue of their own. Workers read the stream
    from its start and consume every such queue whose tags they all have."""

    type: Literal["requirements.declared"] = "requirements.declared"
    v: Literal[1] = 1
    pool: Pool
    requires: list[Tag] = Field(min_length=1, max_length=MAX_REQUIRES)
    at: datetime = Field(default_factory=utcnow)


Event = Annotated[
    TasksAccepted
    | TasksEnded
    | TasksStarted
    | TaskRetrying
    | TaskReturned
    | TaskProgress
    | CancelTask
    | WorkerStarted
    | WorkerHeartbeat
    | WorkerStopped
    | SchedulerStarted,
    Field(discriminator="type"),
]


_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def decode_event(body: bytes) -> Event:
    """Parse any message from `leveret.events` (discriminated by its `type` field)."""
    return _EVENT_ADAPTER.validate_json(body)


#: Every model whose JSON Schema is published in docs/schema/, by file stem.
PUBLISHED_MODELS: dict[str, type[BaseModel]] = {
    "submit-task": SubmitTask,
    "submit-batch": SubmitBatch,
    "accepted": Accepted,
    "task-message": TaskMessage,
    "task-result": TaskResult,
    "tasks-accepted": TasksAccepted,
    "tasks-ended": TasksEnded,
    "tasks-started": TasksStarted,
    "task-retrying": TaskRetrying,
    "task-returned": TaskReturned,
    "task-progress": TaskProgress,
    "cancel-task": CancelTask,
    "worker-started": WorkerStarted,
    "worker-heartbeat": WorkerHeartbeat,
    "worker-stopped": WorkerStopped,
    "scheduler-started": SchedulerStarted,
    "requirements-declared": RequirementsDeclared,
}
