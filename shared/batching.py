"""Coalescing work into batches: one helper for every consumer that writes in batches.

A batch is "whatever arrived while the previous flush was in flight": a consumer
flushes one batch at a time, so under load the next one fills by itself, and a lone
item is never held back by a timer (``wait_s=0``, the default everywhere). A wait
can still be asked for, to trade a lone item's latency for bigger batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


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
