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
2. After the commit the writer (the consumer, the dead-letter handler) hands the
   owed records to :meth:`ReplySender.send`: a :class:`~leveret.contracts.TaskResult`
   built from the recorded outcome, published through the default exchange, not
   persistent, never mandatory (a reply queue may be gone), with publisher confirms;
   ``correlation_id`` is the task's (or its id), ``type`` is ``task.result`` and
   ``message_id`` is ``<task id>:result`` so a consumer can recognise a repeat.
3. The confirmed ones are marked `sent` in a short transaction, and only then does
   the writer ack its deliveries.
4. A sweep, at start and every :data:`SWEEP_INTERVAL_S`, sends the replies still
   owed after :data:`SWEEP_GRACE_S` (a crash, or a failed publish, between the
   commit and the send).

Delivery is at least once. The one window for a second copy is a tracker killed
(SIGKILL) between the broker's confirm and the `sent` commit: the sweep of the
next tracker sends that reply again, with the same ``message_id``. A reply to a
queue that is gone (the producer stopped waiting) is confirmed and dropped by
the broker, and counts as sent. Within one tracker a reply is never sent twice
at once (the sender skips what it is already sending); several tracker replicas
leave each other's fresh replies alone for :data:`SWEEP_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from loguru import logger
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from leveret.amqp import UNCONFIRMED, json_message, open_channel
from leveret.contracts import REPLY_RESULT, TaskError, TaskResult, utcnow
from leveret.db import is_transient
from leveret.tracker.state import TaskRecord
from leveret.tracker.store import TrackerStore

#: Seconds between two sweeps for replies still owed.
SWEEP_INTERVAL_S = 3.0
#: How long a reply must have been owed before the sweep sends it: the writer that
#: marked it is sending it now (this process knows; another replica might be).
SWEEP_GRACE_S = 2.0
#: Replies per sweep round (the next round takes the rest).
SWEEP_BATCH = 1000
#: How long a reply's confirm may take before it counts as not sent.
PUBLISH_TIMEOUT_S = 30.0


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
    """Sends owed replies, confirmed, and marks them sent (see the module docstring)."""

    def __init__(
        self,
        store: TrackerStore,
        *,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        sweep_grace_s: float = SWEEP_GRACE_S,
    ) -> None:
        self.store = store
        self.sweep_interval_s = sweep_interval_s
        self.sweep_grace_s = sweep_grace_s
        self.sent = 0
        self._channel: AbstractChannel | None = None
        self._sending: set[str] = set()

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Open the replies' own channel (confirms on): a broken reply cannot take the
        consumers' channels, and their unacked deliveries, down with it."""
        self._channel = await open_channel(connection)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def send(self, records: Sequence[TaskRecord]) -> int:
        """Publish the replies of these records (their tasks owe one), wait for the
        confirms, then mark the confirmed ones sent. Returns how many were confirmed and
        marked.
        Never raises for the broker: an unconfirmed reply stays owed for the sweep."""
        todo = [r for r in records if r.reply_to and r.id not in self._sending]
        if not todo:
            return 0
        ids = [r.id for r in todo]
        self._sending.update(ids)
        try:
            confirmed = await self._publish(todo)
            if confirmed and await self._mark_sent(confirmed):
                return len(confirmed)
            return 0
        finally:
            self._sending.difference_update(ids)

    async def _publish(self, records: list[TaskRecord]) -> list[str]:
        """Publish each reply and wait for all confirms together; the confirmed ids."""
        channel = self._channel
        if channel is None or channel.is_closed:
            logger.warning("{} replies not sent (no channel yet); the sweep retries", len(records))
            return []
        exchange = channel.default_exchange
        # Like publish_all, but each reply's confirm counts on its own: a reply that was
        # confirmed is marked sent even if another one of the batch was not.
        outcomes = await asyncio.gather(
            *(
                exchange.publish(
                    reply_of(r), r.reply_to or "", mandatory=False, timeout=PUBLISH_TIMEOUT_S
                )
                for r in records
            ),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        for exc in failed:
            if not isinstance(exc, UNCONFIRMED):
                raise exc
        if failed:
            logger.warning(
                "{} of {} replies not confirmed ({}); the sweep retries them",
                len(failed),
                len(records),
                failed[0],
            )
        return [
            r.id for r, o in zip(records, outcomes, strict=True) if not isinstance(o, BaseException)
        ]

    async def _mark_sent(self, task_ids: list[str]) -> bool:
        """Mark confirmed replies sent, waiting out transient database failures (a reply
        left `owed` after its confirm would be sent again by the sweep)."""
        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
                retry=retry_if_exception(is_transient),
                reraise=True,
            ):
                with attempt:
                    await self.store.mark_replies_sent(task_ids, utcnow())
        except Exception:  # a refusal, not an outage: the sweep will send them again
            logger.exception("marking {} replies sent failed; may send them twice", len(task_ids))
            return False
        self.sent += len(task_ids)
        return True

    async def sweep(self) -> int:
        """Send the replies still owed after the grace period; returns how many went out."""
        total = 0
        while True:
            cutoff = utcnow() - timedelta(seconds=self.sweep_grace_s)
            owed = await self.store.owed_replies(cutoff, SWEEP_BATCH)
            owed = [r for r in owed if r.id not in self._sending]
            if not owed:
                return total
            confirmed = await self.send(owed)
            total += confirmed
            if confirmed < len(owed) or len(owed) < SWEEP_BATCH:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep at start, then every :attr:`sweep_interval_s`, until `stop` is set."""
        while not stop.is_set():
            try:
                sent = await self.sweep()
            except Exception:  # loop boundary: a failed sweep must not stop the tracker
                logger.exception("reply sweep failed; trying again in {} s", self.sweep_interval_s)
            else:
                if sent:
                    logger.info("reply sweep sent {} replies that were still owed", sent)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sweep_interval_s)
