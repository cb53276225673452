"""The scheduler's view of how tasks end: `tasks.ended` events from the tracker.

The tracker, which consumes every result anyway, publishes the outcomes it
committed as one `tasks.ended` event per batch (after its commit, before its
ack) to ``<namespace>.scheduler.outcomes``, a durable quorum queue, so outcomes
sent while the scheduler is down wait there. Consuming one small event per
tracker batch instead of every result is what keeps dependencies cheap.

Events are taken in batches: ONE store transaction records the terminal outcome
of each task the store knows (the first one wins; unknown ids cost an UPDATE
that matches nothing), and returns the blocked tasks waiting for those ids,
which the :class:`~leveret.scheduler.dependencies.Resolver` then releases or
ends. The batch is acked (``multiple=True``) only after the commit and the
resolution; an undecodable delivery is rejected, so the queue dead-letters it,
never acked and forgotten. A plain result (what the queue carried in earlier
builds, when it was bound to the results exchange) is still understood.
"""

from __future__ import annotations

import contextlib

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from loguru import logger
from pydantic import ValidationError

from leveret.amqp import (
    BROKER_EXCEPTIONS,
    ack_batch,
    map_broker_errors,
    open_channel,
    return_to_queue,
)
from leveret.batching import Batches
from leveret.contracts import ENDED_STATUSES, TaskResult, TasksEnded, decode_event
from leveret.db import map_db_errors, until_stored
from leveret.errors import UnavailableError
from leveret.roles import RefusedSenders, RoleUsers, sender_of
from leveret.scheduler.dependencies import Resolver
from leveret.scheduler.store import SubmissionStore
from leveret.topology import Topology

#: Deliveries of one outcome message before it is dead-lettered (a crash loop).
OUTCOMES_DELIVERY_LIMIT = 5


class Outcomes:
    """Consumes the outcomes queue in batches; see the module docstring for acks."""

    def __init__(
        self,
        store: SubmissionStore,
        resolver: Resolver,
        topology: Topology,
        *,
        prefetch: int = 1000,
        batch_max: int = 500,
        batch_wait_ms: float = 0.0,
        roles: RoleUsers | None = None,
    ) -> None:
        """`roles` says who may send outcomes (default: anyone)."""
        self.roles = roles or RoleUsers({})
        self.forged = RefusedSenders()
        self.store = store
        self.resolver = resolver
        self.topology = topology
        self.prefetch = prefetch
        self.recorded = 0
        self._inbox: Batches[AbstractIncomingMessage] = Batches(
            limit=batch_max, wait_ms=batch_wait_ms
        )
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Start consuming the queue (declared and bound with the topology)."""
        self._channel = await open_channel(connection, prefetch=self.prefetch)
        self._queue = await self.topology.scheduler_outcomes.declare(self._channel)
        # Earlier builds bound the queue to every result; that binding is no longer wanted.
        results = await self._channel.get_exchange(self.topology.results_exchange)
        await self._queue.unbind(results, "#")
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put(message)

    async def stop(self) -> None:
        """Stop consuming and close the channel (unacked deliveries are redelivered)."""
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*BROKER_EXCEPTIONS):
                await self._queue.cancel(self._tag)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*BROKER_EXCEPTIONS):
                await self._channel.close()

    async def run(self) -> None:
        """Process batches forever (cancel to stop)."""
        while True:
            await self._process(await self._inbox.next())

    async def _process(self, batch: list[AbstractIncomingMessage]) -> None:
        outcomes: list[tuple[str, str, str | None]] = []
        kept: list[AbstractIncomingMessage] = []
        for delivery in batch:
            try:
                kind, found = _outcomes(delivery.body)
                if not self.roles.may_send(kind, sender_of(delivery)):
                    self.forged.refused(kind, sender_of(delivery), delivery.message_id)
                    raise ValueError(f"{kind} from a user whose role may not send it")
                outcomes += found
            except ValueError as exc:
                logger.warning("outcome {} dead-lettered: {}", delivery.message_id, exc)
                with contextlib.suppress(*BROKER_EXCEPTIONS):
                    await delivery.reject(requeue=False)
                continue
            kept.append(delivery)
        try:
            waiting = await self._record(outcomes)
            if waiting:
                with map_db_errors(), map_broker_errors():
                    await self.resolver.resolve(waiting)
        except UnavailableError as exc:  # the broker or store failed: they come back later
            logger.warning("resolving after {} outcomes failed, returning them: {}", len(kept), exc)
            await _return_all(kept)
            return
        except Exception:  # loop boundary: give the batch back; the delivery limit counts
            logger.exception("recording {} outcomes failed; returning them", len(kept))
            await _return_all(kept)
            return
        self.recorded += len(outcomes)
        await ack_batch(kept)

    async def _record(self, outcomes: list[tuple[str, str, str | None]]) -> list[str]:
        """Record in one transaction, waiting out an unavailable database (a
        :class:`StoreUnavailable`; a :class:`StoreError` is raised at once)."""
        return await until_stored(
            lambda: self.store.record_outcomes(outcomes), "recording outcomes"
        )


async def _return_all(deliveries: list[AbstractIncomingMessage]) -> None:
    for delivery in deliveries:
        await return_to_queue(delivery)


def _outcomes(body: bytes) -> tuple[str, list[tuple[str, str, str | None]]]:
    """The message's type and (id, status, error type) of each outcome that ends a
    parent, from a `tasks.ended` event or a plain result; raises ValueError for
    anything else."""
    try:
        event = decode_event(body)
    except ValidationError:
        result = TaskResult.model_validate_json(body)  # the form of earlier builds
        if result.status not in ENDED_STATUSES:
            return "result", []
        error = result.error.type if result.error is not None else None
        return "result", [(result.id, str(result.status), error)]
    if not isinstance(event, TasksEnded):
        raise ValueError(f"unexpected event {event.type!r} on the outcomes queue")
    ended = [(t.id, str(t.status), t.error_type) for t in event.tasks if t.status in ENDED_STATUSES]
    return event.type, ended
