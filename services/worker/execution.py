"""Running one attempt of a task, and deciding whether a failure is retried.

Async handlers run on the event loop and are cancelled on timeout; sync handlers
run in a killable child process (see :mod:`leveret.worker.isolation`), so a
timeout always ends the attempt. An async handler that blocks the loop is
interrupted by the worker's loop monitor with :class:`~leveret.errors.BlockedEventLoop`,
a ``TaskFailed``: its attempt fails like any other. Nothing here touches the broker.

Bounds: an error's text is cut to ``MAX_ERROR_MESSAGE_CHARS`` (the cut marked), and a
result whose message would pass the worker's ``max_result_bytes`` fails its attempt
as ``result_too_large`` instead of being sent (see docs/security.md, "Sizes").
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pydantic import JsonValue, ValidationError
from pydantic_core import PydanticSerializationError

from leveret.contracts import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    TaskError,
    TaskMessage,
    TaskResult,
    TaskStatus,
)
from leveret.errors import BlockedEventLoop, TaskFailed
from leveret.handlers import Handler, Registry, TaskContext, clip
from leveret.topology import RETRY_STEPS_S
from leveret.worker.isolation import CallTimedOut, HandlerCrashed, ProcessPool

#: Failures that another attempt cannot fix, or must not try to: an async handler that
#: blocks the event loop (`blocked_event_loop`) stalls every task and the heartbeats of
#: the worker it runs on (see :mod:`leveret.worker.loopwatch`), so each retry would
#: spread that harm to another worker's whole load; it fails once, saying why. A result
#: too large to send would be too large again.
NOT_RETRIED = frozenset(
    {
        "unknown_kind",
        "bad_payload",
        "shell_disabled",
        "result_not_json",
        "result_too_large",
        # the same URL meets the same refusal on every attempt
        "http_forbidden_address",
        "http_forbidden_scheme",
        "http_too_many_redirects",
        "http_too_large",
        BlockedEventLoop.TYPE,
    }
)


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended."""

    status: TaskStatus
    value: JsonValue = None
    error: TaskError | None = None


def task_error(kind: str, message: str) -> TaskError:
    """An error of type `kind`, its type and message held to the protocol's bounds (a
    long type is cut plainly: it is meant for machines)."""
    plain = kind[:MAX_ERROR_TYPE_CHARS].encode("utf-8", "backslashreplace").decode()
    return TaskError(
        type=plain[:MAX_ERROR_TYPE_CHARS] or "error",
        message=clip(message, MAX_ERROR_MESSAGE_CHARS),
    )


def failure(kind: str, message: str) -> Outcome:
    """A failed outcome with an error of type `kind`."""
    return Outcome(TaskStatus.FAILED, None, task_error(kind, message))


def describe(exc: BaseException) -> str:
    """An exception's text (its repr if empty), even when its ``__str__`` itself fails."""
    try:
        return str(exc) or repr(exc)
    except Exception:
        return f"{type(exc).__name__} (its text could not be read)"


def result_message(
    fields: dict[str, Any], outcome: Outcome, max_bytes: int
) -> tuple[TaskResult, bytes]:
    """The result of an attempt and the body of its message, never over `max_bytes`: a
    value JSON cannot carry fails the attempt as `result_not_json`, a message that would
    be bigger than `max_bytes` as `result_too_large` (neither is retried)."""
    try:
        result = TaskResult(
            status=outcome.status, result=outcome.value, error=outcome.error, **fields
        )
        body = result.model_dump_json().encode()
    except (ValidationError, PydanticSerializationError) as exc:
        why = "" if isinstance(exc, ValidationError) else f": {exc}"  # e.g. a lone surrogate
        message = f"handler returned {type(outcome.value).__name__}{why}"
        return _failed(fields, "result_not_json", message)
    if len(body) > max_bytes:
        message = (
            f"the result message would be {len(body)} bytes, over the limit of {max_bytes} "
            "bytes (LEVERET_MAX_RESULT_BYTES); it was not sent"
        )
        return _failed(fields, "result_too_large", message)
    return result, body


def _failed(fields: dict[str, Any], kind: str, message: str) -> tuple[TaskResult, bytes]:
    bad = failure(kind, message)
    result = TaskResult(status=bad.status, error=bad.error, **fields)
    return result, result.model_dump_json().encode()


def backoff_step_s(attempt: int) -> int:
    """The broker-held delay step after failed attempt `attempt` (1, 2, 4, … s, capped)."""
    return RETRY_STEPS_S[min(max(attempt, 1) - 1, len(RETRY_STEPS_S) - 1)]


def retry_delay_s(
    task: TaskMessage, handler: Handler | None, attempt: int, outcome: Outcome, rng: random.Random
) -> tuple[int, float] | None:
    """``(step, delay)`` if this failed attempt is retried, else None.

    The budget counts attempts that ended on this task's account: `attempt` less
    those a worker handed back on a graceful stop (`task.returned`), which spend no
    retry. Exponential backoff with jitter: the delay is drawn from [step/2, step];
    the message waits in that step's TTL queue (its per-message expiration is the
    delay, and the queue's TTL, the step, bounds it).
    """
    if outcome.status != TaskStatus.FAILED or outcome.error is None:
        return None
    if outcome.error.type in NOT_RETRIED:
        return None
    default = handler.max_retries if handler is not None else 0
    allowed = task.max_retries if task.max_retries is not None else default
    spent = attempt - task.returned
    if spent > allowed:
        return None
    step = backoff_step_s(spent)
    return step, round(step * rng.uniform(0.5, 1.0), 3)


class Executor:
    """Runs handlers of one registry with the worker's concurrency."""

    def __init__(self, registry: Registry, concurrency: int) -> None:
        self.registry = registry
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="handler")
        self._processes = ProcessPool(concurrency)
        self._sendable_kinds: dict[str, bool] = {}

    def close(self) -> None:
        """Stop the thread pool and kill idle child processes."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._processes.close()

    async def run(self, task: TaskMessage, ctx: TaskContext) -> Outcome:
        """Run one attempt; every failure becomes an outcome, only cancellation propagates."""
        handler = self.registry.get(task.kind)
        if handler is None:
            return failure("unknown_kind", f"no handler for kind {task.kind!r} on {ctx.worker_id}")
        timeout_s = ctx.timeout_s
        scope = asyncio.timeout(timeout_s)
        try:
            if handler.blocking and self._sendable(handler):
                # The pool times the call itself: starting a child is not the handler's time.
                value = await self._processes.call(handler.func, ctx, task.payload, timeout_s)
            else:
                async with scope:
                    value = await self._run_here(handler, ctx, task.payload)
        except TimeoutError as exc:
            if scope.expired():
                return failure("timeout", f"attempt exceeded timeout_s={timeout_s}")
            return failure(type(exc).__name__, str(exc) or "timed out")
        except CallTimedOut as exc:
            return failure("timeout", str(exc))
        except TaskFailed as exc:
            return failure(str(exc.type), describe(exc))
        except HandlerCrashed as exc:
            return failure("handler_crashed", str(exc))
        except Exception as exc:  # a handler's own bug: fail the task, keep the worker
            logger.opt(exception=exc).debug("handler raised")
            return failure(type(exc).__name__, describe(exc))
        return Outcome(TaskStatus.COMPLETED, value)

    def _sendable(self, handler: Handler) -> bool:
        """Whether a sync handler can run in a child process (else it runs in a thread)."""
        sendable = self._sendable_kinds.get(handler.kind)
        if sendable is None:
            sendable = self._sendable_kinds[handler.kind] = ProcessPool.picklable(handler.func)
            if not sendable:
                logger.warning("handler {} cannot run in a child process: threads", handler.kind)
        return sendable

    async def _run_here(self, handler: Handler, ctx: TaskContext, payload: Any) -> Any:
        """An async handler on the event loop, or a sync one that cannot be sent in a thread."""
        if handler.blocking:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._threads, functools.partial(handler.func, ctx, payload)
            )
        value = handler.func(ctx, payload)
        if inspect.isawaitable(value):
            value = await value
        return value
