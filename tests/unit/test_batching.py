"""fill_batch: size limit, weights, stop items, and the wait deadline."""

from __future__ import annotations

import asyncio

from leveret.batching import fill_batch


async def test_fills_up_to_the_limit_by_weight() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in (2, 3, 4, 5):
        queue.put_nowait(n)
    batch, stopped = await fill_batch(queue, 1, limit=6, wait_s=1.0, weight=lambda n: n)
    assert (batch, stopped) == ([1, 2, 3], False)
    assert queue.qsize() == 2


async def test_stop_item_ends_the_batch_and_is_left_out() -> None:
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    for item in (2, None, 3):
        queue.put_nowait(item)
    batch, stopped = await fill_batch(
        queue, 1, limit=10, wait_s=1.0, stop=lambda item: item is None
    )
    assert (batch, stopped) == ([1, 2], True)


async def test_returns_at_the_deadline_when_nothing_more_comes() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    batch, stopped = await fill_batch(queue, 7, limit=10, wait_s=0.01)
    assert (batch, stopped) == ([7], False)
