"""Consumes the tracker queue in batches.

Ack timing: a batch is acked (one ``ack(multiple=True)`` per channel) only after
the store committed it and, when it held results, after the broker confirmed the
`tasks.ended` event that tells the scheduler those outcomes (unconfirmed: the
batch goes back to the queue, is applied again as a no-op, and told); the
replies the batch left owed to producers are published just before the ack, with
nothing awaited between them, and marked sent after it (see
:mod:`leveret.tracker.replies`; a redelivered message's task gets a reply still owed).
A batch that owes no reply costs nothing more. A message
that cannot be decoded is rejected without requeue, so the queue dead-letters it
to the `rejected` queue; it is never acked and forgotten. So is a message bigger
than its bound (:func:`size_limit`), refused before it is parsed, never recorded.
When the database is unavailable (:class:`~leveret.errors.StoreUnavailable`, from
:func:`leveret.db.map_db_errors`) the same batch is retried with backoff and stays unacked
(back-pressure through the prefetch window, not loss). If the store refuses a
batch for another reason, its messages are applied one by one and only the ones
it still refuses are dead-lettered. Redelivered messages are harmless: applying
a message twice changes nothing.

:meth:`Consumer.caught_up_at` and :meth:`Consumer.listening_since` tell the watchdog
what the tracker can have heard: a heartbeat waiting in the tracker's own backlog,
or sent while the tracker was cut off from the broker, is not silence.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime

from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from loguru import logger
from pydantic import ValidationError

from leveret.amqp import (
    BROKER_EXCEPTIONS,
    UNCONFIRMED,
    Outgoing,
    ack_batch,
    channel_gone,
    json_message,
    open_channel,
    publish_all,
    return_to_queue,
)
from leveret.batching import Batches, chunks
from leveret.contracts import (
    MAX_EVENT_BYTES,
    MAX_RESULT_BYTES,
    CancelTask,
    EndedTask,
    SchedulerStarted,
    TaskResult,
    TasksAccepted,
    TasksEnded,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
    decode_event,
    utcnow,
)
from leveret.db import until_stored
from leveret.roles import RefusedSenders, RoleUsers, sender_of
from leveret.topology import RK_TASKS_ACCEPTED, RK_TASKS_ENDED, Topology
from leveret.tracker.ledger import message_ids
from leveret.tracker.replies import ReplySender
from leveret.tracker.state import TaskRecord, TrackerMessage
from leveret.tracker.store import Applied, TrackerStore

#: Outcomes per `tasks.ended` event (a batch may hold more).
ENDED_PER_EVENT = 1000
#: Bound on the two events services publish in batches whose size grows with the batch
#: (the scheduler's `tasks.accepted` chunks, the tracker's own `tasks.ended`): RabbitMQ's
#: default `max_message_size`, so nothing the broker carries by default is refused.
#: Every other event (workers keep theirs within it) is bounded by MAX_EVENT_BYTES.
MAX_BATCH_EVENT_BYTES = 16 * 1024 * 1024
_BATCH_EVENTS: dict[str, type[TasksAccepted | TasksEnded]] = {
    RK_TASKS_ACCEPTED: TasksAccepted,
    RK_TASKS_ENDED: TasksEnded,
}
#: Distinct senders remembered per worker id (for fencing: see leveret.roles).
MAX_USERS_PER_WORKER = 8
#: Worker ids whose senders are remembered; the least recently heard is forgotten first.
MAX_WORKER_IDS = 10_000
#: At most one log line per this many seconds about oversized messages.
OVERSIZED_LOG_EVERY_S = 60.0


def _records(message: TrackerMessage) -> bool:
    """Whether applying `message` can change anything the tracker stores."""
    return not isinstance(message, TasksEnded | CancelTask | SchedulerStarted)


def message_type(message: TrackerMessage) -> str:
    """The type :data:`leveret.roles.SENDERS` knows a message by."""
    return "result" if isinstance(message, TaskResult) else str(message.type)


class Undecodable(ValueError):
    """A delivery that is not a message the tracker understands."""


class Oversized(Undecodable):
    """A delivery bigger than its bound: refused unparsed."""


def size_limit(topology: Topology, exchange: str, routing_key: str) -> int:
    """The largest body the tracker parses from this exchange under this routing key."""
    if exchange == topology.results_exchange:
        return MAX_RESULT_BYTES
    if routing_key in _BATCH_EVENTS:
        return MAX_BATCH_EVENT_BYTES
    return MAX_EVENT_BYTES


def decode(topology: Topology, exchange: str, body: bytes, routing_key: str = "") -> TrackerMessage:
    """The message in a delivery, by the exchange it came through; raises :class:`Undecodable`
    (:class:`Oversized` before parsing a body over :func:`size_limit`)."""
    limit = size_limit(topology, exchange, routing_key)
    if len(body) > limit:
        raise Oversized(f"{len(body)} bytes, over the bound of {limit} for {routing_key!r}")
    message = _parse(topology, exchange, body)
    expected = _BATCH_EVENTS.get(routing_key)
    if len(body) > MAX_EVENT_BYTES and expected is not None and not isinstance(message, expected):
        raise Oversized(f"{len(body)} bytes, over the bound of {MAX_EVENT_BYTES} for its type")
    return message


def _parse(topology: Topology, exchange: str, body: bytes) -> TrackerMessage:
    try:
        if exchange == topology.results_exchange:
            return TaskResult.model_validate_json(body)
        if exchange == topology.events_exchange:
            return decode_event(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise Undecodable(f"{exc.error_count()} error(s); {where}: {first['msg']}") from exc
    raise Undecodable(f"unexpected exchange {exchange!r}")


class Consumer:
    """Feeds the tracker queue to the store in batches; see the module docstring for acks."""

    def __init__(
        self,
        store: TrackerStore,
        topology: Topology,
        *,
        prefetch: int,
        batch_max: int,
        batch_wait_ms: float,
        replies: ReplySender | None = None,
        roles: RoleUsers | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """`replies` sends the replies a batch leaves owed (None: none is sent); `roles`
        says who may send what (default: anyone anything); `clock` stamps worker news."""
        self.roles = roles or RoleUsers({})
        # worker id -> verified senders of its news, least recently heard first
        self.worker_users: OrderedDict[str, set[str]] = OrderedDict()
        self.clock = clock
        self.forged = RefusedSenders()
        self.store = store
        self.replies = replies
        self.topology = topology
        self.prefetch = prefetch
        self.applied = 0
        self.refused = 0
        self.oversized = 0
        self._oversized_logged = 0  # how many had been refused at the last log line
        self._oversized_log_at = float("-inf")
        self._inbox: Batches[AbstractIncomingMessage] = Batches(
            limit=batch_max, wait_ms=batch_wait_ms
        )
        self._sent: list[str] = []  # replies published, not yet recorded as sent
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._events: AbstractExchange | None = None
        self._stopping = False
        self._caught_up = utcnow()
        self._listening_since = utcnow()

    def caught_up_at(self) -> datetime:
        """When the consumer last had nothing left to apply while connected: now while it
        waits for input on an open channel, else the last such moment (at first: start)."""
        if self._inbox.waiting and self.running:
            self._caught_up = utcnow()
        return self._caught_up

    def listening_since(self) -> datetime:
        """When the consumer last (re)started consuming: at start and after a reconnect."""
        return self._listening_since

    def _reopened(self, *_: object) -> None:
        self._listening_since = utcnow()

    @property
    def running(self) -> bool:
        """True while consuming on an open channel."""
        channel = self._channel
        return (
            self._tag is not None
            and not self._stopping
            and channel is not None
            and not channel.is_closed
        )

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Open a channel with the prefetch window and start consuming the tracker queue."""
        self._channel = await open_channel(connection, prefetch=self.prefetch)
        if isinstance(self._channel, AbstractRobustChannel):
            self._channel.reopen_callbacks.add(self._reopened)
        self._listening_since = utcnow()
        self._queue = await self.topology.tracker.declare(self._channel)
        self._events = await self._channel.get_exchange(self.topology.events_exchange)
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Deliveries are handed over in order; the batch loop keeps that order.
        self._inbox.put(message)

    async def stop(self) -> None:
        """Stop taking deliveries; :meth:`run` returns once what it holds is applied."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except BROKER_EXCEPTIONS as exc:
                logger.warning("cancelling the tracker consumer failed: {}", exc)
        self._inbox.end()

    async def close(self) -> None:
        """Close the channel (unacked deliveries go back to the queue)."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def run(self) -> None:
        """Apply batches until :meth:`stop` was called and the inbox is drained."""
        while True:
            idle = self._inbox.drained  # so `next` waits for input: all was applied
            batch = await self._inbox.next()
            if idle and self.running:
                self._caught_up = utcnow()
            if batch:
                await self._process(batch)
            if self._inbox.drained:
                await self._mark_sent()  # idle: nothing waits behind this write
            if self._inbox.finished:
                return

    async def _mark_sent(self) -> None:
        """Record the replies sent since the last write. Under load the next batch's
        transaction records them (no transaction of their own); when nothing else is
        waiting, this one does."""
        if self._sent and self.replies is not None:
            sent, self._sent = self._sent, []
            await self.replies.mark_sent(sent)

    async def _decode_all(
        self, batch: list[AbstractIncomingMessage]
    ) -> list[tuple[AbstractIncomingMessage, TrackerMessage]]:
        """The batch's messages; every delivery that is not one is dead-lettered."""
        decoded: list[tuple[AbstractIncomingMessage, TrackerMessage]] = []
        for delivery in batch:
            try:
                message = decode(
                    self.topology,
                    delivery.exchange or "",
                    delivery.body,
                    delivery.routing_key or "",
                )
            except Oversized as exc:
                await self._refuse_oversized(delivery, str(exc))
            except Undecodable as exc:
                await self._refuse(delivery, str(exc))
            else:
                if self._sent_by_its_role(delivery, message):
                    decoded.append((delivery, self._as_received(delivery, message)))
                else:
                    await self._refuse_sender(delivery, message_type(message))
        return decoded

    def _sent_by_its_role(self, delivery: AbstractIncomingMessage, message: TrackerMessage) -> bool:
        return self.roles.may_send(message_type(message), sender_of(delivery))

    def _as_received(
        self, delivery: AbstractIncomingMessage, message: TrackerMessage
    ) -> TrackerMessage:
        """A worker event as heard: its verified sender noted for fencing, its time the
        tracker's receipt time (liveness never trusts the sender's clock: one ahead would
        hide a hung worker, one behind would get a healthy one fenced)."""
        if not isinstance(message, WorkerStarted | WorkerHeartbeat | WorkerStopped):
            return message
        if isinstance(message, WorkerStopped):
            self._note_sender(message.worker, sender_of(delivery) or "")
            return message.model_copy(update={"at": self.clock()})
        self._note_sender(message.worker.id, sender_of(delivery) or "")
        return message.heard(self.clock())

    def _note_sender(self, worker_id: str, user: str) -> None:
        users = self.worker_users.pop(worker_id, set())
        if len(users) < MAX_USERS_PER_WORKER:
            users.add(user)
        self.worker_users[worker_id] = users
        while len(self.worker_users) > MAX_WORKER_IDS:
            self.worker_users.popitem(last=False)

    def forget_workers(self, worker_ids: Iterable[str]) -> None:
        """Forget the senders of workers whose registrations were dropped."""
        for worker_id in worker_ids:
            self.worker_users.pop(worker_id, None)

    async def _refuse_sender(self, delivery: AbstractIncomingMessage, kind: str) -> None:
        """Set aside a message its sender's role may not send: dead-lettered to the
        `rejected` queue, not acted on (see :class:`leveret.roles.RefusedSenders`)."""
        self.forged.refused(kind, sender_of(delivery), delivery.message_id)
        await self._dead_letter(delivery)

    async def _process(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded = await self._decode_all(batch)
        if not any(_records(m) for _, m in decoded):
            # Nothing to write (e.g. events a broker set up by an earlier version still
            # routes here): no transaction.
            await ack_batch([d for d, _ in decoded])
            self.applied += len(decoded)
            return
        # Tasks named by redelivered messages that can make a reply owed (a result, or
        # the announcement that brings `reply_to`): a tracker that died after their
        # commit may not have sent the reply (see leveret.tracker.replies). Other events
        # (a `task.started` overtaken by its result, say) never ask for it again.
        resend = {
            t
            for d, m in decoded
            if d.redelivered and isinstance(m, TaskResult | TasksAccepted)
            for t in message_ids(m)[0]
        }
        try:
            applied = await self._apply([m for _, m in decoded], resend)
            done, ended, owed = [d for d, _ in decoded], list(applied.ended), applied.replies
        except Exception:  # the store refuses the batch: find the message(s) it refuses
            logger.exception(
                "tracker store refused a batch of {}; applying one by one", len(decoded)
            )
            done, ended, owed = await self._apply_one_by_one(decoded, resend)
        if ended and not await self._tell_scheduler(ended):
            for delivery in done:  # applied again on redelivery (a no-op), then told
                await return_to_queue(delivery)
            return
        replied: list[str] = []
        if owed and self.replies is not None:
            kept = {id(d) for d in done}
            try:
                replied = await self._reply_then_ack([p for p in decoded if id(p[0]) in kept], owed)
            except Exception as exc:  # redelivered, and replied then
                logger.warning("{} replies not sent ({}); returning the batch", len(owed), exc)
                for delivery in done:
                    if not getattr(delivery, "processed", False):
                        await return_to_queue(delivery)
                return
        else:
            await ack_batch(done)
        self.applied += len(done)
        self._sent += replied

    async def _reply_then_ack(
        self,
        pairs: list[tuple[AbstractIncomingMessage, TrackerMessage]],
        owed: tuple[TaskRecord, ...],
    ) -> list[str]:
        """Send each owed reply right before the ack (``multiple``) of the first delivery
        that names its task, then ack the rest; the ids replied. Replies and acks go to
        the connection's writer in that order with nothing awaited between them, so if
        an ack reached the broker, the replies before it did; a tracker killed midway
        leaves unacked only deliveries whose replies were (at most the last few) not
        yet written, and their redelivery sends what is still owed."""
        assert self.replies is not None
        waiting = {r.id: r for r in owed}
        replied: list[str] = []
        acked: dict[int, AbstractIncomingMessage] = {}
        for delivery, message in pairs:
            named = [waiting.pop(t) for t in message_ids(message)[0] if t in waiting]
            if not named:
                continue
            replied += await self.replies.publish(named)
            if not channel_gone(delivery):
                await delivery.ack(multiple=True)
                acked[id(delivery.channel)] = delivery
        if waiting:  # owed by a task no delivery names (not expected): before the last ack
            replied += await self.replies.publish(list(waiting.values()))
        last: dict[int, AbstractIncomingMessage] = {}
        for delivery, _ in pairs:
            if not channel_gone(delivery):
                last[id(delivery.channel)] = delivery
        for channel, delivery in last.items():
            if acked.get(channel) is not delivery:
                await delivery.ack(multiple=True)
        return replied

    async def _apply(self, messages: list[TrackerMessage], resend: set[str]) -> Applied:
        """Apply in one transaction (with the replies sent since the last one), waiting
        out :class:`StoreUnavailable`."""
        applied = await until_stored(
            lambda: self.store.apply(messages, resend=resend, sent=self._sent),
            "tracker store write",
        )
        self._sent = []
        return applied

    async def _apply_one_by_one(
        self, decoded: list[tuple[AbstractIncomingMessage, TrackerMessage]], resend: set[str]
    ) -> tuple[list[AbstractIncomingMessage], list[EndedTask], tuple[TaskRecord, ...]]:
        done: list[AbstractIncomingMessage] = []
        ended: list[EndedTask] = []
        owed: tuple[TaskRecord, ...] = ()
        for delivery, message in decoded:
            try:
                applied = await self._apply([message], resend)
            except Exception as exc:  # loop boundary: one bad message must not stop the tracker
                logger.exception("tracker store refused message {}", delivery.message_id)
                await self._refuse(delivery, f"store refused it: {type(exc).__name__}")
            else:
                done.append(delivery)
                ended += applied.ended
                owed += applied.replies
        return done, ended, owed

    async def _tell_scheduler(self, ended: list[EndedTask]) -> bool:
        """Publish the committed outcomes as `tasks.ended` (confirmed) before the batch is
        acked: the scheduler releases or ends the tasks waiting for them. False if the
        broker did not confirm (the batch then goes back to the queue)."""
        assert self._events is not None
        events = [
            Outgoing(self._events, RK_TASKS_ENDED, json_message(TasksEnded(tasks=list(part))))
            for part in chunks(ended, ENDED_PER_EVENT)
        ]
        try:
            await publish_all(events)
        except UNCONFIRMED as exc:
            logger.warning("tasks.ended not confirmed ({}); returning the batch", exc)
            return False
        return True

    async def _refuse_oversized(self, delivery: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter an oversized delivery, unparsed; one log line (with the count so
        far) per :data:`OVERSIZED_LOG_EVERY_S` at most, so a flood does not flood the log."""
        self.oversized += 1
        now = time.monotonic()
        if now - self._oversized_log_at >= OVERSIZED_LOG_EVERY_S:
            logger.warning(
                "refused oversized message {} from exchange {!r} key {!r}: {}; "
                "{} oversized refused so far ({} since the last such line)",
                delivery.message_id,
                delivery.exchange,
                delivery.routing_key,
                reason,
                self.oversized,
                self.oversized - self._oversized_logged,
            )
            self._oversized_log_at = now
            self._oversized_logged = self.oversized
        await self._dead_letter(delivery)

    async def _refuse(self, delivery: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter one delivery (reject without requeue) and say why."""
        logger.warning(
            "rejected message {} from exchange {!r} key {!r}: {}",
            delivery.message_id,
            delivery.exchange,
            delivery.routing_key,
            reason,
        )
        logger.debug("rejected body: {!r}", delivery.body[:512])
        await self._dead_letter(delivery)

    async def _dead_letter(self, delivery: AbstractIncomingMessage) -> None:
        self.refused += 1
        try:
            await delivery.reject(requeue=False)
        except BROKER_EXCEPTIONS as exc:
            logger.warning("reject not sent (the broker will redeliver): {}", exc)
