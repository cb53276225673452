"""The tracker's store: SQLAlchemy 2 async Core on SQLite (default) or PostgreSQL.

:meth:`TrackerStore.apply` writes one batch of messages in ONE transaction: it
loads the rows the batch touches, applies the messages in order with the pure
functions of :mod:`leveret.tracker.state`, and writes only what changed. On
PostgreSQL a transaction-level advisory lock serialises batches of several
tracker replicas, so two of them never read-modify-write the same task at once.
Applying a batch again is a no-op (redeliveries are expected).
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from loguru import logger
from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from leveret.contracts import TaskStatus
from leveret.db import create_engine, insert_for
from leveret.tracker.state import (
    Attempt,
    Ledger,
    TaskChange,
    TaskRecord,
    TrackerMessage,
    WorkerCounters,
    WorkerRecord,
    WorkerState,
    load_ids,
    worker_state,
)
from leveret.tracker.tables import (
    attempt_row,
    attempts,
    metadata,
    task_row,
    tasks,
    to_attempt,
    to_counters,
    to_task,
    to_worker,
    worker_counters,
    worker_row,
    workers,
)

# SQLite caps bound parameters per statement; stay well below.
_IN_CHUNK = 500
#: Key of the PostgreSQL advisory lock that serialises batches across replicas.
_APPLY_LOCK = 0x6C657665  # "leve"
#: Terminal tasks sampled (newest first) for latency percentiles.
LATENCY_SAMPLE = 10_000
THROUGHPUT_WINDOW_S = 60.0
MAX_PAGE = 1000

_FINISHED_WORK = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)
_RAN = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)


class InvalidCursor(ValueError):
    """A `cursor` that this store did not hand out."""


@dataclass(frozen=True)
class TaskPage:
    """One page of tasks, newest first, and the cursor of the next page (None at the end)."""

    tasks: list[TaskRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class WorkerView:
    """A worker with its state at read time and its recorded results."""

    record: WorkerRecord | None
    id: str
    state: WorkerState
    counters: WorkerCounters


@dataclass(frozen=True)
class Stats:
    """Counts, throughput, latency and per-worker totals."""

    counts: dict[TaskStatus, int]
    throughput_60s: float
    throughput_overall: float
    latency_s: dict[str, float | None]
    latency_sample: int
    workers: list[WorkerView] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Every task the tracker knows."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class Applied:
    """What one batch changed."""

    transitions: int
    workers: int


def encode_cursor(seq: int) -> str:
    """An opaque cursor for the page after the task with this `seq`."""
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The `seq` inside a cursor; raises :class:`InvalidCursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        if prefix != "seq":
            raise ValueError(raw)
        return int(number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (0 < p ≤ 100) of ascending values; None when empty."""
    if not sorted_values:
        return None
    index = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[index]


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield ids[start : start + _IN_CHUNK]


class TrackerStore:
    """Task, attempt and worker records, on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine, *, heartbeat_timeout_s: float = 5.0) -> None:
        self.engine = engine
        self.heartbeat_timeout_s = heartbeat_timeout_s

    @classmethod
    async def open(cls, url: str, *, heartbeat_timeout_s: float = 5.0) -> TrackerStore:
        """Connect and create the tables if needed."""
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        return cls(engine, heartbeat_timeout_s=heartbeat_timeout_s)

    async def close(self) -> None:
        """Release the connection pool."""
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self.engine.connect() as conn:
            await conn.execute(select(1))

    # writing

    async def apply(self, messages: Sequence[TrackerMessage]) -> Applied:
        """Apply a batch of messages, in order, in one transaction."""
        task_ids, worker_ids = load_ids(messages)
        async with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPLY_LOCK})
            ledger = Ledger(
                await self._load_tasks(conn, sorted(task_ids)),
                await self._load_workers(conn, sorted(worker_ids)),
                self.heartbeat_timeout_s,
            )
            transitions = 0
            for message in messages:
                for change in ledger.apply(message):
                    transitions += 1
                    _log_change(change)
            await self._write(conn, ledger)
        for worker_id, note in ledger.worker_notes:
            logger.info("worker {worker} {note}", worker=worker_id, note=note)
        return Applied(transitions, len(ledger.changed_workers()))

    async def _load_tasks(self, conn: AsyncConnection, ids: list[str]) -> dict[str, TaskRecord]:
        rows: dict[str, Any] = {}
        history: dict[str, list[Attempt]] = defaultdict(list)
        for part in _chunks(ids):
            for row in await conn.execute(select(tasks).where(tasks.c.id.in_(part))):
                rows[row.id] = row
            query = select(attempts).where(attempts.c.task_id.in_(part))
            for row in await conn.execute(query.order_by(attempts.c.attempt)):
                history[row.task_id].append(to_attempt(row))
        return {i: to_task(row, tuple(history.get(i, ()))) for i, row in rows.items()}

    async def _load_workers(self, conn: AsyncConnection, ids: list[str]) -> dict[str, WorkerRecord]:
        loaded: dict[str, WorkerRecord] = {}
        for part in _chunks(ids):
            for row in await conn.execute(select(workers).where(workers.c.id.in_(part))):
                loaded[row.id] = to_worker(row)
        return loaded

    async def _write(self, conn: AsyncConnection, ledger: Ledger) -> None:
        new: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        for loaded, now in ledger.changed_tasks():
            row = task_row(now)
            if loaded is None:
                new.append(row)
            else:
                row["b_id"] = row.pop("id")
                changed.append(row)
            old = set(loaded.attempts) if loaded is not None else set()
            history += [attempt_row(now.id, a) for a in now.attempts if a not in old]
        if new:
            await conn.execute(tasks.insert(), new)
        if changed:
            await conn.execute(update(tasks).where(tasks.c.id == bindparam("b_id")), changed)
        if history:
            stmt = insert_for(self.engine, attempts)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["task_id", "attempt"],
                    set_={
                        c: stmt.excluded[c]
                        for c in ("worker", "started_at", "finished_at", "outcome")
                    },
                ),
                history,
            )
        await self._write_workers(conn, ledger)

    async def _write_workers(self, conn: AsyncConnection, ledger: Ledger) -> None:
        changed = [worker_row(w) for w in ledger.changed_workers()]
        if changed:
            stmt = insert_for(self.engine, workers)
            columns = [c for c in changed[0] if c != "id"]
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"], set_={c: stmt.excluded[c] for c in columns}
                ),
                changed,
            )
        if ledger.counters:
            stmt = insert_for(self.engine, worker_counters)
            c = worker_counters.c
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["worker"],
                    set_={
                        "completed": c.completed + stmt.excluded.completed,
                        "failed": c.failed + stmt.excluded.failed,
                        "busy_s": c.busy_s + stmt.excluded.busy_s,
                    },
                ),
                [
                    {"worker": w, "completed": n.completed, "failed": n.failed, "busy_s": n.busy_s}
                    for w, n in ledger.counters.items()
                ],
            )

    # reading

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """One task with its attempt history, or None if the tracker never heard of it."""
        async with self.engine.connect() as conn:
            found = await self._load_tasks(conn, [task_id])
        return found.get(task_id)

    async def list_tasks(
        self,
        *,
        status: TaskStatus | None = None,
        kind: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks newest first, filtered by status and kind; raises :class:`InvalidCursor`."""
        limit = max(1, min(limit, MAX_PAGE))
        query = select(tasks).order_by(tasks.c.seq.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        if kind is not None:
            query = query.where(tasks.c.kind == kind)
        if cursor is not None:
            query = query.where(tasks.c.seq < decode_cursor(cursor))
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].seq) if more else None
        return TaskPage([to_task(r) for r in rows], next_cursor)

    async def list_workers(self, now: datetime) -> list[WorkerView]:
        """Every registered worker with its state at `now` and its recorded results."""
        async with self.engine.connect() as conn:
            records = [to_worker(r) for r in await conn.execute(select(workers))]
            counters = await self._counters(conn)
        return [
            WorkerView(
                w,
                w.id,
                worker_state(w, now, self.heartbeat_timeout_s),
                counters.get(w.id, WorkerCounters()),
            )
            for w in sorted(records, key=lambda w: w.id)
        ]

    async def _counters(self, conn: AsyncConnection) -> dict[str, WorkerCounters]:
        rows = await conn.execute(select(worker_counters))
        return {r.worker: to_counters(r) for r in rows}

    async def stats(self, now: datetime) -> Stats:
        """Counts by status, throughput, latency percentiles and per-worker totals at `now`."""
        async with self.engine.connect() as conn:
            grouped = await conn.execute(
                select(tasks.c.status, func.count()).group_by(tasks.c.status)
            )
            counts = {s: 0 for s in TaskStatus}
            for status, n in grouped:
                counts[TaskStatus(status)] = n
            recent = await conn.scalar(
                select(func.count()).where(
                    tasks.c.status.in_(_FINISHED_WORK),
                    tasks.c.finished_at >= now - timedelta(seconds=THROUGHPUT_WINDOW_S),
                )
            )
            overall = await self._overall_throughput(conn, counts)
            latencies = await self._latency_sample(conn)
            counters = await self._counters(conn)
        registered = {w.id: w for w in await self.list_workers(now)}
        views = list(registered.values()) + [
            WorkerView(None, wid, WorkerState.UNKNOWN, n)
            for wid, n in sorted(counters.items())
            if wid not in registered
        ]
        return Stats(
            counts=counts,
            throughput_60s=(recent or 0) / THROUGHPUT_WINDOW_S,
            throughput_overall=overall,
            latency_s={f"p{p}": percentile(latencies, p) for p in (50, 95, 99)},
            latency_sample=len(latencies),
            workers=views,
        )

    async def _overall_throughput(
        self, conn: AsyncConnection, counts: dict[TaskStatus, int]
    ) -> float:
        """Completed+failed per second from the first recorded task to the last finish."""
        done = counts[TaskStatus.COMPLETED] + counts[TaskStatus.FAILED]
        if not done:
            return 0.0
        first = (
            await conn.execute(
                select(tasks.c.submitted_at, tasks.c.started_at, tasks.c.finished_at)
                .order_by(tasks.c.seq)
                .limit(1)
            )
        ).first()
        last = await conn.scalar(
            select(func.max(tasks.c.finished_at)).where(tasks.c.status.in_(_FINISHED_WORK))
        )
        start = next((t for t in first or () if t is not None), None)
        if start is None or last is None:
            return 0.0
        span = (last - start).total_seconds()
        return done / span if span > 0 else 0.0

    async def _latency_sample(self, conn: AsyncConnection) -> list[float]:
        """Submitted→finished seconds of the newest terminal tasks that ran, ascending."""
        rows = await conn.execute(
            select(tasks.c.submitted_at, tasks.c.finished_at)
            .where(tasks.c.status.in_(_RAN), tasks.c.submitted_at.is_not(None))
            .order_by(tasks.c.seq.desc())
            .limit(LATENCY_SAMPLE)
        )
        return sorted(
            max(0.0, (r.finished_at - r.submitted_at).total_seconds())
            for r in rows
            if r.finished_at is not None
        )


def _log_change(change: TaskChange) -> None:
    """One DEBUG line per status change (loguru returns at once when DEBUG is off)."""
    logger.debug(
        "task {task_id} {before} -> {after}",
        task_id=change.task_id,
        before=change.before or "new",
        after=change.after,
    )
