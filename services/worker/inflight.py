"""The one record of what a worker holds: every delivery from receipt to settlement.

A delivery is *held* from the moment it is decoded until it is settled (acked, handed
back or returned). While held it is first *waiting* (for a slot of its band, or for
its kind's start rate), then *running* its attempt, then *settling* (its outcome being
published and acked). Everything that asks what the worker is doing reads this
registry: the heartbeat (the ids of running attempts), progress reports (is this
attempt still running), a drain (what waits, what runs), a lost session (what to
stop), a `task.cancel` (which attempt to stop), and the loop monitor (which attempt
does the loop's current asyncio task run), which reads it from its own thread
through one dict lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from enum import Enum
from typing import Any


class Phase(Enum):
    """Where a held delivery is."""

    WAITING = "waiting"  # for a slot, or for its kind's start rate
    RUNNING = "running"  # its attempt runs
    SETTLING = "settling"  # its outcome is being published and acked


class Held:
    """One held delivery: its asyncio task (`job`), its task id, and its phase."""

    __slots__ = ("cancel_reason", "job", "phase", "task_id")

    def __init__(self, job: asyncio.Task[Any], task_id: str) -> None:
        self.job = job
        self.task_id = task_id
        self.phase = Phase.WAITING
        self.cancel_reason: str | None = None  # set when a `task.cancel` stopped the attempt


class InFlight:
    """Every delivery the worker holds, keyed by the asyncio task that handles it."""

    def __init__(self) -> None:
        self._held: dict[asyncio.Task[Any], Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._held.values()))

    def hold(self, job: asyncio.Task[Any], task_id: str) -> Held:
        """Record a delivery that `job` handles from now on."""
        held = self._held[job] = Held(job, task_id)
        return held

    def release(self, held: Held) -> None:
        """The delivery is settled: forget it."""
        self._held.pop(held.job, None)

    def running_ids(self) -> list[str]:
        """The task ids of the attempts that run now (for the heartbeat)."""
        return [h.task_id for h in self._held.values() if h.phase is Phase.RUNNING]

    def attempt_of(self, job: asyncio.Task[Any] | None) -> str | None:
        """The id of the task whose attempt `job` runs now, else None. Called by the loop
        monitor from its own thread: one dict lookup, never an iteration."""
        held = self._held.get(job) if job is not None else None
        if held is None or held.phase is not Phase.RUNNING:
            return None
        return held.task_id

    def cancel_attempt(self, task_id: str, reason: str) -> None:
        """Stop the running attempts of `task_id` (a `task.cancel`): their deliveries are
        then settled as cancelled, not returned. A delivery that waits finds the cancel
        when its attempt would begin; one that settles already keeps its outcome."""
        for held in self:
            if held.task_id == task_id and held.phase is Phase.RUNNING:
                held.cancel_reason = reason
                held.job.cancel()

    def waiting(self) -> list[asyncio.Task[Any]]:
        """The jobs of deliveries that wait for a slot or a start."""
        return [h.job for h in self._held.values() if h.phase is Phase.WAITING]

    def jobs(self) -> list[asyncio.Task[Any]]:
        """The jobs of every held delivery."""
        return list(self._held)

    def cancel_all(self) -> None:
        """Stop every held delivery (its session is gone)."""
        for job in self.jobs():
            job.cancel()
