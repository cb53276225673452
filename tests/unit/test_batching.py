"""fill_batch: size limit, weights, stop items, the wait deadline and no timer by
default; Batches (a batch consumer's inbox); until_stored (leveret.db)."""

from __future__ import annotations

import asyncio

import pytest

from leveret.batching import Batches, fill_batch
from leveret.db import until_stored
from leveret.errors import StoreError, StoreUnavailable


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


async def test_a_lone_item_is_not_held_back_by_a_timer() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    began = loop.time()
    batch, _ = await fill_batch(queue, 1, limit=10)
    assert batch == [1]
    assert loop.time() - began < 0.5  # no wait: one turn of the loop, not a window


async def test_what_arrived_while_the_loop_turned_joins_the_batch() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    asyncio.get_running_loop().call_soon(queue.put_nowait, 2)  # lands on the next turn
    batch, _ = await fill_batch(queue, 1, limit=10)
    assert batch == [1, 2]


async def test_batches_keep_order_and_end_after_what_was_put_in() -> None:
    inbox: Batches[int] = Batches(limit=2)
    for n in (1, 2, 3):
        inbox.put(n)
    inbox.end()
    assert await inbox.next() == [1, 2]
    assert not inbox.finished
    assert await inbox.next() == [3]
    assert await inbox.next() == []
    assert inbox.finished and inbox.drained


async def test_until_stored_waits_out_an_unavailable_database_only() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise StoreUnavailable("database is locked")
        return "written"

    assert await until_stored(flaky, "a test write") == "written"
    assert calls == 3

    async def broken() -> str:
        raise StoreError("constraint failed")

    with pytest.raises(StoreError):
        await until_stored(broken, "a test write")
