"""Priority bands: weighted slot hand-out (pure asyncio, no broker)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from leveret.topology import BAND_WEIGHTS, Band, band_of, work_key
from leveret.worker.gate import BandGate, pick


def test_bands_of_priorities() -> None:
    assert [band_of(p) for p in range(10)] == [Band.LOW] * 3 + [Band.NORMAL] * 4 + [Band.HIGH] * 3
    assert work_key("gpu", Band.NORMAL) == "gpu"
    assert work_key("gpu", Band.HIGH) == "gpu.high"


def test_weighted_round_robin_shares_and_spreads() -> None:
    current = dict.fromkeys(Band, 0)
    order = [pick(current, BAND_WEIGHTS, list(Band)) for _ in range(20)]
    assert Counter(order) == {Band.HIGH: 12, Band.NORMAL: 6, Band.LOW: 2}
    # high never waits behind more than one other pick
    gaps = [i for i, b in enumerate(order) if b is Band.HIGH]
    assert max(b - a for a, b in itertools.pairwise(gaps)) <= 2
    # only the bands that have work are considered
    assert {pick(current, BAND_WEIGHTS, [Band.LOW]) for _ in range(5)} == {Band.LOW}


async def test_gate_admits_waiting_work_by_band() -> None:
    gate = BandGate(1)
    started: list[str] = []

    async def run(name: str, band: Band) -> None:
        await gate.enter(band)
        started.append(name)
        await asyncio.sleep(0)
        gate.leave()

    await gate.enter(Band.LOW)  # the one slot is busy
    tasks = [asyncio.create_task(run(f"low{i}", Band.LOW)) for i in range(5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(run("high", Band.HIGH)))
    await asyncio.sleep(0)
    gate.leave()
    await asyncio.gather(*tasks)
    assert started.index("high") <= 1
    assert gate.free == 1


async def test_cancelled_waiter_gives_nothing_away() -> None:
    gate = BandGate(1)
    await gate.enter(Band.NORMAL)
    waiter = asyncio.create_task(gate.enter(Band.LOW))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.waiting() == 0
    gate.leave()
    assert gate.free == 1


async def test_waiter_cancelled_after_leave_skipped_it() -> None:
    """A waiter cancelled, then skipped by leave() before it ran again, still ends with
    CancelledError (not ValueError from removing it twice), so its delivery goes back."""
    gate = BandGate(1)
    await gate.enter(Band.NORMAL)
    waiter = asyncio.create_task(gate.enter(Band.LOW))
    await asyncio.sleep(0)  # the waiter now waits for a slot
    waiter.cancel()  # cancels its future at once; the waiter itself runs later
    gate.leave()  # pops the cancelled future, skips it, and frees the slot
    [outcome] = await asyncio.gather(waiter, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)
    assert gate.waiting() == 0
    assert gate.free == 1
