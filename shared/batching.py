"""Coalescing work into batches: one helper for every consumer that writes in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def fill_batch(
    queue: asyncio.Queue[T],
    first: T,
    *,
    limit: int,
    wait_s: float,
    weight: Callable[[T], int] = lambda _: 1,
    stop: Callable[[T], bool] = lambda _: False,
) -> tuple[list[T], bool]:
    """`first` plus whatever `queue` yields until the batch weighs `limit` or `wait_s`
    has passed since the call; an item for which `stop` holds ends the batch (it is not
    included). Returns the batch and whether a stop item was taken."""
    batch, size = [first], weight(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while size < limit:
        if queue.empty():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    item = await queue.get()
            except TimeoutError:
                break
        else:
            item = queue.get_nowait()
        if stop(item):
            return batch, True
        batch.append(item)
        size += weight(item)
    return batch, False
