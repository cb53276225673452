"""Coalescing work into batches: one helper for every consumer that writes in batches.

A batch is "whatever arrived while the previous flush was in flight": a consumer
flushes one batch at a time, so under load the next one fills by itself, and a lone
item is never held back by a timer (``wait_s=0``, the default everywhere). A wait
can still be asked for, to trade a lone item's latency for bigger batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

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
