"""The tracker's store: SQLAlchemy 2 async Core on SQLite (default) or PostgreSQL.

:meth:`TrackerStore.apply` writes one batch of messages in ONE transaction: it
loads the rows the batch touches, applies the messages in order with the pure
functions of :mod:`leveret.tracker.state`, and writes only what changed.
:meth:`TrackerStore.declare_dead` records a watchdog verdict the same way. Such
read-modify-write transactions run one at a time: an asyncio lock serialises the
writers of one process (consumer, dead letters, watchdog), and on PostgreSQL a
transaction-level advisory lock serialises several tracker replicas, so no two
ever read-modify-write the same task at once. Applying a batch again is a no-op
(redeliveries are expected).

A transaction that leaves a task owing its producer a reply marks it `owed` in the
same commit and hands the record back (:attr:`Applied.replies`); the sender marks it
`sent` once it went out (:meth:`TrackerStore.mark_replies_sent`); a redelivered
message hands back its task's reply still owed (``resend``; see
:mod:`leveret.tracker.replies`).

Retention (:mod:`leveret.tracker.purge`) deletes in small write transactions of the
same kind, so a batch of messages waits for at most one purge batch.

Every method raises only leveret's errors: SQLAlchemy and driver errors are mapped
by :func:`leveret.db.map_db_errors` (:class:`~leveret.errors.StoreUnavailable` is
worth retrying, :class:`~leveret.errors.StoreError` is not).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from loguru import logger
from sqlalchemy import Connection, bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from leveret.batching import chunks
from leveret.contracts import EndedTask, TaskStatus, utcnow
from leveret.db import Transactions, create_engine, insert_for, map_db_errors
from leveret.tracker.ledger import Ledger, TaskChange, load_ids
from leveret.tracker.purge import (
    PurgedTask,
    drop_workers,
    find_purged,
    forget_purged,
    purge_tasks,
)
from leveret.tracker.state import (
    Attempt,
    ReplyState,
    TaskRecord,
    TrackerMessage,
    WorkerCounters,
)
from leveret.tracker.stats import Stats, task_figures
from leveret.tracker.tables import (
    attempt_row,
    attempts,
    task_row,
    tasks,
    to_attempt,
    to_counters,
    to_task,
    to_worker,
    upgrade,
    worker_counters,
    worker_row,
    workers,
)
from leveret.tracker.workers import (
    Death,
    WorkerRecord,
    WorkerState,
    WorkerView,
    worker_state,
)

# SQLite caps bound parameters per statement; stay well below.
_IN_CHUNK = 500
#: Key of the PostgreSQL advisory lock that serialises batches across replicas.
_APPLY_LOCK = 0x6C657665  # "leve"
MAX_PAGE = 1000


class InvalidCursor(ValueError):
    """A `cursor` that this store did not hand out."""


@dataclass(frozen=True)
class TaskPage:
    """One page of tasks, newest first, and the cursor of the next page (None at the end)."""

    tasks: list[TaskRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class Applied:
    """What one batch changed, the outcomes to tell the scheduler (`tasks.ended`), and
    the tasks whose reply to their producer it left owed (to send after the commit)."""

    transitions: int
    workers: int
    ended: tuple[EndedTask, ...] = ()
    replies: tuple[TaskRecord, ...] = ()


T = TypeVar("T")


def _serialised(conn: Connection, fn: Callable[..., T], *args: Any) -> T:
    """`fn(conn, *args)` after, on PostgreSQL, the advisory lock that serialises the
    writes of several tracker replicas (taken before anything is read)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPLY_LOCK})
    return fn(conn, *args)


def _mark_sent(conn: Connection, task_ids: Sequence[str], at: datetime) -> int:
    """Mark these tasks' owed replies sent; how many were owed."""
    marked = 0
    for part in chunks(task_ids, _IN_CHUNK):
        done = conn.execute(
            update(tasks)
            .where(tasks.c.id.in_(part), tasks.c.reply == ReplyState.OWED.value)
            .values(reply=ReplyState.SENT.value, reply_at=at)
        )
        marked += done.rowcount
    return marked


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


class TrackerStore:
    """Task, attempt and worker records, on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine, *, heartbeat_timeout_s: float = 5.0) -> None:
        self.engine = engine
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._write_lock = asyncio.Lock()
        self._transactions = Transactions(engine)

    @classmethod
    async def open(cls, url: str, *, heartbeat_timeout_s: float = 5.0) -> TrackerStore:
        """Connect and create the tables if needed."""
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
        return cls(engine, heartbeat_timeout_s=heartbeat_timeout_s)

    async def close(self) -> None:
        """Release the connection pools."""
        await self._transactions.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raise :class:`~leveret.errors.StoreUnavailable` if the database cannot be reached."""
        async with self._reading() as conn:
            await conn.execute(select(1))

    # writing

    async def apply(
        self,
        messages: Sequence[TrackerMessage],
        *,
        resend: Collection[str] = (),
        sent: Collection[str] = (),
    ) -> Applied:
        """Apply a batch of messages, in order, in one transaction. `replies` holds the
        tasks that came to owe a reply, and those of the `resend` ids (tasks named by
        redelivered messages) whose reply is still owed: a tracker that died after the
        commit may not have sent it. `sent`: tasks whose replies went out since the last
        transaction, marked sent in this one (after the batch is applied)."""
        task_ids, worker_ids = load_ids(messages)
        ledger, transitions = await self._write_txn(
            self._apply_txn, messages, task_ids, worker_ids, sorted(set(sent))
        )
        _log_notes(ledger)
        return Applied(
            transitions,
            len(ledger.changed_workers()),
            tuple(ledger.ended(messages)),
            tuple(ledger.owed_replies(resend)),
        )

    def _apply_txn(
        self,
        conn: Connection,
        messages: Sequence[TrackerMessage],
        task_ids: set[str],
        worker_ids: set[str],
        sent: list[str],
    ) -> tuple[Ledger, int]:
        ledger = self._ledger(conn, task_ids, worker_ids)
        transitions = 0
        for message in messages:
            for change in ledger.apply(message):
                transitions += 1
                _log_change(change)
        self._write(conn, ledger)
        if sent:
            _mark_sent(conn, sent, utcnow())
        return ledger, transitions

    async def declare_dead(self, worker_id: str, at: datetime, death: Death) -> int:
        """Record the watchdog's verdict in ONE transaction. When the worker's deliveries
        were released (`death.releases`), each of its attempts without an outcome becomes
        `fenced` (or `lost`, for a worker that was gone) and every non-terminal task whose
        current attempt was one of them is `pending` again. Returns how many tasks went
        back to pending."""
        changes = await self._write_txn(self._declare_dead_txn, worker_id, at, death)
        return sum(1 for c in changes if c.after is TaskStatus.PENDING)

    def _declare_dead_txn(
        self, conn: Connection, worker_id: str, at: datetime, death: Death
    ) -> list[TaskChange]:
        task_ids: set[str] = set()
        if death.releases:
            query = select(attempts.c.task_id).where(
                attempts.c.worker == worker_id, attempts.c.outcome.is_(None)
            )
            task_ids = set(conn.scalars(query.distinct()).all())
        ledger = self._ledger(conn, task_ids, {worker_id})
        changes = ledger.declare_dead(worker_id, at, death)
        for change in changes:
            _log_change(change)
        self._write(conn, ledger)
        return changes

    async def silent_workers(self, cutoff: datetime) -> list[WorkerRecord]:
        """Workers last heard from before `cutoff` whose deliveries were not released yet
        (the watchdog's candidates; it decides with :func:`leveret.tracker.workers.overdue`)."""
        query = select(workers).where(
            workers.c.last_seen < cutoff,
            (workers.c.death.is_(None)) | (workers.c.death == Death.UNFENCED.value),
        )
        async with self._reading() as conn:
            return [to_worker(r) for r in await conn.execute(query)]

    async def mark_replies_sent(self, task_ids: Sequence[str], at: datetime) -> int:
        """Record that the replies of these tasks were confirmed sent; returns how many
        were still owed. A write like any other (one at a time), so no batch that loaded
        a task as `owed` writes it back over the mark."""
        return await self._write_txn(_mark_sent, sorted(set(task_ids)), at)

    async def _write_txn(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` as one write transaction, one at a time, like
        :meth:`_writing` (and as cheaply as :class:`leveret.db.Transactions` runs it)."""
        with map_db_errors():
            async with self._write_lock:
                return await self._transactions.run(_serialised, fn, *args)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A read-modify-write transaction, one at a time: in this process (the consumer,
        the watchdog and the dead-letter consumer write concurrently) and, on PostgreSQL,
        across tracker replicas (an advisory lock taken before anything is read)."""
        with map_db_errors():
            async with self._write_lock, self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPLY_LOCK})
                yield conn

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection; database errors mapped like a write's."""
        with map_db_errors():
            async with self.engine.connect() as conn:
                yield conn

    # retention

    async def purge_finished(self, cutoff: datetime, now: datetime, limit: int) -> int:
        """Purge up to `limit` finished tasks that ended before `cutoff`, in one write
        transaction (see :mod:`leveret.tracker.purge`); returns how many."""
        async with self._writing() as conn:
            return await purge_tasks(conn, cutoff, now, limit)

    async def forget_purged(self, cutoff: datetime, limit: int) -> int:
        """Forget up to `limit` ids purged before `cutoff` (then answered 404, not 410)."""
        async with self._writing() as conn:
            return await forget_purged(conn, cutoff, limit)

    async def drop_workers(self, cutoff: datetime, limit: int) -> list[str]:
        """Drop up to `limit` registrations of workers stopped, fenced or gone before
        `cutoff` and silent since; returns their ids."""
        async with self._writing() as conn:
            return await drop_workers(conn, cutoff, limit)

    async def purged_task(self, task_id: str) -> PurgedTask | None:
        """What is remembered of a purged task, or None."""
        async with self._reading() as conn:
            return await find_purged(conn, task_id)

    def _ledger(self, conn: Connection, task_ids: set[str], worker_ids: set[str]) -> Ledger:
        """Load what a transaction touches."""
        return Ledger(
            self._load_tasks(conn, sorted(task_ids)),
            self._load_workers(conn, sorted(worker_ids)),
            self.heartbeat_timeout_s,
        )

    def _load_tasks(self, conn: Connection, ids: list[str]) -> dict[str, TaskRecord]:
        rows: dict[str, Any] = {}
        history: dict[str, list[Attempt]] = defaultdict(list)
        for part in chunks(ids, _IN_CHUNK):
            for row in conn.execute(select(tasks).where(tasks.c.id.in_(part))):
                rows[row.id] = row
            query = select(attempts).where(attempts.c.task_id.in_(part))
            for row in conn.execute(query.order_by(attempts.c.attempt)):
                history[row.task_id].append(to_attempt(row))
        return {i: to_task(row, tuple(history.get(i, ()))) for i, row in rows.items()}

    def _load_workers(self, conn: Connection, ids: list[str]) -> dict[str, WorkerRecord]:
        loaded: dict[str, WorkerRecord] = {}
        for part in chunks(ids, _IN_CHUNK):
            for row in conn.execute(select(workers).where(workers.c.id.in_(part))):
                loaded[row.id] = to_worker(row)
        return loaded

    def _write(self, conn: Connection, ledger: Ledger) -> None:
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
            conn.execute(tasks.insert(), new)
        if changed:
            conn.execute(update(tasks).where(tasks.c.id == bindparam("b_id")), changed)
        if history:
            stmt = insert_for(conn, attempts)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["task_id", "attempt"],
                    set_={
                        c: stmt.excluded[c]
                        for c in ("worker", "started_at", "finished_at", "outcome")
                    },
                ),
                history,
            )
        self._write_workers(conn, ledger)

    def _write_workers(self, conn: Connection, ledger: Ledger) -> None:
        changed = [worker_row(w) for w in ledger.changed_workers()]
        if changed:
            stmt = insert_for(conn, workers)
            columns = [c for c in changed[0] if c != "id"]
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"], set_={c: stmt.excluded[c] for c in columns}
                ),
                changed,
            )
        if ledger.counters:
            stmt = insert_for(conn, worker_counters)
            c = worker_counters.c
            conn.execute(
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
        async with self._reading() as conn:
            found = await conn.run_sync(self._load_tasks, [task_id])
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
        async with self._reading() as conn:
            rows = list(await conn.execute(query))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].seq) if more else None
        return TaskPage([to_task(r) for r in rows], next_cursor)

    async def list_workers(self, now: datetime) -> list[WorkerView]:
        """Every registered worker with its state at `now` and its recorded results."""
        async with self._reading() as conn:
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
        async with self._reading() as conn:
            figures = await task_figures(conn, now)
            counters = await self._counters(conn)
        registered = {w.id: w for w in await self.list_workers(now)}
        views = list(registered.values()) + [
            WorkerView(None, wid, WorkerState.UNKNOWN, n)
            for wid, n in sorted(counters.items())
            if wid not in registered
        ]
        return replace(figures, workers=views)


def _log_notes(ledger: Ledger) -> None:
    """INFO lines for worker state changes and ignored messages of fenced attempts; a
    WARNING for a fenced registration that is heard from again."""
    for worker_id, dead_at in ledger.revived:
        logger.bind(worker=worker_id).warning(
            "worker {} was fenced at {} and is heard from again: watched again",
            worker_id,
            dead_at.isoformat(),
        )
    for worker_id, note in ledger.worker_notes:
        logger.info("worker {worker} {note}", worker=worker_id, note=note)
    for f in ledger.fenced:
        logger.info(
            "late {what} of fenced attempt {attempt} of task {task} from worker {worker} ignored",
            what=f.what,
            attempt=f.attempt,
            task=f.task_id,
            worker=f.worker,
        )


def _log_change(change: TaskChange) -> None:
    """One DEBUG line per status change (loguru returns at once when DEBUG is off)."""
    logger.debug(
        "task {task_id} {before} -> {after}",
        task_id=change.task_id,
        before=change.before or "new",
        after=change.after,
    )
