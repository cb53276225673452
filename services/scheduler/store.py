"""The scheduler's own store: the task ids it accepted, the tasks it holds, the kinds it knows.

A submission row moves through these states (every move a guarded UPDATE, so two
scheduler replicas sharing PostgreSQL never both take the same row)::

    claimed ──▶ dispatched                    (admitted, published, confirmed)
    delayed ──▶ releasing ──▶ dispatched      (due: the releaser takes it)
    blocked ──▶ releasing ──▶ dispatched      (every parent completed)
            ──▶ delayed                       (parents done, but not due yet)
            ──▶ failing ──▶ ended             (a parent did not complete)
    delayed, blocked ──▶ failing ──▶ ended    (cancelled while held)

A row is written (committed) before its work message is published and marked
dispatched once the broker confirmed it; a `claimed` or `releasing` row left by
a crash is dispatched again at the next start, a `failing` one has its result
published again. A dispatched row makes a resubmission of the same id a duplicate.
An AMQP submission without an id carries an `intake_key` (a digest of its delivery)
until its ack is recorded: a redelivery after a crash finds its task by that key.
Outcomes of tasks (`outcome`, `error_type`) are recorded from the results
exchange: the first terminal one counts, with the time it was recorded (`ended_at`).
`edges` says which task waits for which.

Retention (:meth:`SubmissionStore.purge`): a row whose task ended longer ago than
``LEVERET_RETENTION`` is deleted, with its edges, once nothing needs it: it is
`dispatched` or `ended`, its intake key is forgotten (or stale: its task ended
over :data:`INTAKE_KEY_MAX_AGE` ago), and every task waiting for it
is `dispatched` or `ended` too. Its id is then unknown: submitted again, it is a new
task; named in `depends_on`, an unknown parent. A blocked task whose parent was
purged between admission's lookup and its claim finds the parent gone
(:attr:`ParentOutcome.gone`) and ends `dependency_expired`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, inspect, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from leveret.batching import chunks
from leveret.contracts import TaskMessage, TaskStatus, utcnow
from leveret.db import (
    Transactions,
    UtcDateTime,
    add_missing_columns,
    create_engine,
    insert_for,
    map_db_errors,
)
from leveret.scheduler.holds import HOLD_THRESHOLD_S, ParentOutcome
from leveret.scheduler.tables import (
    BLOCKED,
    CLAIMED,
    DELAYED,
    DISPATCHED,
    ENDED,
    FAILING,
    RELEASING,
    SETTLED,
    edges,
    kinds,
    metadata,
    pools,
    requirement_sets,
    submissions,
)

# SQLite caps bound parameters per statement; stay well below.
_IN_CHUNK = 500
#: Rows one purge transaction examines (and deletes) at most: short, so writers never
#: wait long.
PURGE_BATCH = 500
#: An intake key this old is stale: a crash's unacked delivery comes back as soon as a
#: scheduler consumes again, so a key still set (a failed forget, a crash between ack
#: and forget, more acks than FORGET_MAX) no longer keeps its row from the purge, and
#: is cleared.
INTAKE_KEY_MAX_AGE = timedelta(hours=1)


@dataclass(frozen=True)
class Submission:
    """A task as the scheduler keeps it: its work message, and what holds it back."""

    message: TaskMessage
    depends_on: tuple[str, ...] = ()
    run_at: datetime | None = None
    #: Written with a new row only (see :meth:`SubmissionStore.unacked_intake`); not read back.
    intake_key: str | None = field(default=None, compare=False, repr=False)
    #: The submitting API token's id (:func:`leveret.auth.token_id`); written with a new row.
    owner: str | None = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        """The task id."""
        return self.message.id


@dataclass(frozen=True)
class Existing:
    """A submission already in the store."""

    id: str
    state: str
    submission: Submission


@dataclass(frozen=True)
class PurgeCursor:
    """Where a purge goes on: after the row that ended at `ended_at` with this id."""

    ended_at: datetime
    id: str


@dataclass(frozen=True)
class Blocked:
    """A blocked task and how each of its parents ended so far."""

    submission: Submission
    parents: dict[str, ParentOutcome]


@dataclass(frozen=True)
class Ending:
    """A blocked task that ends without running, and why."""

    id: str
    status: TaskStatus
    error_type: str
    message: str


#: How :meth:`SubmissionStore.blocked` reports a parent no longer in the store.
_GONE = ParentOutcome(None, gone=True)


def _has_ended_at(conn: Connection) -> bool:
    """Whether the submissions table exists with its `ended_at` column (added later)."""
    found = inspect(conn)
    if not found.has_table("submissions"):
        return True  # a new database: nothing to fill in
    return "ended_at" in {c["name"] for c in found.get_columns("submissions")}


def _submission(row: Any) -> Submission:
    deps = tuple(json.loads(row.depends_on)) if row.depends_on else ()
    return Submission(TaskMessage.model_validate_json(row.envelope), deps, row.run_at)


_ROW = (
    submissions.c.id,
    submissions.c.state,
    submissions.c.envelope,
    submissions.c.run_at,
    submissions.c.depends_on,
)


class SubmissionStore:
    """Claims, held tasks, outcomes and known kinds, on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._transactions = Transactions(engine)

    @classmethod
    async def open(cls, url: str) -> SubmissionStore:
        """Connect and create (or bring up to date) the tables."""
        engine = create_engine(url)
        async with engine.begin() as conn:
            had_ended_at = await conn.run_sync(_has_ended_at)
            await conn.run_sync(add_missing_columns, metadata)
            if not had_ended_at:
                # Tasks that ended before `ended_at` existed: their age counts from submission.
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.outcome.is_not(None), submissions.c.ended_at.is_(None))
                    .values(ended_at=submissions.c.created_at)
                )
        return cls(engine)

    async def close(self) -> None:
        """Release the connection pools."""
        await self._transactions.close()
        await self.engine.dispose()

    # admission

    async def lookup(self, ids: Iterable[str]) -> dict[str, ParentOutcome]:
        """The outcome so far of each of these ids the store knows (absent: unknown)."""
        found: dict[str, ParentOutcome] = {}
        async with self.engine.connect() as conn:
            found.update(await self._outcomes(conn, sorted(set(ids))))
        return found

    async def owner_of(self, task_id: str) -> str | None:
        """The id of the API token that submitted `task_id` (None: no token, or unknown)."""
        with map_db_errors():
            async with self.engine.connect() as conn:
                row = await conn.execute(
                    select(submissions.c.owner).where(submissions.c.id == task_id)
                )
                return row.scalar()

    async def claim(self, items: Sequence[tuple[Submission, str]]) -> dict[str, Existing]:
        """Write every (submission, state) whose id is new, with its dependency edges;
        return the ones that already existed (also those another scheduler replica
        wrote meanwhile: each id is new to exactly one claim)."""
        return await self._transactions.run(self._claim, list(items))

    def _claim(self, conn: Connection, items: list[tuple[Submission, str]]) -> dict[str, Existing]:
        existing: dict[str, Existing] = {}
        existing.update(self._existing(conn, [s.id for s, _ in items]))
        now = utcnow()
        fresh = [(s, state) for s, state in items if s.id not in existing]
        if fresh:
            write = (
                insert_for(conn, submissions)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(submissions.c.id)
            )
            result = conn.execute(
                write,
                [
                    {
                        "id": s.id,
                        "state": state,
                        "envelope": s.message.model_dump_json(),
                        "created_at": now,
                        "run_at": s.run_at,
                        "depends_on": json.dumps(list(s.depends_on)) if s.depends_on else None,
                        "intake_key": s.intake_key,
                        "owner": s.owner,
                    }
                    for s, state in fresh
                ],
            )
            written = set(result.scalars())
            # Written by another replica since the SELECT (its commit let ours skip them).
            existing.update(self._existing(conn, [s.id for s, _ in fresh if s.id not in written]))
            fresh = [(s, state) for s, state in fresh if s.id in written]
        links = [{"parent": p, "child": s.id} for s, _ in fresh for p in set(s.depends_on)]
        if links:
            stmt = insert_for(conn, edges).on_conflict_do_nothing(
                index_elements=["parent", "child"]
            )
            conn.execute(stmt, links)
        return existing

    def _existing(self, conn: Connection, ids: Sequence[str]) -> dict[str, Existing]:
        found: dict[str, Existing] = {}
        for part in chunks(ids, _IN_CHUNK):
            for row in conn.execute(select(*_ROW).where(submissions.c.id.in_(part))):
                found[row.id] = Existing(row.id, row.state, _submission(row))
        return found

    async def unacked_intake(self, key: str, limit: int = 64) -> list[str]:
        """The tasks, oldest first, written for an id-less AMQP submission with this intake
        key whose ack has not been recorded (see :meth:`forget_intake`)."""
        query = (
            select(submissions.c.id)
            .where(submissions.c.intake_key == key)
            .order_by(submissions.c.created_at, submissions.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list(await conn.scalars(query))

    async def forget_intake(self, ids: Iterable[str]) -> None:
        """Record that these tasks' intake deliveries were acked: a redelivery can no
        longer be theirs, so their intake keys go (one transaction)."""
        id_list = sorted(set(ids))
        if not id_list:
            return
        async with self.engine.begin() as conn:
            for part in chunks(id_list, _IN_CHUNK):
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id.in_(part), submissions.c.intake_key.is_not(None))
                    .values(intake_key=None)
                )

    async def clear_stale_intake(self, before: datetime, keep: Iterable[str] = ()) -> int:
        """Clear the intake keys of rows created before `before`, but `keep` (deliveries
        still being admitted); return how many."""
        query = (
            update(submissions)
            .where(submissions.c.intake_key.is_not(None), submissions.c.created_at < before)
            .values(intake_key=None)
        )
        kept = sorted(set(keep))
        if kept:
            query = query.where(submissions.c.id.not_in(kept))
        async with self.engine.begin() as conn:
            return (await conn.execute(query)).rowcount

    async def mark(self, ids: Iterable[str], state: str) -> None:
        """Move these rows to `state` (dispatched once confirmed; ended once published)."""
        id_list = list(ids)
        if id_list:
            await self._transactions.run(_mark, id_list, state)

    async def mark_dispatched(self, ids: Iterable[str]) -> None:
        """Record that these tasks' work messages were confirmed by the broker."""
        await self.mark(ids, DISPATCHED)

    async def undispatched(self, limit: int = 10_000) -> list[Submission]:
        """Tasks written or released but never confirmed as dispatched (left by a crash)."""
        return await self._in_state((CLAIMED, RELEASING), limit)

    async def failing(self, limit: int = 10_000) -> list[tuple[Submission, Ending]]:
        """Tasks whose dependency failure was decided but maybe not published (a crash)."""
        query = (
            select(
                *_ROW, submissions.c.outcome, submissions.c.error_type, submissions.c.error_message
            )
            .where(submissions.c.state == FAILING)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
        return [
            (
                _submission(r),
                Ending(r.id, TaskStatus(r.outcome), r.error_type or "", r.error_message or ""),
            )
            for r in rows
        ]

    async def _in_state(self, states: Sequence[str], limit: int) -> list[Submission]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(*_ROW)
                .where(submissions.c.state.in_(states))
                .order_by(submissions.c.created_at)
                .limit(limit)
            )
            return [_submission(r) for r in rows]

    # delayed tasks

    async def take_due(self, now: datetime, limit: int) -> list[Submission]:
        """Atomically move up to `limit` delayed tasks due at `now` to `releasing`."""
        due = (
            select(submissions.c.id)
            .where(submissions.c.state == DELAYED, submissions.c.run_at <= now)
            .order_by(submissions.c.run_at)
            .limit(limit)
        )
        stmt = (
            update(submissions)
            .where(submissions.c.id.in_(due.scalar_subquery()), submissions.c.state == DELAYED)
            .values(state=RELEASING)
            .returning(*_ROW)
        )
        async with self.engine.begin() as conn:
            return [_submission(r) for r in await conn.execute(stmt)]

    async def next_due(self) -> datetime | None:
        """The earliest due time of a delayed task, if any."""
        query = select(func.min(submissions.c.run_at)).where(submissions.c.state == DELAYED)
        async with self.engine.connect() as conn:
            value = await conn.scalar(query)
        return UtcDateTime().process_result_value(value, self.engine.dialect)

    # dependencies

    async def record_outcomes(self, outcomes: Sequence[tuple[str, str, str | None]]) -> list[str]:
        """Record (id, status, error type) of ended tasks, first one wins, in ONE transaction;
        return the blocked tasks that wait for any of them."""
        if not outcomes:
            return []
        return await self._transactions.run(_record_outcomes, list(outcomes), utcnow())

    async def waiting_children(self, parents: Sequence[str]) -> list[str]:
        """The blocked tasks that wait for any of `parents`."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_waiting_children, parents)

    async def resolvable(self, limit: int = 10_000) -> list[str]:
        """Blocked tasks with at least one parent that ended or is gone (the start-up
        re-check)."""
        parent = submissions.alias("parent")
        child = submissions.alias("child")
        query = (
            select(edges.c.child)
            .join(child, child.c.id == edges.c.child)
            .outerjoin(parent, parent.c.id == edges.c.parent)
            .where(
                child.c.state == BLOCKED,
                parent.c.outcome.is_not(None) | parent.c.id.is_(None),
            )
            .distinct()
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list(await conn.scalars(query))

    async def blocked(self, ids: Sequence[str]) -> list[Blocked]:
        """These tasks, those still blocked, each with its parents' outcomes so far."""
        result: list[Blocked] = []
        async with self.engine.connect() as conn:
            for part in chunks(sorted(set(ids)), _IN_CHUNK):
                query = select(*_ROW).where(
                    submissions.c.id.in_(part), submissions.c.state == BLOCKED
                )
                subs = [_submission(r) for r in await conn.execute(query)]
                parent_ids = {p for s in subs for p in s.depends_on}
                outcomes = await self._outcomes(conn, sorted(parent_ids))
                for s in subs:
                    # A parent missing from the store was purged (see the module docstring).
                    parents = {p: outcomes.get(p, _GONE) for p in s.depends_on}
                    result.append(Blocked(s, parents))
        return result

    async def _outcomes(
        self, conn: AsyncConnection, ids: Sequence[str]
    ) -> dict[str, ParentOutcome]:
        found: dict[str, ParentOutcome] = {}
        for part in chunks(ids, _IN_CHUNK):
            query = select(submissions.c.id, submissions.c.outcome, submissions.c.error_type).where(
                submissions.c.id.in_(part)
            )
            for row in await conn.execute(query):
                status = TaskStatus(row.outcome) if row.outcome else None
                found[row.id] = ParentOutcome(status, row.error_type)
        return found

    async def release(
        self, ids: Sequence[str], now: datetime
    ) -> tuple[list[Submission], list[Submission]]:
        """Atomically unblock these tasks: (to dispatch now — moved to `releasing`,
        held until their due time — moved to `delayed`). Rows no longer blocked are skipped."""
        if not ids:
            return [], []
        soon = now.timestamp() + HOLD_THRESHOLD_S
        out: list[Submission] = []
        later: list[Submission] = []
        async with self.engine.begin() as conn:
            for part in chunks(sorted(set(ids)), _IN_CHUNK):
                stmt = (
                    update(submissions)
                    .where(submissions.c.id.in_(part), submissions.c.state == BLOCKED)
                    .values(state=RELEASING)
                    .returning(*_ROW)
                )
                for row in await conn.execute(stmt):
                    sub = _submission(row)
                    (later if sub.run_at and sub.run_at.timestamp() > soon else out).append(sub)
            if later:  # rarely both: put those not due yet back on hold
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id.in_([s.id for s in later]))
                    .values(state=DELAYED)
                )
        return out, later

    async def end(self, endings: Sequence[Ending]) -> list[Submission]:
        """Atomically move these blocked tasks to `failing` with their outcome recorded;
        return the ones moved (rows no longer blocked are skipped)."""
        moved: list[Submission] = []
        if not endings:
            return moved
        now = utcnow()
        async with self.engine.begin() as conn:
            for e in endings:
                stmt = (
                    update(submissions)
                    .where(submissions.c.id == e.id, submissions.c.state == BLOCKED)
                    .values(
                        state=FAILING,
                        outcome=e.status.value,
                        error_type=e.error_type,
                        error_message=e.message,
                        ended_at=now,
                    )
                    .returning(*_ROW)
                )
                moved += [_submission(r) for r in await conn.execute(stmt)]
        return moved

    async def end_held(self, ending: Ending) -> tuple[Submission, str] | None:
        """Atomically move this task to `failing` with its outcome if it is still held
        (`delayed` or `blocked`); return it and the state it left, else None (it was
        released meanwhile, or never held)."""
        async with self.engine.begin() as conn:
            query = select(*_ROW).where(
                submissions.c.id == ending.id, submissions.c.state.in_((DELAYED, BLOCKED))
            )
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            stmt = (
                update(submissions)
                .where(submissions.c.id == ending.id, submissions.c.state == row.state)
                .values(
                    state=FAILING,
                    outcome=ending.status.value,
                    error_type=ending.error_type,
                    error_message=ending.message,
                    ended_at=utcnow(),
                )
            )
            if (await conn.execute(stmt)).rowcount != 1:
                return None  # the releaser or the resolver took it between the two statements
        return _submission(row), row.state

    async def hold_again(self, task_id: str, state: str) -> None:
        """Undo :meth:`end_held` for a task whose ending could not be published."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(submissions)
                .where(submissions.c.id == task_id, submissions.c.state == FAILING)
                .values(
                    state=state, outcome=None, error_type=None, error_message=None, ended_at=None
                )
            )

    # retention

    async def purge(
        self,
        cutoff: datetime,
        limit: int = PURGE_BATCH,
        after: PurgeCursor | None = None,
        *,
        keys_before: datetime | None = None,
    ) -> tuple[int, PurgeCursor | None]:
        """Examine the next `limit` rows, after `after`, of tasks that ended before `cutoff`,
        oldest first, and delete those nothing needs any more (see the module docstring),
        with their edges, in ONE short transaction. Return how many were deleted, and
        where to go on (None once every row that ended before `cutoff` was examined).
        A row whose intake key is still set goes only if it ended before `keys_before`
        (default: never), the key then being stale (see :data:`INTAKE_KEY_MAX_AGE`).

        Rows kept are stepped over, never examined twice in one pass: a purge costs one
        walk of the `ended_at` index, however many rows must stay. What keeps a row only
        ever stops keeping it (a settled row stays settled, an intake key once forgotten
        stays so), so rows checked here may be deleted by id: a statement that also
        filtered on `state` would let SQLite, which keeps no statistics, scan the `state`
        index (every dispatched row) instead of looking up these ids."""
        window = (
            select(
                submissions.c.id,
                submissions.c.ended_at,
                submissions.c.state,
                submissions.c.intake_key,
            )
            .where(submissions.c.ended_at < cutoff)
            .order_by(submissions.c.ended_at, submissions.c.id)
            .limit(limit)
        )
        if after is not None:
            window = window.where(
                tuple_(submissions.c.ended_at, submissions.c.id) > tuple_(after.ended_at, after.id)
            )
        async with self.engine.begin() as conn:
            rows = list(await conn.execute(window))
            settled = [
                r.id
                for r in rows
                if r.state in SETTLED
                and (r.intake_key is None or (keys_before is not None and r.ended_at < keys_before))
            ]
            needed = await self._parents_of_held(conn, settled)
            doomed = [i for i in settled if i not in needed]
            for part in chunks(doomed, _IN_CHUNK):
                await conn.execute(delete(submissions).where(submissions.c.id.in_(part)))
                await conn.execute(delete(edges).where(edges.c.child.in_(part)))
                await conn.execute(delete(edges).where(edges.c.parent.in_(part)))
        if len(rows) < limit:
            return len(doomed), None
        return len(doomed), PurgeCursor(rows[-1].ended_at, rows[-1].id)

    async def _parents_of_held(self, conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
        """Those of `ids` with a dependant not yet dispatched or ended."""
        child = submissions.alias("child")
        found: set[str] = set()
        for part in chunks(ids, _IN_CHUNK):
            query = (
                select(edges.c.parent)
                .join(child, child.c.id == edges.c.child)
                .where(edges.c.parent.in_(part), child.c.state.not_in(SETTLED))
            )
            found.update(await conn.scalars(query))
        return found

    # kinds

    async def known_kinds(self) -> set[str]:
        """Every kind a worker has ever announced."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(kinds.c.name))
            return {r.name for r in rows}

    async def add_kinds(self, names: Iterable[str], seen: datetime | None = None) -> None:
        """Remember kinds announced by a worker."""
        rows = [{"name": n, "first_seen": seen or utcnow()} for n in set(names)]
        if not rows:
            return
        async with self.engine.begin() as conn:
            stmt = insert_for(self.engine, kinds).on_conflict_do_nothing(index_elements=["name"])
            await conn.execute(stmt, rows)

    # pools and requirement sets (see leveret.scheduler.catalog)

    async def known_pools(self) -> set[str]:
        """Every pool a worker has announced."""
        async with self.engine.connect() as conn:
            return {r.name for r in await conn.execute(select(pools.c.name))}

    async def add_pools(self, names: Iterable[str]) -> None:
        """Remember pools announced by a worker."""
        await self._remember(pools, "name", names)

    async def known_requirement_sets(self) -> set[str]:
        """The routing key of every requirement set tasks were admitted with."""
        async with self.engine.connect() as conn:
            return {r.key for r in await conn.execute(select(requirement_sets.c.key))}

    async def add_requirement_sets(self, keys: Iterable[str]) -> None:
        """Remember requirement sets (by routing key) before tasks are admitted with them."""
        await self._remember(requirement_sets, "key", keys)

    async def _remember(self, table: Any, column: str, values: Iterable[str]) -> None:
        rows = [{column: v, "first_seen": utcnow()} for v in set(values)]
        if rows:
            async with self.engine.begin() as conn:
                stmt = insert_for(self.engine, table).on_conflict_do_nothing(
                    index_elements=[column]
                )
                await conn.execute(stmt, rows)


__all__ = [
    "BLOCKED",
    "CLAIMED",
    "DELAYED",
    "DISPATCHED",
    "ENDED",
    "FAILING",
    "PURGE_BATCH",
    "RELEASING",
    "Blocked",
    "Ending",
    "Existing",
    "PurgeCursor",
    "Submission",
    "SubmissionStore",
]


def _mark(conn: Connection, ids: list[str], state: str) -> None:
    for part in chunks(ids, _IN_CHUNK):
        conn.execute(update(submissions).where(submissions.c.id.in_(part)).values(state=state))


def _record_outcomes(
    conn: Connection, outcomes: list[tuple[str, str, str | None]], now: datetime
) -> list[str]:
    conn.execute(
        update(submissions)
        .where(submissions.c.id == bindparam("b_id"), submissions.c.outcome.is_(None))
        .values(outcome=bindparam("b_outcome"), error_type=bindparam("b_error"), ended_at=now),
        [{"b_id": i, "b_outcome": s, "b_error": e} for i, s, e in outcomes],
    )
    return _waiting_children(conn, [i for i, _, _ in outcomes])


def _waiting_children(conn: Connection, parents: Sequence[str]) -> list[str]:
    """The blocked tasks that wait for any of `parents`."""
    found: set[str] = set()
    for part in chunks(sorted(set(parents)), _IN_CHUNK):
        query = (
            select(edges.c.child)
            .join(submissions, submissions.c.id == edges.c.child)
            .where(edges.c.parent.in_(part), submissions.c.state == BLOCKED)
        )
        found.update(conn.scalars(query))
    return sorted(found)
