"""Admission: validate a submission, then claim, dispatch and confirm it in batches.

Both intakes (AMQP and HTTP) end here. Concurrent submissions are coalesced by a
single flusher into one store transaction and one burst of publishes whose
confirms are awaited together, which is what makes the scheduler fast; having
one flusher also means two copies of an id cannot race each other.

A task due later (``delay_s``/``run_at``) is stored `delayed` and a task with
unfinished parents (``depends_on``) `blocked`; both are announced but not
published, and go out later through the same dispatcher (see
:mod:`leveret.scheduler.releaser` and :mod:`leveret.scheduler.dependencies`).
Parents must be known: in the store already, or in the same request.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pydantic_core
from loguru import logger
from pydantic import JsonValue, ValidationError

from leveret.amqp import map_broker_errors
from leveret.batching import chunks, fill_batch
from leveret.contracts import (
    DEFAULT_PRIORITY,
    MAX_EDGES_PER_REQUEST,
    MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_INT,
    MIN_PAYLOAD_INT,
    POOL_PATTERN,
    Accepted,
    SubmitTask,
    TaskMessage,
    TaskStatus,
    new_task_id,
    utcnow,
)
from leveret.db import map_db_errors
from leveret.errors import SubmissionError, UnavailableError
from leveret.handlers import BUILTIN_KINDS
from leveret.scheduler.catalog import PoolCatalog, RequirementSets
from leveret.scheduler.dispatch import Announced, Dispatcher
from leveret.scheduler.holds import ParentOutcome, describe_cycle, due_time, find_cycle, is_held
from leveret.scheduler.store import BLOCKED, CLAIMED, DELAYED, Submission, SubmissionStore
from leveret.topology import requirement_set

_POOL_RE = re.compile(POOL_PATTERN)


def describe(exc: ValidationError) -> str:
    """A ValidationError as one readable line: ``field 'kind': Field required; …``."""
    parts = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)


#: Kinds learned from worker announcements, at most (anyone with access to the events
#: exchange can announce): beyond, new ones are ignored.
MAX_ANNOUNCED_KINDS = 10_000


class KindCatalog:
    """The task kinds the scheduler accepts: built-ins, configured, and announced by workers."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._kinds: set[str] = set(BUILTIN_KINDS) | set(configured)
        self._announced = 0
        #: Kinds whose workers announced a cluster-wide limit: they go to the kind's
        #: single-active-consumer queue (see leveret.worker.limits). Known kinds only.
        self.limited: set[str] = set()

    def add(self, names: Iterable[str]) -> set[str]:
        """Learn kinds; return the ones that are new (none past the bound)."""
        room = max(MAX_ANNOUNCED_KINDS - self._announced, 0)
        new = set(sorted(set(names) - self._kinds)[:room])
        self._kinds |= new
        self._announced += len(new)
        return new

    def limit(self, names: Iterable[str]) -> None:
        """Mark known kinds as having a cluster-wide limit."""
        self.limited.update(n for n in names if n in self._kinds)

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def names(self) -> list[str]:
        """Every known kind, sorted."""
        return sorted(self._kinds)


def decode_json(body: bytes) -> JsonValue:
    """Parse a request body as JSON, or raise a :class:`SubmissionError` saying why.

    pydantic-core's parser refuses NaN and Infinity and stops at a nesting depth of a
    few hundred with an error (Python's ``json`` would raise RecursionError instead).
    """
    try:
        data: JsonValue = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise SubmissionError("invalid_encoding", f"body is not UTF-8: {bad}", 400) from exc
        if "recursion limit" in str(exc):
            raise SubmissionError(
                "too_deep", f"body nests too deep (a payload: {MAX_PAYLOAD_DEPTH} levels)", 422
            ) from exc
        raise SubmissionError("invalid_json", f"body is not JSON: {exc}", 400) from exc
    return data


def check_json_bounds(value: JsonValue, where: str = "payload") -> None:
    """Refuse a JSON value nested deeper than :data:`MAX_PAYLOAD_DEPTH`, or holding a
    number that is not finite (``1e400``) or an integer wider than 64 bits."""
    stack: list[tuple[JsonValue, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_PAYLOAD_DEPTH:
                raise SubmissionError(
                    "too_deep", f"{where} nests deeper than {MAX_PAYLOAD_DEPTH} levels", 422
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            raise SubmissionError("invalid_number", f"{where} holds a number out of range", 422)
        elif isinstance(item, int) and not MIN_PAYLOAD_INT <= item <= MAX_PAYLOAD_INT:
            raise SubmissionError(
                "invalid_number", f"{where} holds an integer wider than 64 bits", 422
            )


def parse_body(body: bytes, max_bytes: int) -> SubmitTask:
    """Decode one submission (raw bytes) or raise a :class:`SubmissionError` saying why.

    The submission decoder: for any bytes it returns a task within every bound of the
    protocol or raises SubmissionError, nothing else (a property test holds it to that).
    """
    if len(body) > max_bytes:
        raise SubmissionError(
            "payload_too_large", f"submission is {len(body)} bytes; the limit is {max_bytes}", 413
        )
    data = decode_json(body)
    if not isinstance(data, dict):
        raise SubmissionError(
            "not_an_object", f"body must be a JSON object, got {type(data).__name__}", 400
        )
    try:
        task = SubmitTask.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError("invalid_task", describe(exc), 422) from exc
    check_json_bounds(task.payload)
    return task


def check_supported(task: SubmitTask, kinds: KindCatalog) -> None:
    """Refuse unknown kinds, and `requires` on a kind with a cluster-wide limit (its
    single-active-consumer queue cannot also pick workers by capability)."""
    if task.kind not in kinds:
        raise SubmissionError(
            "unknown_kind",
            f"unknown kind {task.kind!r}; known kinds: {', '.join(kinds.names())}",
            422,
        )
    if task.requires and task.kind in kinds.limited:
        raise SubmissionError(
            "unsupported",
            f"kind {task.kind!r} has a cluster-wide limit; its tasks cannot also set requires",
            422,
        )


def envelope(
    task: SubmitTask,
    *,
    default_id: str | None = None,
    default_pool: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> TaskMessage:
    """The work message for a valid submission; raises if the pool is invalid."""
    pool = task.pool or default_pool or "default"
    if not _POOL_RE.match(pool):
        raise SubmissionError("invalid_pool", f"invalid pool name {pool!r}", 422)
    return TaskMessage(
        id=task.id or default_id or new_task_id(),
        kind=task.kind,
        payload=task.payload,
        pool=pool,
        submitted_at=utcnow(),
        correlation_id=correlation_id,
        reply_to=reply_to,
        timeout_s=task.timeout_s,
        max_retries=task.max_retries,
        priority=DEFAULT_PRIORITY if task.priority is None else task.priority,
        requires=list(requirement_set(task.requires or ())),
    )


def check_payload_size(task: SubmitTask, max_bytes: int) -> None:
    """Refuse a task whose payload, as JSON, is over the limit (for batch items)."""
    size = len(json.dumps(task.payload, separators=(",", ":")).encode())
    if size > max_bytes:
        raise SubmissionError(
            "payload_too_large", f"payload is {size} bytes; the limit is {max_bytes}", 413
        )


def submission(
    task: SubmitTask, message: TaskMessage, *, intake_key: str | None = None
) -> Submission:
    """A valid submission with its work message, due time and parents (each once), and
    the intake key of an id-less AMQP delivery (see :mod:`leveret.scheduler.intake`)."""
    parents = tuple(dict.fromkeys(task.depends_on or ()))
    return Submission(message, parents, due_time(task, message.submitted_at), intake_key)


def check_graph(subs: Sequence[Submission]) -> None:
    """Refuse a request with too many dependency edges in all, or whose tasks depend on
    each other in a cycle (or on themselves)."""
    edges = sum(len(s.depends_on) for s in subs)
    if edges > MAX_EDGES_PER_REQUEST:
        raise SubmissionError(
            "too_many_dependencies",
            f"the request names {edges} parents in all; the limit is {MAX_EDGES_PER_REQUEST}",
            413,
        )
    graph: dict[str, Sequence[str]] = {}
    for s in subs:
        graph.setdefault(s.id, s.depends_on)  # the first copy of an id is the one kept
    cycle = find_cycle(graph)
    if cycle is not None:
        raise SubmissionError("dependency_cycle", f"dependency cycle: {describe_cycle(cycle)}", 422)


def _state(s: Submission, known: dict[str, ParentOutcome], now: datetime) -> tuple[str, Announced]:
    """Where a new task starts: dispatched now, delayed, or blocked by its parents."""
    if s.depends_on:
        outcomes = [known.get(p, ParentOutcome(None)).status for p in s.depends_on]
        if any(o is not TaskStatus.COMPLETED for o in outcomes):
            return BLOCKED, "blocked"  # a parent that did not complete ends it at once
    if is_held(s.run_at, now):
        return DELAYED, "delayed"
    return CLAIMED, "pending"


@dataclass
class _Request:
    subs: Sequence[Submission]
    future: asyncio.Future[list[Accepted]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _fail(batch: Sequence[_Request], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)


def unprocessable(exc: BaseException) -> SubmissionError:
    """The refusal of a submission whose admission raised something unforeseen that
    retrying will not change (the store refused a value, or a bug): never a 500 or a
    stranded message."""
    reason = str(exc).splitlines()[0][:300] if str(exc) else ""
    return SubmissionError(
        "unprocessable",
        f"the scheduler cannot admit this submission: {type(exc).__name__}: {reason}",
        422,
    )


class Admission:
    """Claims, publishes and confirms submissions in coalesced batches."""

    def __init__(
        self,
        store: SubmissionStore,
        dispatcher: Dispatcher,
        *,
        batch_max: int = 256,
        batch_wait_ms: float = 0.0,
        on_delayed: Callable[[datetime], None] = lambda _: None,
        on_blocked: Callable[[Sequence[str]], None] = lambda _: None,
        pools: PoolCatalog | None = None,
        requirement_sets: RequirementSets | None = None,
    ) -> None:
        self.store = store
        self.pools = pools  # None: any pool
        self.requirement_sets = requirement_sets  # None: no limit
        self.dispatcher = dispatcher
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_ms / 1000
        self.on_delayed = on_delayed
        self.on_blocked = on_blocked
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.accepted = 0
        self.duplicates = 0

    async def submit(self, subs: Sequence[Submission]) -> list[Accepted]:
        """Admit tasks; return one answer each once they are durably on their queues or
        held in the store. Raises :class:`SubmissionError` for an unknown parent."""
        request = _Request(subs)
        await self._queue.put(request)
        return await request.future

    async def recover(self) -> int:
        """Dispatch tasks a previous run wrote or released but never saw confirmed.

        Some were published before the crash (the window is a whole batch publish, not
        only the gap between the confirm and the "dispatched" mark): those run twice,
        which at-least-once allows; the tracker records one outcome and one reply."""
        leftovers = await self.store.undispatched()
        for part in chunks(leftovers, self.batch_max):
            await self.dispatcher.send(part)
            await self.store.mark_dispatched(s.id for s in part)
        if leftovers:
            logger.warning("re-dispatched {} tasks claimed before a crash", len(leftovers))
        return len(leftovers)

    async def run(self) -> None:
        """The flusher: forever take queued requests and process them in batches."""
        while True:
            batch = await self._collect()
            try:
                await self._admit(batch)
            except UnavailableError as exc:
                logger.warning("admission of {} requests failed: {}", len(batch), exc)
                _fail(batch, exc)
            except Exception as exc:  # not transient: find the request that causes it
                if len(batch) == 1:
                    logger.opt(exception=exc).error("admission of one request failed")
                    _fail(batch, unprocessable(exc))
                    continue
                for request in batch:
                    if request.future.done():
                        continue
                    try:
                        await self._admit([request])
                    except UnavailableError as alone:
                        _fail([request], alone)
                    except Exception as alone:
                        logger.opt(exception=alone).error("admission of one request failed")
                        _fail([request], unprocessable(alone))

    async def _admit(self, batch: list[_Request]) -> None:
        """Admit a batch of requests in one transaction and one burst of publishes. The
        one boundary of admission: store and broker errors leave as leveret errors."""
        with map_db_errors(), map_broker_errors():
            admitted, known = await self._check_parents(await self._check_routes(batch))
            answers = await self._process([s for r in admitted for s in r.subs], known)
        offset = 0
        for request in admitted:
            n = len(request.subs)
            if not request.future.done():
                request.future.set_result(answers[offset : offset + n])
            offset += n

    async def _collect(self) -> list[_Request]:
        first = await self._queue.get()
        batch, _ = await fill_batch(
            self._queue,
            first,
            limit=self.batch_max,
            wait_s=self.batch_wait_s,
            weight=lambda request: len(request.subs),
        )
        return batch

    async def _check_routes(self, batch: list[_Request]) -> list[_Request]:
        """Refuse each request naming a pool that is not allowed, or a requirement set
        one too many; remember the new sets of the others (before any queue is made)."""
        admitted: list[_Request] = []
        new: set[str] = set()
        for request in batch:
            try:
                if self.pools is not None:
                    self.pools.check(request.subs)
                if self.requirement_sets is not None:
                    new |= self.requirement_sets.new_keys(request.subs, new)
            except SubmissionError as err:
                _fail([request], err)
                continue
            admitted.append(request)
        if new and self.requirement_sets is not None:
            await self.store.add_requirement_sets(new)
            self.requirement_sets.add(new)
            logger.info("{} new requirement sets", len(new))
        return admitted

    async def _check_parents(
        self, batch: list[_Request]
    ) -> tuple[list[_Request], dict[str, ParentOutcome]]:
        """Refuse each request naming a parent that is neither in the store nor in the
        request itself (nor in an earlier request of this batch); return the others, and
        the outcomes so far of the parents the store knows."""
        parents = {p for r in batch for s in r.subs for p in s.depends_on}
        if not parents:
            return batch, {}
        known = await self.store.lookup(parents)
        admitted: list[_Request] = []
        earlier: set[str] = set()
        for request in batch:
            own = {s.id for s in request.subs}
            missing = sorted(
                {
                    p
                    for s in request.subs
                    for p in s.depends_on
                    if p not in known and p not in own and p not in earlier
                }
            )
            if missing:
                shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
                _fail(
                    [request],
                    SubmissionError(
                        "unknown_dependency",
                        f"depends_on names unknown task(s): {shown}; a parent must be "
                        "submitted before its dependants or in the same batch",
                        422,
                    ),
                )
                continue
            earlier |= own
            admitted.append(request)
        return admitted, known

    async def _process(
        self, subs: list[Submission], known: dict[str, ParentOutcome]
    ) -> list[Accepted]:
        unique: dict[str, Submission] = {}
        for s in subs:
            unique.setdefault(s.id, s)
        now = utcnow()
        plan = {i: _state(s, known, now) for i, s in unique.items()}
        existing = await self.store.claim([(s, plan[i][0]) for i, s in unique.items()])
        to_send: list[Submission] = []
        held: list[tuple[Submission, Announced]] = []
        status: dict[str, Announced] = {}
        for task_id, s in unique.items():
            old = existing.get(task_id)
            if old is None:
                state, announced = plan[task_id]
                status[task_id] = announced
                if state == CLAIMED:
                    to_send.append(s)
                else:
                    held.append((s, announced))
            elif old.state == CLAIMED:
                # Claimed by an earlier, interrupted attempt, maybe already published:
                # it may run twice (at-least-once), never be admitted twice.
                to_send.append(old.submission)
                status[task_id] = "pending"
        await self.dispatcher.send(to_send, held)
        await self.store.mark_dispatched(s.id for s in to_send)
        self._after_hold(held)
        answers: list[Accepted] = []
        for s in subs:
            first_copy = unique.get(s.id) is s
            answer = status.pop(s.id, None) if first_copy else None
            # a second copy in the same batch is a duplicate
            answers.append(Accepted(id=s.id, status=answer or "duplicate"))
        self.accepted += len(to_send) + len(held)
        self.duplicates += len(subs) - len(to_send) - len(held)
        return answers

    def _after_hold(self, held: Sequence[tuple[Submission, Announced]]) -> None:
        """Tell the releaser of new due times and the resolver of new blocked tasks (it
        checks them once more now that they are committed: a parent may just have ended)."""
        due = [s.run_at for s, a in held if a == "delayed" and s.run_at is not None]
        if due:
            self.on_delayed(min(due))
        blocked = [s.id for s, a in held if a == "blocked"]
        if blocked:
            self.on_blocked(blocked)
