"""AMQP intake: submissions published to the submit exchange.

Ack timing: a submission is acked only after its work message (or, for bad
input, its `rejected` result and the dead-lettered copy) is confirmed by the
broker. Bad input is never requeued in a loop and never dropped silently: the
original message goes to the `rejected` queue with the reason in its headers.
If the store or broker is in trouble, the message stays unacked and admission is
retried with backoff: back-pressure, not loss.

Redeliveries: a submission whose delivery a crash left unacked comes back. With an
id (in the body or a valid `message_id`) the store knows it. Without one the
scheduler made a random id, so the redelivery must be recognised otherwise: each
id-less submission's row carries its *intake key*, a digest of what the producer
sent (see :func:`intake_key`), from the claim until its ack is recorded
(:class:`IntakeKeys`). A redelivered id-less submission takes the task of a row
with its key, if one is left, instead of making a new one; a first delivery is new
by definition and costs no lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import AbstractChannel
from loguru import logger
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from leveret.amqp import (
    Outgoing,
    annotated_copy,
    delivery_count,
    json_message,
    map_broker_errors,
    publish_all,
    return_to_queue,
    send_reply,
)
from leveret.contracts import (
    CANCEL_TYPE,
    ID_PATTERN,
    KIND_PATTERN,
    POOL_PATTERN,
    REPLY_RESULT,
    CancelTask,
    SubmitTask,
    TaskError,
    TaskResult,
    new_task_id,
    utcnow,
)
from leveret.db import map_db_errors
from leveret.errors import SubmissionError, UnavailableError
from leveret.roles import Role, RoleUsers, sender_of, valid_reply_to
from leveret.scheduler.admission import (
    Admission,
    KindCatalog,
    check_graph,
    check_supported,
    decode_json,
    envelope,
    parse_body,
    submission,
    unprocessable,
)
from leveret.scheduler.cancel import request_cancel
from leveret.scheduler.store import INTAKE_KEY_MAX_AGE, Submission, SubmissionStore
from leveret.topology import RK_REJECTED, DeclaredTopology, result_routing_key

_ID = re.compile(ID_PATTERN)
_KIND = re.compile(KIND_PATTERN)
_POOL = re.compile(POOL_PATTERN)

T = TypeVar("T")

#: Headers the broker adds or changes between deliveries of one message: never part
#: of what identifies a submission.
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death"})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")

#: How often acked intake keys are forgotten, and how long after its ack a key is
#: kept first (an ack written just before a crash may never reach the broker: its
#: redelivery must still find the task).
FORGET_EVERY_S = 2.0
FORGET_AFTER_S = 1.0
#: Who may submit or cancel on the intake: any other verified sender is refused.
SUBMITTERS = (Role.PRODUCER, Role.SCHEDULER)
#: Acked keys waiting to be forgotten, at most; beyond it the oldest stay set
#: (harmless: a key left set costs at most a rare false match).
FORGET_MAX = 100_000
#: How often keys older than INTAKE_KEY_MAX_AGE are cleared, the first time this long
#: after start (a crash's unacked deliveries come back first: they are at the head of
#: the queue).
CLEAR_STALE_EVERY_S = 600.0


def intake_key(message: AbstractIncomingMessage) -> str:
    """A SHA-256 of what identifies an AMQP submission's content, the same on every
    delivery of it: exchange, routing key, body, the properties a producer sets and
    its headers but the broker's own (`x-delivery-count`, `x-death`, …)."""
    headers = {k: v for k, v in (message.headers or {}).items() if not _broker_header(k)}
    parts: tuple[object, ...] = (
        message.exchange,
        message.routing_key,
        message.body,
        message.message_id,  # an invalid one: no id, yet it tells submissions apart
        message.correlation_id,
        message.reply_to,
        message.timestamp,
        message.type,
        message.app_id,
        message.user_id,
        message.content_type,
        message.content_encoding,
        message.priority,
        message.expiration,
        message.delivery_mode,
        headers,
    )
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else _canonical(part).encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def may_submit(roles: RoleUsers, user_id: str | None) -> bool:
    """Whether a submission or cancel from `user_id` (None: not stamped) is acted on:
    a producer's or the scheduler's (anyone's while either role lists no users)."""
    allowed: set[str] = set()
    for role in SUBMITTERS:
        listed = roles.users.get(role, frozenset())
        if not listed:
            return True
        allowed |= listed
    return user_id is not None and user_id in allowed


def _broker_header(name: str) -> bool:
    return name in _BROKER_HEADERS or name.startswith(_BROKER_HEADER_PREFIXES)


def _canonical(value: object) -> str:
    """A text form of a decoded AMQP value, the same for equal values (tables sorted)."""
    if isinstance(value, dict):
        items = sorted((str(k), _canonical(v)) for k, v in value.items())
        return "{" + ",".join(f"{k!r}:{v}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return f"{type(value).__name__}:{value!r}"


def redelivered(message: AbstractIncomingMessage) -> bool:
    """Whether the broker delivered this message before (to this or another consumer)."""
    return bool(message.redelivered) or delivery_count(message) > 0


def _channel_of(message: AbstractIncomingMessage) -> AbstractChannel | None:
    """The channel `message` arrived on, None once it closed."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


@dataclass(slots=True)
class _Holder:
    """Who holds a task: the delivery being admitted as it (`message`), or after its
    ack (`message` None) only the channel that ack went out on."""

    message: AbstractIncomingMessage | None
    channel: AbstractChannel | None

    def gone(self) -> bool:
        """Its channel closed: the broker requeued the delivery (or may have lost the
        ack), so a redelivery with its key may be it."""
        return self.channel is None or self.channel.is_closed


class IntakeKeys:
    """Which task an id-less AMQP delivery is, across its redeliveries.

    A task is *held* by the delivery being admitted as it (its first delivery, or a
    redelivery that found it), and after that delivery's ack by the channel the ack
    went out on, until the key is forgotten. A held task is never given to another
    delivery with the same key (two byte-identical submissions in flight stay two
    tasks, however their handling interleaves), unless the holder's channel closed:
    then the broker requeued that very delivery, or may not have seen its ack, and
    this may be it. Once acked, the task's key is forgotten in the store, lazily.
    """

    def __init__(
        self, store: SubmissionStore, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.clock = clock
        self._holders: dict[str, _Holder] = {}
        self._acked: deque[tuple[float, str, _Holder]] = deque()
        self.rematched = 0  #: redeliveries that found their first delivery's task
        self.left_set = 0  #: acked keys never forgotten (over the bound, or a store error)

    async def task_of(self, key: str, message: AbstractIncomingMessage) -> str | None:
        """The task a redelivered id-less submission's first delivery created, now held
        by `message`; None for a first delivery (no lookup) or when none is left."""
        if not redelivered(message):
            return None
        with map_db_errors():
            candidates = await self.store.unacked_intake(key)
        for task_id in candidates:  # no await from here on: the pick and hold are one step
            holder = self._holders.get(task_id)
            if holder is None or holder.message is message or holder.gone():
                self.hold(task_id, message)
                self.rematched += 1
                return task_id
        return None

    def hold(self, task_id: str, message: AbstractIncomingMessage) -> None:
        """`message` is being admitted as `task_id`."""
        self._holders[task_id] = _Holder(message, _channel_of(message))

    def done(self, task_id: str, message: AbstractIncomingMessage, *, acked: bool) -> None:
        """`message` is through: acked (its key is to be forgotten; its channel holds the
        task till then) or back to its queue (the task is free for its redelivery)."""
        holder = self._holders.get(task_id)
        mine = holder is not None and holder.message is message
        if not acked:
            if mine:
                del self._holders[task_id]
            return
        if holder is None:
            holder = self._holders[task_id] = _Holder(None, _channel_of(message))
        elif mine:
            holder.message = None  # keep no body: only the channel matters from now on
        self._acked.append((self.clock(), task_id, holder))
        if len(self._acked) > FORGET_MAX:
            _, old_id, old = self._acked.popleft()
            self._release(old_id, old)
            self.left_set += 1

    def _release(self, task_id: str, holder: _Holder) -> None:
        if self._holders.get(task_id) is holder:
            del self._holders[task_id]

    @property
    def pending(self) -> int:
        """Acked keys not yet forgotten."""
        return len(self._acked)

    async def forget(self, *, settled_only: bool = True) -> int:
        """Forget the keys acked at least :data:`FORGET_AFTER_S` ago (all of them with
        ``settled_only=False``); return how many. A store error only logs: intake
        never waits for this."""
        cutoff = self.clock() - FORGET_AFTER_S
        done: list[tuple[str, _Holder]] = []
        while self._acked and (not settled_only or self._acked[0][0] <= cutoff):
            _, task_id, holder = self._acked.popleft()
            done.append((task_id, holder))
        if not done:
            return 0
        for task_id, holder in done:
            self._release(task_id, holder)
        try:
            await self.store.forget_intake([task_id for task_id, _ in done])
        except Exception as exc:  # harmless: the keys stay set; never stop the loop
            self.left_set += len(done)
            logger.warning("{} intake keys left set: {}", len(done), exc)
            return 0
        return len(done)

    async def clear_stale(self) -> int:
        """Clear the keys set over :data:`INTAKE_KEY_MAX_AGE` ago (left by a failed forget,
        a crash between ack and forget, or the FORGET_MAX bound), but those of deliveries
        being admitted; return how many. A store error only logs."""
        admitting = [t for t, holder in self._holders.items() if holder.message is not None]
        try:
            cleared = await self.store.clear_stale_intake(utcnow() - INTAKE_KEY_MAX_AGE, admitting)
        except Exception as exc:  # harmless: tried again later
            logger.warning("stale intake keys not cleared: {}", exc)
            return 0
        if cleared:
            logger.info("cleared {} stale intake key(s)", cleared)
        return cleared

    async def run(self) -> None:
        """Forever, every :data:`FORGET_EVERY_S`, forget the keys of settled acks; every
        :data:`CLEAR_STALE_EVERY_S`, clear stale keys."""
        next_clear = self.clock() + CLEAR_STALE_EVERY_S
        while True:
            await asyncio.sleep(FORGET_EVERY_S)
            await self.forget()
            if self.clock() >= next_clear:
                await self.clear_stale()
                next_clear = self.clock() + CLEAR_STALE_EVERY_S


class Intake:
    """Consumes the intake queue; every message ends admitted or refused, then acked."""

    def __init__(
        self,
        admission: Admission,
        declared: DeclaredTopology,
        kinds: KindCatalog,
        *,
        max_bytes: int,
        roles: RoleUsers | None = None,
    ) -> None:
        """`roles` says who may submit and cancel (default: anyone)."""
        self.admission = admission
        self.roles = roles or RoleUsers({})
        self.declared = declared
        self.kinds = kinds
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.refused = 0
        self.keys = IntakeKeys(admission.store)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Handle one delivery (aio-pika runs these concurrently)."""
        self.in_flight += 1
        self.idle.clear()
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:  # loop boundary: never let one message stop the consumer
            # Back to the queue: redelivered, and dead-lettered after INTAKE_DELIVERY_LIMIT.
            logger.exception("intake message {} returned to its queue", message.message_id)
            await return_to_queue(message)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        sender = sender_of(message)
        if not may_submit(self.roles, sender):
            refusal = SubmissionError(
                "forbidden",
                f"user {sender or '(not stamped)'!r} is not a producer nor the scheduler "
                "(see docs/security.md, Roles on the broker)",
                403,
            )
            await self._refuse_and_ack(message, refusal, fresh_id=True)
            return
        if message.type == CANCEL_TYPE:
            await self._cancel(message)
            return
        keyed: str | None = None  # the task an id-less delivery holds (see IntakeKeys)
        acked = False
        try:
            try:
                task = self._decoded(message)
                default_id, key = await self._identity(message, task)
                keyed = default_id if key is not None else None  # held if a redelivery's
                held = self._admissible(message, task, default_id, key)
                if key is not None:
                    keyed = held.id
                    self.keys.hold(keyed, message)
                answers = await _retrying(lambda: self.admission.submit([held]))
            except SubmissionError as err:
                refusal = err
                await _retrying(lambda: self._refuse(message, refusal))
                await message.ack()
                acked = True
                return
            await self._answer_duplicate(message, held, answers[0].status)
            await message.ack()
            acked = True
        finally:
            if keyed is not None:
                self.keys.done(keyed, message, acked=acked)

    async def _identity(
        self, message: AbstractIncomingMessage, task: SubmitTask
    ) -> tuple[str | None, str | None]:
        """(default id, intake key): a valid `message_id` is the id of a task whose body
        names none; without either, the intake key, and the task a redelivery of this
        submission already is (now held by `message`), if any."""
        if task.id is not None:
            return None, None
        if _valid_id(message.message_id):
            return message.message_id, None
        key = intake_key(message)
        found = await _retrying(lambda: self.keys.task_of(key, message))
        if found is not None:
            logger.bind(task_id=found).info(
                "redelivered submission is task {}, made by its first delivery", found
            )
        return found, key

    async def _answer_duplicate(
        self, message: AbstractIncomingMessage, held: Submission, status: str
    ) -> None:
        """Tell the producer its submission named an existing task (never a redelivery's:
        that is the first delivery's own task)."""
        reply_to = message.reply_to
        if status != "duplicate" or not reply_to or redelivered(message):
            return
        if not valid_reply_to(reply_to):
            return
        work = held.message
        notice = TaskResult(id=work.id, kind=work.kind, pool=work.pool, status="duplicate")
        await send_reply(
            self.declared.channel,
            reply_to,
            json_message(
                notice,
                persistent=False,
                correlation_id=message.correlation_id or work.id,
                type_=REPLY_RESULT,
            ),
        )
        logger.info("task {} submitted again: duplicate of the existing one", work.id)

    def _decoded(self, message: AbstractIncomingMessage) -> SubmitTask:
        """The task in `message`, or a :class:`SubmissionError` saying why not."""
        with _total(message):
            task = parse_body(message.body, self.max_bytes)
            check_supported(task, self.kinds)
        return task

    def _admissible(
        self,
        message: AbstractIncomingMessage,
        task: SubmitTask,
        default_id: str | None,
        key: str | None,
    ) -> Submission:
        """The submission of `task`, or a :class:`SubmissionError` saying why not."""
        if message.reply_to and not valid_reply_to(message.reply_to):
            raise SubmissionError(
                "invalid_reply_to",
                f"reply_to {message.reply_to[:100]!r} is not direct reply-to nor a "
                "server- or client-named exclusive queue (see docs/security.md)",
                400,
            )
        with _total(message):
            pool = message.routing_key or None
            work = envelope(
                task,
                default_id=default_id,
                default_pool=pool if pool and pool != "#" else None,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
            )
            held = submission(task, work, intake_key=key)
            check_graph([held])
        return held

    async def _cancel(self, message: AbstractIncomingMessage) -> None:
        """A cancellation request: ``type`` = ``task.cancel``, body ``{"id": ...}``."""
        try:
            command = CancelTask.model_validate_json(message.body)
        except ValidationError as exc:
            refusal = SubmissionError("invalid_cancel", f"not a cancellation: {exc}", 400)
            await self._refuse_and_ack(message, refusal, fresh_id=True)
            return
        store = self.admission.store
        owner = await _retrying(lambda: store.owner_of(command.id))
        if owner is not None:  # submitted with an API token: only its owner cancels, on HTTP
            logger.bind(task_id=command.id).warning(
                "cancel of {} from {!r} over AMQP refused: the task has an owner",
                command.id,
                sender_of(message) or "(not stamped)",
            )
            refusal = SubmissionError(
                "not_owner",
                f"task {command.id} was submitted with an API token: cancel it over HTTP",
                403,
            )
            await self._refuse_and_ack(message, refusal, fresh_id=True)
            return
        dispatcher = self.admission.dispatcher
        answer = await _retrying(lambda: request_cancel(store, dispatcher, command))
        logger.bind(task_id=command.id).info("cancel request for {}: {}", command.id, answer)
        await message.ack()

    async def _refuse_and_ack(
        self, message: AbstractIncomingMessage, err: SubmissionError, *, fresh_id: bool
    ) -> None:
        """Refuse `message` (a new id for its `rejected` result with `fresh_id`: a refused
        cancel or sender must never end the task it names), then ack it."""
        await _retrying(lambda: self._refuse(message, err, fresh_id=fresh_id))
        await message.ack()

    async def _refuse(
        self, message: AbstractIncomingMessage, err: SubmissionError, *, fresh_id: bool = False
    ) -> None:
        guess = _guess_fields(message)
        task_id = (None if fresh_id else guess["id"]) or new_task_id()
        result = TaskResult(
            id=task_id,
            kind=guess["kind"] or "_",
            pool=guess["pool"] or "_",
            status="rejected",
            error=TaskError(type=err.code, message=err.message),
        )
        topo = self.declared.topology
        corr = message.correlation_id or task_id
        dead_copy = annotated_copy(
            message,
            {
                "x-leveret-error-type": err.code,
                "x-leveret-reason": err.message[:1000],
                "x-leveret-task-id": task_id,
                "x-leveret-routing-key": message.routing_key or "",
            },
        )
        await publish_all(
            [
                Outgoing(
                    self.declared.exchange(topo.results_exchange),
                    result_routing_key("rejected", result.pool, result.kind),
                    json_message(result, correlation_id=corr),
                ),
                Outgoing(self.declared.exchange(topo.dead_exchange), RK_REJECTED, dead_copy),
            ]
        )
        if message.reply_to and valid_reply_to(message.reply_to):
            await send_reply(
                self.declared.channel,
                message.reply_to,
                json_message(result, persistent=False, correlation_id=corr, type_=REPLY_RESULT),
            )
        self.refused += 1
        logger.bind(task_id=task_id).info("submission rejected: {}: {}", err.code, err.message)


@contextlib.contextmanager
def _total(message: AbstractIncomingMessage) -> Iterator[None]:
    """The decoder is meant to be total: anything but a SubmissionError is a bug, and
    refused (`unprocessable`), never a stranded message."""
    try:
        yield
    except SubmissionError:
        raise
    except Exception as exc:
        logger.opt(exception=exc).error("submission {} not decodable", message.message_id)
        raise unprocessable(exc) from exc


def _valid_id(value: str | None) -> bool:
    return bool(value) and bool(_ID.match(value or ""))


def _guess_fields(message: AbstractIncomingMessage) -> dict[str, str | None]:
    """Best-effort id, kind and pool of a refused message, for its `rejected` result."""
    data: Any = None
    with contextlib.suppress(SubmissionError):
        data = decode_json(message.body)
    obj = data if isinstance(data, dict) else {}

    def pick(value: Any, pattern: re.Pattern[str]) -> str | None:
        return value if isinstance(value, str) and pattern.match(value) else None

    return {
        "id": pick(obj.get("id"), _ID) or pick(message.message_id, _ID),
        "kind": pick(obj.get("kind"), _KIND),
        "pool": pick(obj.get("pool"), _POOL) or pick(message.routing_key, _POOL),
    }


async def _retrying(op: Callable[[], Awaitable[T]]) -> T:
    """Run `op` until it succeeds, backing off while the store or broker is in trouble."""
    try:  # the common case, without building a retry loop per message
        with map_broker_errors():
            return await op()
    except UnavailableError as exc:
        logger.warning("intake retrying after {}", exc)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(UnavailableError),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
        before_sleep=lambda state: logger.warning(
            "intake retrying after {}", state.outcome.exception() if state.outcome else None
        ),
        reraise=True,
    ):
        with attempt, map_broker_errors():
            return await op()
    raise AssertionError("unreachable")  # pragma: no cover
