"""The one terminal reply each task owes its producer's `reply_to`.

Only the tracker answers `reply_to` (workers, the scheduler and the dead-letter
path publish results, never replies), and only for the outcome it records: the
first terminal result wins, so a task that ran twice (a crash window, a frozen
worker that woke) still gets one reply. Refusals (`rejected`) and `duplicate`
answers are the scheduler's, sent at intake; the tracker never replies for them.

How a reply travels:

1. The transaction that leaves a task completed, failed or cancelled with a known
   `reply_to` (from `task.accepted`, possibly after the result) marks the reply
   `owed`, in the same commit as the outcome.
2. After the commit (and after the confirmed `tasks.ended`), the writer (the
   consumer, the dead-letter handler) publishes the owed replies — a
   :class:`~leveret.contracts.TaskResult` built from the recorded outcome, through
   the default exchange, not persistent, never mandatory (a reply queue may be
   gone); ``correlation_id`` is the task's (or its id), ``type`` is ``task.result``
   and ``message_id`` is ``<task id>:result`` — and acks the deliveries that caused
   them *at once*, with no await for a confirm in between. Both go over one
   connection, so they reach the broker in that order: if the ack arrived, the
   replies did.
3. The replies are then marked `sent`, in a short transaction.

If the tracker dies before the ack, its deliveries come back *redelivered*, and a
task named by a redelivered message whose reply is still owed gets it sent then
(:meth:`leveret.tracker.store.TrackerStore.apply`, ``resend``). So a reply is never
lost, and a second copy needs a tracker killed in the microseconds between
writing a batch's replies and writing its ack (or, rarer still, a task that ran
twice whose second result is redelivered after a crash that lost the `sent`
mark). A reply publish that fails leaves the batch unacked: it is redelivered and
the reply sent then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from loguru import logger
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from leveret.amqp import json_message
from leveret.contracts import REPLY_RESULT, TaskError, TaskResult, utcnow
from leveret.db import map_db_errors
from leveret.errors import BrokerError, LeveretError, StoreUnavailable
from leveret.tracker.state import TaskRecord
from leveret.tracker.store import TrackerStore


def reply_of(record: TaskRecord) -> aio_pika.Message:
    """The reply for a task's recorded outcome (see the module docstring)."""
    error = None
    if record.error_type is not None:
        error = TaskError(type=record.error_type, message=record.error_message or "")
    result = TaskResult(
        id=record.id,
        kind=record.kind or "",
        pool=record.pool or "default",
        status=record.status,
        result=record.result,
        error=error,
        attempt=record.attempt,
        worker=record.worker,
        submitted_at=record.submitted_at,
        started_at=record.started_at,
        finished_at=record.finished_at or utcnow(),
    )
    return json_message(
        result,
        persistent=False,
        correlation_id=record.correlation_id or record.id,
        message_id=f"{record.id}:result",
        type_=REPLY_RESULT,
    )


class ReplySender:
    """Publishes owed replies and marks them sent (see the module docstring)."""

    def __init__(self, store: TrackerStore) -> None:
        self.store = store
        self.sent = 0
        self._channel: AbstractChannel | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Open the replies' own channel, without confirms (see the module docstring);
        a broken reply cannot take the consumers' channels down with it."""
        self._channel = await connection.channel(publisher_confirms=False)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def publish(self, records: Sequence[TaskRecord]) -> list[str]:
        """Publish the replies of these records, each built before the first goes out so
        that they leave in one burst; the ids published. Raises when the broker is in
        trouble: the caller then leaves its deliveries unacked (redelivered, replied)."""
        todo = [(r.reply_to, reply_of(r), r.id) for r in records if r.reply_to]
        if not todo:
            return []
        channel = self._channel
        if channel is None or channel.is_closed:
            raise BrokerError("the replies channel is not open")
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        for address, message, _ in todo:
            # Queued for the connection's writer without waiting for it (wait=False), so
            # no other step runs between these frames and the ack the caller queues next:
            # the writer sends them back to back.
            await underlay.basic_publish(
                message.body,
                routing_key=address,
                properties=message.properties,
                mandatory=False,
                wait=False,
            )
        self.sent += len(todo)
        return [task_id for _, _, task_id in todo]

    async def mark_sent(self, task_ids: Sequence[str]) -> None:
        """Mark published replies sent, waiting out transient database failures. A reply
        left `owed` costs only a second copy if a redelivery names its task again."""
        if not task_ids:
            return
        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
                retry=retry_if_exception_type(StoreUnavailable),
                stop=stop_after_delay(30),
                reraise=True,
            ):
                with attempt, map_db_errors():
                    await self.store.mark_replies_sent(task_ids, utcnow())
        except LeveretError:  # the replies are out; only the record of it is missing
            logger.exception("marking {} replies sent failed", len(task_ids))
