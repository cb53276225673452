"""AMQP intake: submissions published to the submit exchange.

Ack timing: a submission is acked only after its work message (or, for bad
input, its `rejected` result and the dead-lettered copy) is confirmed by the
broker. Bad input is never requeued in a loop and never dropped silently: the
original message goes to the `rejected` queue with the reason in its headers.
If the store or broker is in trouble, the message stays unacked and admission is
retried with backoff: back-pressure, not loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage
from loguru import logger
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from leveret.amqp import (
    Outgoing,
    annotated_copy,
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
    TaskError,
    TaskResult,
    new_task_id,
)
from leveret.errors import SubmissionError, UnavailableError
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
from leveret.scheduler.store import Submission
from leveret.topology import RK_REJECTED, DeclaredTopology, result_routing_key

_ID = re.compile(ID_PATTERN)
_KIND = re.compile(KIND_PATTERN)
_POOL = re.compile(POOL_PATTERN)

T = TypeVar("T")


class Intake:
    """Consumes the intake queue; every message ends admitted or refused, then acked."""

    def __init__(
        self,
        admission: Admission,
        declared: DeclaredTopology,
        kinds: KindCatalog,
        *,
        max_bytes: int,
    ) -> None:
        self.admission = admission
        self.declared = declared
        self.kinds = kinds
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.refused = 0

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
        if message.type == CANCEL_TYPE:
            await self._cancel(message)
            return
        reply_to = message.reply_to
        try:
            held = self._admissible(message)
            work = held.message
            answers = await _retrying(lambda: self.admission.submit([held]))
        except SubmissionError as err:
            refusal = err
            await _retrying(lambda: self._refuse(message, refusal))
            await message.ack()
            return
        if answers[0].status == "duplicate" and reply_to and not message.redelivered:
            notice = TaskResult(id=work.id, kind=work.kind, pool=work.pool, status="duplicate")
            channel = self.declared.channel
            await send_reply(
                channel,
                reply_to,
                json_message(
                    notice,
                    persistent=False,
                    correlation_id=message.correlation_id or work.id,
                    type_=REPLY_RESULT,
                ),
            )
            logger.info("task {} submitted again: duplicate of the existing one", work.id)
        await message.ack()

    def _admissible(self, message: AbstractIncomingMessage) -> Submission:
        """The submission in `message`, or a :class:`SubmissionError` saying why not."""
        try:
            task = parse_body(message.body, self.max_bytes)
            check_supported(task, self.kinds)
            pool = message.routing_key or None
            work = envelope(
                task,
                default_id=message.message_id if _valid_id(message.message_id) else None,
                default_pool=pool if pool and pool != "#" else None,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
            )
            held = submission(task, work)
            check_graph([held])
        except SubmissionError:
            raise
        except Exception as exc:  # the decoder is meant to be total; refuse, never strand
            logger.opt(exception=exc).error("submission {} not decodable", message.message_id)
            raise unprocessable(exc) from exc
        return held

    async def _cancel(self, message: AbstractIncomingMessage) -> None:
        """A cancellation request: ``type`` = ``task.cancel``, body ``{"id": ...}``."""
        try:
            command = CancelTask.model_validate_json(message.body)
        except ValidationError as exc:
            refusal = SubmissionError("invalid_cancel", f"not a cancellation: {exc}", 400)
            await _retrying(lambda: self._refuse(message, refusal))
        else:
            dispatcher = self.admission.dispatcher
            answer = await _retrying(
                lambda: request_cancel(self.admission.store, dispatcher, command)
            )
            logger.bind(task_id=command.id).info("cancel request for {}: {}", command.id, answer)
        await message.ack()

    async def _refuse(self, message: AbstractIncomingMessage, err: SubmissionError) -> None:
        guess = _guess_fields(message)
        task_id = guess["id"] or new_task_id()
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
        if message.reply_to:
            await send_reply(
                self.declared.channel,
                message.reply_to,
                json_message(result, persistent=False, correlation_id=corr, type_=REPLY_RESULT),
            )
        self.refused += 1
        logger.bind(task_id=task_id).info("submission rejected: {}: {}", err.code, err.message)


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
