"""Admission: validate a submission, then claim, dispatch and confirm it in batches.

Both intakes (AMQP and HTTP) end here. Concurrent submissions are coalesced by a
single flusher into one store transaction and one burst of publishes whose
confirms are awaited together, which is what makes the scheduler fast; having
one flusher also means two copies of an id cannot race each other.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from loguru import logger
from pydantic import ValidationError

from leveret.amqp import Outgoing, json_message, publish_all
from leveret.contracts import (
    POOL_PATTERN,
    Accepted,
    AcceptedTask,
    SubmitTask,
    TaskMessage,
    TasksAccepted,
    new_task_id,
    utcnow,
)
from leveret.errors import SubmissionError
from leveret.handlers import BUILTIN_KINDS
from leveret.scheduler.store import CLAIMED, SubmissionStore
from leveret.topology import RK_TASKS_ACCEPTED, DeclaredTopology

_EVENT_CHUNK = 500
_POOL_RE = re.compile(POOL_PATTERN)


def describe(exc: ValidationError) -> str:
    """A ValidationError as one readable line: ``field 'kind': Field required; …``."""
    parts = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)


class KindCatalog:
    """The task kinds the scheduler accepts: built-ins, configured, and announced by workers."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._kinds: set[str] = set(BUILTIN_KINDS) | set(configured)

    def add(self, names: Iterable[str]) -> set[str]:
        """Learn kinds; return the ones that are new."""
        new = set(names) - self._kinds
        self._kinds |= new
        return new

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def names(self) -> list[str]:
        """Every known kind, sorted."""
        return sorted(self._kinds)


def parse_body(body: bytes, max_bytes: int) -> SubmitTask:
    """Decode one submission (raw bytes) or raise a :class:`SubmissionError` saying why."""
    if len(body) > max_bytes:
        raise SubmissionError(
            "payload_too_large", f"submission is {len(body)} bytes; the limit is {max_bytes}", 413
        )
    try:  # fast path: one pass in pydantic-core; the slow path below explains failures
        return SubmitTask.model_validate_json(body)
    except ValidationError:
        pass
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError("invalid_encoding", f"body is not UTF-8: {exc}", 400) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SubmissionError("invalid_json", f"body is not JSON: {exc}", 400) from exc
    if not isinstance(data, dict):
        raise SubmissionError(
            "not_an_object", f"body must be a JSON object, got {type(data).__name__}", 400
        )
    try:
        return SubmitTask.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError("invalid_task", describe(exc), 422) from exc


def check_supported(task: SubmitTask, kinds: KindCatalog) -> None:
    """Refuse unknown kinds and the v1 fields this scheduler does not act on yet."""
    if task.kind not in kinds:
        raise SubmissionError(
            "unknown_kind",
            f"unknown kind {task.kind!r}; known kinds: {', '.join(kinds.names())}",
            422,
        )
    unsupported = [
        name
        for name in ("priority", "depends_on", "requires")
        if getattr(task, name) not in (None, [], 0)
    ]
    if unsupported:
        raise SubmissionError(
            "unsupported",
            f"field(s) {', '.join(unsupported)} are reserved in protocol v1 and not supported "
            "by this scheduler yet",
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
    )


def check_payload_size(task: SubmitTask, max_bytes: int) -> None:
    """Refuse a task whose payload, as JSON, is over the limit (for batch items)."""
    size = len(json.dumps(task.payload, separators=(",", ":")).encode())
    if size > max_bytes:
        raise SubmissionError(
            "payload_too_large", f"payload is {size} bytes; the limit is {max_bytes}", 413
        )


@dataclass
class _Request:
    tasks: Sequence[TaskMessage]
    future: asyncio.Future[list[Accepted]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    """Claims, publishes and confirms submissions in coalesced batches."""

    def __init__(
        self,
        store: SubmissionStore,
        declared: DeclaredTopology,
        *,
        batch_max: int = 256,
        batch_wait_ms: float = 2.0,
    ) -> None:
        self.store = store
        self.declared = declared
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_ms / 1000
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.accepted = 0
        self.duplicates = 0

    async def submit(self, tasks: Sequence[TaskMessage]) -> list[Accepted]:
        """Admit tasks; return one answer each once they are durably on their queues."""
        request = _Request(tasks)
        await self._queue.put(request)
        return await request.future

    async def recover(self) -> int:
        """Dispatch tasks a previous run claimed but never saw confirmed."""
        leftovers = await self.store.undispatched()
        for start in range(0, len(leftovers), self.batch_max):
            part = leftovers[start : start + self.batch_max]
            await self._dispatch(part)
            await self.store.mark_dispatched(t.id for t in part)
        if leftovers:
            logger.warning("re-dispatched {} tasks claimed before a crash", len(leftovers))
        return len(leftovers)

    async def run(self) -> None:
        """The flusher: forever take queued requests and process them in batches."""
        while True:
            batch = await self._collect()
            try:
                answers = await self._process([t for r in batch for t in r.tasks])
            except Exception as exc:
                logger.opt(exception=exc).error("admission of {} requests failed", len(batch))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            offset = 0
            for request in batch:
                n = len(request.tasks)
                if not request.future.done():
                    request.future.set_result(answers[offset : offset + n])
                offset += n

    async def _collect(self) -> list[_Request]:
        first = await self._queue.get()
        batch, count = [first], len(first.tasks)
        deadline = time.monotonic() + self.batch_wait_s
        while count < self.batch_max:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            batch.append(request)
            count += len(request.tasks)
        return batch

    async def _process(self, tasks: list[TaskMessage]) -> list[Accepted]:
        unique: dict[str, TaskMessage] = {}
        for t in tasks:
            unique.setdefault(t.id, t)
        existing = await self.store.claim(list(unique.values()))
        to_send: list[TaskMessage] = []
        for task_id, task in unique.items():
            old = existing.get(task_id)
            if old is None:
                to_send.append(task)
            elif old.state == CLAIMED:
                to_send.append(old.envelope)  # claimed by an earlier, interrupted attempt
        await self._dispatch(to_send)
        await self.store.mark_dispatched(t.id for t in to_send)
        sent = {t.id for t in to_send}
        answers: list[Accepted] = []
        for t in tasks:
            first_copy = unique.get(t.id) is t
            if t.id in sent and first_copy:
                answers.append(Accepted(id=t.id, status="pending"))
                sent.discard(t.id)  # a second copy in the same batch is a duplicate
            else:
                answers.append(Accepted(id=t.id, status="duplicate"))
        self.accepted += len(to_send)
        self.duplicates += len(tasks) - len(to_send)
        return answers

    async def _dispatch(self, tasks: Sequence[TaskMessage]) -> None:
        if not tasks:
            return
        work = self.declared.exchange(self.declared.topology.work_exchange)
        events = self.declared.exchange(self.declared.topology.events_exchange)
        items: list[Outgoing] = []
        for t in tasks:
            await self.declared.declare_pool(t.pool)
            message = json_message(t, message_id=t.id, correlation_id=t.correlation_id or t.id)
            items.append(Outgoing(work, t.pool, message))
        for start in range(0, len(tasks), _EVENT_CHUNK):
            event = TasksAccepted(
                tasks=[
                    AcceptedTask(
                        id=t.id,
                        kind=t.kind,
                        pool=t.pool,
                        submitted_at=t.submitted_at,
                        correlation_id=t.correlation_id,
                    )
                    for t in tasks[start : start + _EVENT_CHUNK]
                ]
            )
            items.append(Outgoing(events, RK_TASKS_ACCEPTED, json_message(event)))
        await publish_all(items)
        for t in tasks:
            logger.debug("task {} accepted ({} on pool {})", t.id, t.kind, t.pool)
