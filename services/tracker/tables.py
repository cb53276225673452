"""The tracker's tables and the conversion between rows and :mod:`leveret.tracker.state` records.

Timestamps are stored as UTC (naive on SQLite, ``timestamptz`` on PostgreSQL) and
always read back timezone-aware. :func:`upgrade` brings a database made by an
older version up to date (it only ever adds nullable columns and indexes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Row

from leveret.contracts import TaskStatus
from leveret.db import UtcDateTime, add_missing_columns
from leveret.tracker.state import (
    Attempt,
    AttemptOutcome,
    Progress,
    ReplyState,
    TaskRecord,
    WorkerCounters,
)
from leveret.tracker.workers import Death, WorkerRecord

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    # Insertion order: the cursor of `GET /tasks` (newest first).
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("id", String(200), nullable=False, unique=True),
    Column("kind", String(128)),
    Column("pool", String(64)),
    Column("status", String(16), nullable=False),
    Column("result", JSON),
    Column("error_type", String(200)),
    Column("error_message", Text),
    Column("attempt", Integer, nullable=False, default=0),
    Column("worker", String(200)),
    Column("correlation_id", String(200)),
    Column("submitted_at", UtcDateTime),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime, index=True),
    Column("retry_at", UtcDateTime),
    Column("run_at", UtcDateTime),  # a delayed task's due time
    Column("depends_on", JSON),  # the ids a blocked task waits for
    Column("progress", JSON),  # the current attempt's latest report: fraction, message, at
    Column("requires", JSON),  # the capabilities a worker needs to run it
    # The producer's reply address, and where its one reply stands (owed, sent) since when.
    Column("reply_to", String(255)),
    Column("reply", String(8)),
    Column("reply_at", UtcDateTime),
)

attempts = Table(
    "attempts",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("worker", String(200)),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("outcome", String(16)),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pool", String(64), nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("kinds", JSON, nullable=False),
    Column("capabilities", JSON, nullable=False),
    Column("version", String(64), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("last_seen", UtcDateTime, nullable=False),
    Column("in_flight", JSON, nullable=False),
    Column("stopped_at", UtcDateTime),
    # Set by the watchdog; `death` says whether anything may revive the worker.
    Column("dead_at", UtcDateTime),
    Column("death", String(16)),
)

#: Recorded results per worker id, incremented as they are recorded (cheap to read).
worker_counters = Table(
    "worker_counters",
    metadata,
    Column("worker", String(200), primary_key=True),
    Column("completed", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
    Column("busy_s", Float, nullable=False, default=0.0),
)

#: Tasks purged by retention, per status (added in the purge's transaction): `/stats`
#: totals stay right. `first_at` is the earliest time of a purged task (for throughput).
purged_counts = Table(
    "purged_counts",
    metadata,
    Column("status", String(16), primary_key=True),
    Column("purged", BigInteger, nullable=False, default=0),
    Column("first_at", UtcDateTime),
)

#: The ids of purged tasks, kept for one more retention period so that the API answers
#: 410 (purged) rather than 404 (never heard of); a few dozen bytes each.
purged_tasks = Table(
    "purged_tasks",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("finished_at", UtcDateTime),
    Column("purged_at", UtcDateTime, nullable=False, index=True),
    sqlite_with_rowid=False,
)

# Filter by status or kind, newest first, without a sort.
Index("ix_tasks_status_seq", tasks.c.status, tasks.c.seq)
Index("ix_tasks_kind_seq", tasks.c.kind, tasks.c.seq)
# The watchdog finds a dead worker's open attempts.
Index("ix_attempts_worker_outcome", attempts.c.worker, attempts.c.outcome)


def upgrade(conn: Connection) -> None:
    """Create what is missing: tables, then nullable columns and indexes added since."""
    add_missing_columns(conn, metadata)


def task_row(record: TaskRecord) -> dict[str, Any]:
    """The `tasks` row of a record (without `seq`)."""
    return {
        "id": record.id,
        "kind": record.kind,
        "pool": record.pool,
        "status": record.status.value,
        "result": record.result,
        "error_type": record.error_type,
        "error_message": record.error_message,
        "attempt": record.attempt,
        "worker": record.worker,
        "correlation_id": record.correlation_id,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "retry_at": record.retry_at,
        "run_at": record.run_at,
        "depends_on": list(record.depends_on) or None,
        "progress": _progress_json(record.progress),
        "requires": list(record.requires) or None,
        "reply_to": record.reply_to,
        "reply": record.reply.value if record.reply is not None else None,
        "reply_at": record.reply_at,
    }


def attempt_row(task_id: str, entry: Attempt) -> dict[str, Any]:
    """The `attempts` row of one history entry."""
    return {
        "task_id": task_id,
        "attempt": entry.attempt,
        "worker": entry.worker,
        "started_at": entry.started_at,
        "finished_at": entry.finished_at,
        "outcome": entry.outcome.value if entry.outcome is not None else None,
    }


def worker_row(record: WorkerRecord) -> dict[str, Any]:
    """The `workers` row of a record."""
    return {
        "id": record.id,
        "host": record.host,
        "pid": record.pid,
        "pool": record.pool,
        "concurrency": record.concurrency,
        "kinds": list(record.kinds),
        "capabilities": list(record.capabilities),
        "version": record.version,
        "started_at": record.started_at,
        "last_seen": record.last_seen,
        "in_flight": list(record.in_flight),
        "stopped_at": record.stopped_at,
        "dead_at": record.dead_at,
        "death": record.death.value if record.death is not None else None,
    }


def to_task(row: Row[Any], history: tuple[Attempt, ...] = ()) -> TaskRecord:
    """A record from a `tasks` row and its attempts."""
    return TaskRecord(
        id=row.id,
        status=TaskStatus(row.status),
        kind=row.kind,
        pool=row.pool,
        result=row.result,
        error_type=row.error_type,
        error_message=row.error_message,
        attempt=row.attempt,
        worker=row.worker,
        correlation_id=row.correlation_id,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        retry_at=row.retry_at,
        attempts=history,
        run_at=row.run_at,
        depends_on=tuple(row.depends_on or ()),
        progress=_progress_of(row.progress),
        requires=tuple(row.requires or ()),
        reply_to=row.reply_to,
        reply=ReplyState(row.reply) if row.reply is not None else None,
        reply_at=row.reply_at,
    )


def _progress_json(progress: Progress | None) -> dict[str, Any] | None:
    if progress is None:
        return None
    return {
        "fraction": progress.fraction,
        "message": progress.message,
        "at": _utc(progress.at).isoformat(),
    }


def _progress_of(value: Any) -> Progress | None:
    if not isinstance(value, dict):
        return None
    return Progress(
        value.get("fraction"), value.get("message"), _utc(datetime.fromisoformat(value["at"]))
    )


def _utc(moment: datetime) -> datetime:
    """`moment` aware, in UTC, like every other timestamp (naive is taken as UTC): the
    progress time lives in a JSON column, which UtcDateTime does not cover."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def to_attempt(row: Row[Any]) -> Attempt:
    """A history entry from an `attempts` row."""
    return Attempt(
        attempt=row.attempt,
        worker=row.worker,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=AttemptOutcome(row.outcome) if row.outcome is not None else None,
    )


def to_worker(row: Row[Any]) -> WorkerRecord:
    """A record from a `workers` row."""
    return WorkerRecord(
        id=row.id,
        host=row.host,
        pid=row.pid,
        pool=row.pool,
        concurrency=row.concurrency,
        kinds=tuple(row.kinds),
        capabilities=tuple(row.capabilities),
        version=row.version,
        started_at=row.started_at,
        last_seen=row.last_seen,
        in_flight=tuple(row.in_flight),
        stopped_at=row.stopped_at,
        dead_at=row.dead_at,
        death=Death(row.death) if row.death is not None else None,
    )


def to_counters(row: Row[Any]) -> WorkerCounters:
    """Counters from a `worker_counters` row."""
    return WorkerCounters(completed=row.completed, failed=row.failed, busy_s=row.busy_s)
