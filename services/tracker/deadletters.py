"""Consumes the dead-letter queue: work messages the broker gave up on.

A work message lands here when the quorum queue's delivery limit dead-lettered
it (its handler crashed the worker process on every delivery) or when a worker
rejected it. For each one the tracker records the task `failed` (type `poison`,
or `invalid_message` for a rejection) through the same store path as every
result, so the first terminal outcome still wins. A dead letter that names the
producer's `reply_to` hands it to the task's record too (in the same
transaction), so the reply the task owes is marked like every other one (see
:mod:`leveret.tracker.replies`: one reply per task, for its recorded outcome).
Then, if that failure is the task's outcome, it is published on the results
exchange; then the reply goes out and the dead letter is acked right after it
(a redelivered dead letter sends a reply still owed).

A dead letter that is not a task (undecodable) is recorded failed under its
`message_id` when it has one, and always re-published, bytes untouched, to the
`rejected` queue with the reason in ``x-leveret-reason``. Nothing stays in the
dead-letter queue unnoticed, and nothing here stops the tracker: broker and
database failures are waited out, anything else parks the message in `rejected`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from loguru import logger
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from leveret.amqp import (
    BROKER_EXCEPTIONS,
    Outgoing,
    annotated_copy,
    channel_gone,
    json_message,
    map_broker_errors,
    open_channel,
    publish_all,
    return_to_queue,
)
from leveret.contracts import (
    MAX_REPLY_TO,
    AcceptedTask,
    TaskError,
    TaskMessage,
    TaskResult,
    TasksAccepted,
    TaskStatus,
)
from leveret.db import map_db_errors
from leveret.errors import UnavailableError
from leveret.topology import RK_REJECTED, WORK_DELIVERY_LIMIT, Topology, result_routing_key
from leveret.tracker.replies import ReplySender
from leveret.tracker.state import TaskRecord, TrackerMessage
from leveret.tracker.store import TrackerStore

T = TypeVar("T")

#: Dead letters held at once; they are rare and handled one at a time.
PREFETCH = 16
#: How long a dead letter that could neither be handled nor parked waits to be requeued.
GIVE_BACK_AFTER_S = 5.0
#: Error types of the failures recorded here.
POISON = "poison"
INVALID_MESSAGE = "invalid_message"
DEAD_LETTERED = "dead_lettered"


class VoidDelivery(Exception):
    """The delivery's channel closed: the broker requeued it, so stop handling it."""


def death_of(headers: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    """Why the broker dead-lettered a message and how often it was delivered before.

    The reason comes from ``x-death`` (the `delivery_limit` entry if there is one,
    else the newest entry), or ``x-first-death-reason``. The count is that entry's
    `count`, else the ``x-delivery-count`` header, else unknown. RabbitMQ's own
    `count` counts dead-letterings, not deliveries, so for a `delivery_limit` death
    it is raised to what that limit implies (limit + 1 deliveries).
    """
    headers = headers or {}
    deaths = [d for d in _as_list(headers.get("x-death")) if isinstance(d, Mapping)]
    entry = next((d for d in deaths if _text(d.get("reason")) == "delivery_limit"), None)
    if entry is None and deaths:
        entry = deaths[0]
    reason = _text(entry.get("reason")) if entry is not None else None
    reason = reason or _text(headers.get("x-first-death-reason"))
    count = _int(entry.get("count")) if entry is not None else None
    if count is None:
        count = _int(headers.get("x-delivery-count"))
    if reason == "delivery_limit":
        count = max(count or 0, WORK_DELIVERY_LIMIT + 1)
    return reason, count


def dead_letter_error(
    reason: str | None, count: int | None, rejected_why: str | None = None
) -> TaskError:
    """The error a dead-lettered task is recorded failed with."""
    if reason == "rejected":
        why = f": {rejected_why}" if rejected_why else ""
        return TaskError(type=INVALID_MESSAGE, message=f"a worker rejected the message{why}")
    if reason in ("delivery_limit", None):
        if count:
            message = f"worker crashed {count} times running it (delivery limit reached)"
        else:
            message = "workers crashed running it until the delivery limit was reached"
        return TaskError(type=POISON, message=message)
    return TaskError(type=DEAD_LETTERED, message=f"the broker dead-lettered it ({reason})")


class DeadLetters:
    """Consumes the dead-letter queue one message at a time (see the module docstring)."""

    def __init__(
        self, store: TrackerStore, topology: Topology, replies: ReplySender | None = None
    ) -> None:
        """`replies` sends the reply a recorded failure leaves owed (None: none is sent)."""
        self.store = store
        self.topology = topology
        self.replies = replies
        self.handled = 0
        self._owed: dict[str, TaskRecord] = {}  # replies the dead letter in hand owes
        self._resend: set[str] = set()  # its task, when it is a redelivery
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._results: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None

    @property
    def running(self) -> bool:
        """True while consuming on an open channel."""
        channel = self._channel
        return self._tag is not None and channel is not None and not channel.is_closed

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Open a channel (confirms on) and start consuming the dead-letter queue."""
        self._channel = await open_channel(connection, prefetch=PREFETCH)
        self._queue = await self.topology.dead_letters.declare(self._channel)
        get = self._channel.get_exchange
        self._results = await get(self.topology.results_exchange, ensure=False)
        self._dead = await get(self.topology.dead_exchange, ensure=False)
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    async def stop(self) -> None:
        """Stop taking dead letters; :meth:`run` returns after the one in hand."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except BROKER_EXCEPTIONS as exc:
                logger.warning("cancelling the dead-letter consumer failed: {}", exc)
        self._tag = None
        self._buffer.put_nowait(None)

    async def close(self) -> None:
        """Close the channel (unacked dead letters go back to their queue)."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def run(self) -> None:
        """Handle dead letters until :meth:`stop`."""
        while (delivery := await self._buffer.get()) is not None:
            await self.handle(delivery)

    async def handle(self, delivery: AbstractIncomingMessage) -> None:
        """Record, publish, then ack one dead letter. Never raises (but cancellation)."""
        self._owed = {}
        again = delivery.redelivered and delivery.message_id
        self._resend = {delivery.message_id} if again and delivery.message_id else set()
        try:
            await self._handle(delivery)
            owed = list(self._owed.values())
            replied = await self.replies.publish(owed) if self.replies else []
        except VoidDelivery:
            logger.warning("dead letter {} returned to its queue", delivery.message_id)
            return
        except Exception:  # loop boundary: not even parking worked; try again later
            logger.exception(
                "dead letter {} could not be handled nor parked; requeueing it in {} s",
                delivery.message_id,
                GIVE_BACK_AFTER_S,
            )
            await asyncio.sleep(GIVE_BACK_AFTER_S)  # a back-off, not a synchronisation
            await return_to_queue(delivery)
            return
        self.handled += 1
        try:
            await delivery.ack()  # right after the reply (see the module docstring)
        except BROKER_EXCEPTIONS as exc:
            logger.warning("dead letter ack not sent (the broker will redeliver): {}", exc)
        if replied and self.replies is not None:
            await self.replies.mark_sent(replied)

    async def _handle(self, delivery: AbstractIncomingMessage) -> None:
        try:
            await self._retrying(delivery, lambda: self._process(delivery))
        except VoidDelivery:
            raise
        except Exception as exc:  # a bug or a refusal: park it where a person will see it
            logger.exception("dead letter {} could not be handled", delivery.message_id)
            why = f"the tracker could not handle it: {type(exc).__name__}: {exc}"
            await self._retrying(delivery, lambda: self._park(delivery, why, "tracker_error"))

    async def _process(self, delivery: AbstractIncomingMessage) -> None:
        try:
            task = TaskMessage.model_validate_json(delivery.body)
        except ValidationError as exc:
            await self._undecodable(delivery, exc)
            return
        reason, count = death_of(delivery.headers)
        why = _text((delivery.headers or {}).get("x-leveret-reason"))
        error = dead_letter_error(reason, count, why)
        attempt = task.attempt_offset + count if count else task.attempt_offset
        result = TaskResult(
            id=task.id,
            kind=task.kind,
            pool=task.pool,
            status=TaskStatus.FAILED,
            error=error,
            attempt=attempt,
            submitted_at=task.submitted_at,
        )
        record = await self._record(result, _with_reply_to(task))
        if record is None:
            return
        await self._publish_result(_as_recorded(result, record), task.correlation_id or task.id)

    async def _undecodable(self, delivery: AbstractIncomingMessage, exc: ValidationError) -> None:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        why = f"dead-lettered message is not a task: {where}: {first['msg']}"
        task_id = delivery.message_id
        if task_id:
            error = TaskError(type=INVALID_MESSAGE, message=why)
            result = TaskResult(id=task_id, kind="_", pool="_", status="failed", error=error)
            record = await self._record(result)
            if record is not None:
                await self._publish_result(_as_recorded(result, record), task_id)
        await self._park(delivery, why, INVALID_MESSAGE)

    async def _record(
        self, result: TaskResult, accepted: TasksAccepted | None = None
    ) -> TaskRecord | None:
        """Apply the failure (after `accepted`, which hands over the producer's `reply_to`)
        and keep the reply that leaves owed, for :meth:`handle`; the record if the failure
        is now the task's outcome, else None."""
        messages: list[TrackerMessage] = [result] if accepted is None else [accepted, result]
        applied = await self.store.apply(messages, resend=self._resend)
        self._owed.update({r.id: r for r in applied.replies})
        record = await self.store.get_task(result.id)
        error = result.error
        assert error is not None
        ours = (
            record is not None
            and record.status is TaskStatus.FAILED
            and (record.error_type, record.error_message) == (error.type, error.message)
        )
        log = logger.bind(task_id=result.id)
        if not ours:
            status = record.status if record is not None else "unknown"
            log.info("dead letter of task {} ignored: it already ended {}", result.id, status)
            return None
        log.info("task {} failed: {}: {}", result.id, error.type, error.message)
        return record

    async def _publish_result(self, result: TaskResult, correlation_id: str) -> None:
        assert self._results is not None
        key = result_routing_key(result.status, result.pool, result.kind)
        message = json_message(result, correlation_id=correlation_id)
        await publish_all([Outgoing(self._results, key, message)])

    async def _park(self, delivery: AbstractIncomingMessage, why: str, error_type: str) -> None:
        """Re-publish the original bytes to the `rejected` queue with the reason."""
        assert self._dead is not None
        copy = annotated_copy(
            delivery, {"x-leveret-reason": why[:1000], "x-leveret-error-type": error_type}
        )
        await publish_all([Outgoing(self._dead, RK_REJECTED, copy)])
        logger.warning(
            "dead letter {} moved to {}: {}", delivery.message_id, self.topology.rejected.name, why
        )

    async def _retrying(
        self, delivery: AbstractIncomingMessage, step: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `step`, waiting out broker and database trouble while the delivery is valid."""

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, UnavailableError):
                logger.warning("dead letter {} not handled yet: {}", delivery.message_id, exc)
                return True
            return False

        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
            retry=retry_if_exception(retryable),
            reraise=True,
        ):
            with attempt:
                if channel_gone(delivery):
                    raise VoidDelivery
                with map_db_errors(), map_broker_errors():
                    return await step()
        raise AssertionError("unreachable")  # pragma: no cover


def _with_reply_to(task: TaskMessage) -> TasksAccepted | None:
    """The task as the scheduler announced it, when the dead letter names a `reply_to`:
    applied before the failure, it fills in what the tracker may not know yet (the
    reply address above all; an accepted event that arrives later changes nothing)."""
    if not task.reply_to or len(task.reply_to) > MAX_REPLY_TO:
        return None
    item = AcceptedTask(
        id=task.id,
        kind=task.kind,
        pool=task.pool,
        submitted_at=task.submitted_at,
        correlation_id=task.correlation_id,
        requires=task.requires,
        reply_to=task.reply_to,
    )
    return TasksAccepted(tasks=[item])


def _as_recorded(result: TaskResult, record: TaskRecord) -> TaskResult:
    """The result as published: with the kind and pool the tracker knows for the task."""
    return result.model_copy(
        update={"kind": record.kind or result.kind, "pool": record.pool or result.pool}
    )


def _as_list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str | bytes):
        return None
    try:
        return int(value)
    except ValueError:
        return None
