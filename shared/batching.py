"""Coalescing work into batches: one helper for every consumer that writes in batches.

A batch is "whatever arrived while the previous flush was in flight": a consumer
flushes one batch at a time, so under load the next one fills by itself, and a lone
item is never held back by a timer (``wait_s=0``, the default everywhere). A wait
can still be asked for, to trade a lone item's latency for bigger batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Generic, TypeVar

from loguru import logger
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from leveret.db import map_db_errors
from leveret.errors import StoreUnavailable

T = TypeVar("T")
R = TypeVar("R")


async def fill_batch(
    queue: asyncio.Queue[T],
    first: T,
    *,
    limit: int,
    wait_s: float = 0.0,
    weight: Callable[[T], int] = lambda _: 1,
    stop: Callable[[T], bool] = lambda _: False,
) -> tuple[list[T], bool]:
    """`first` plus whatever `queue` yields until the batch weighs `limit`; an item for
    which `stop` holds ends the batch (it is not included). Returns the batch and
    whether a stop item was taken.

    With `wait_s` 0 nothing waits on a timer: the batch takes what is queued, lets the
    event loop run once (deliveries already read from a socket land then), and ends
    when that brought nothing new. With `wait_s` > 0 it waits up to that long after
    the call for more."""
    batch, size = [first], weight(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    yielded = False
    while size < limit:
        if queue.empty():
            remaining = deadline - loop.time()
            if remaining <= 0:
                if yielded:
                    break
                yielded = True
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(remaining):
                    item = await queue.get()
            except TimeoutError:
                break
        else:
            item = queue.get_nowait()
            yielded = False
        if stop(item):
            return batch, True
        batch.append(item)
        size += weight(item)
    return batch, False


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Batches(Generic[T]):
    """The inbox of a consumer that writes in batches: deliveries are put in as they
    arrive (the AMQP callback), taken out as batches by one loop (:meth:`next`), and
    the input can be ended (:meth:`end`): what was put in before is still taken.

    Both the tracker's consumer and the scheduler's outcomes consumer are built on it,
    so both batch the same way (see :func:`fill_batch`)."""

    def __init__(self, *, limit: int, wait_ms: float = 0.0) -> None:
        self.limit = limit
        self.wait_s = wait_ms / 1000
        #: True while the loop waits for a first item: everything put in was taken.
        self.waiting = False
        self._queue: asyncio.Queue[T | None] = asyncio.Queue()
        self._ended = False

    def put(self, item: T) -> None:
        """Hand over one item (never blocks)."""
        self._queue.put_nowait(item)

    def end(self) -> None:
        """No more input: :meth:`next` returns what is left, then an empty batch."""
        self._ended = True
        self._queue.put_nowait(None)

    @property
    def drained(self) -> bool:
        """Whether nothing is waiting to be taken."""
        return self._queue.empty()

    @property
    def finished(self) -> bool:
        """Whether the input was ended and everything was taken."""
        return self._ended and self._queue.empty()

    async def next(self) -> list[T]:
        """The next batch: the first item to arrive (waiting for it), then what arrived
        meanwhile, up to `limit`; empty once the input was ended and drained."""
        if self._queue.empty():
            if self._ended:
                return []
            self.waiting = True
            try:
                first = await self._queue.get()
            finally:
                self.waiting = False
        else:
            first = self._queue.get_nowait()
        if first is None:
            return []
        batch, _ = await fill_batch(
            self._queue, first, limit=self.limit, wait_s=self.wait_s, stop=lambda i: i is None
        )
        return [item for item in batch if item is not None]


async def until_stored(write: Callable[[], Awaitable[R]], what: str) -> R:
    """`write()`, again and again with jittered exponential backoff while the database
    is unavailable (:class:`~leveret.errors.StoreUnavailable`); any other error is
    raised at once. `what` names the write in the log."""
    async for attempt in AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
        retry=retry_if_exception_type(StoreUnavailable),
        before_sleep=lambda state: _log_retry(state, what),
        reraise=True,
    ):
        with attempt, map_db_errors():
            return await write()
    raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: RetryCallState, what: str) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.opt(exception=exc).error("{} failed; retrying in {:.2f}s", what, wait)
