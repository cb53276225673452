"""The worker's slots, shared by its three priority bands.

Each band's queue is consumed with its own prefetch, so a delivery of any band
can arrive while every slot is busy; it then waits here, in memory but still
unacked (the broker gets it back if the worker dies). When a slot frees, the
next band is chosen by *smooth weighted round robin* over the bands that have
someone waiting: with weights 6/3/1 a high task waits for at most one other
task, and a low task still gets one slot in ten however much high work arrives.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping

from leveret.topology import BAND_WEIGHTS, Band


def pick(current: dict[Band, int], weights: Mapping[Band, int], ready: list[Band]) -> Band:
    """Smooth weighted round robin: one step over the bands in `ready` (mutates `current`)."""
    total = 0
    for band in ready:
        current[band] += weights[band]
        total += weights[band]
    chosen = max(ready, key=lambda b: (current[b], weights[b]))
    current[chosen] -= total
    return chosen


class BandGate:
    """At most `slots` tasks run at once; waiting tasks are admitted by band weight."""

    def __init__(self, slots: int, weights: Mapping[Band, int] = BAND_WEIGHTS) -> None:
        self.free = slots
        self.weights = dict(weights)
        self._current = dict.fromkeys(Band, 0)
        self._waiting: dict[Band, deque[asyncio.Future[None]]] = {b: deque() for b in Band}

    def waiting(self) -> int:
        """How many deliveries wait for a slot."""
        return sum(len(q) for q in self._waiting.values())

    async def enter(self, band: Band) -> None:
        """Wait for a slot for a task of `band`."""
        if self.free > 0 and not self.waiting():
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[band].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave()  # the slot was handed over just as we were cancelled
            elif future in self._waiting[band]:
                # Not there when leave() ran between the cancel and now: it pops a
                # cancelled waiter and skips it, so there is nothing left to remove.
                self._waiting[band].remove(future)
            raise

    def leave(self) -> None:
        """Give a slot back: to the next waiting task by band weight, or to the pool."""
        while True:
            ready = [b for b in Band if self._waiting[b]]
            if not ready:
                self.free += 1
                return
            band = pick(self._current, self.weights, ready)
            future = self._waiting[band].popleft()
            if not future.done():
                future.set_result(None)
                return
