"""The dependency resolver: releases or ends blocked tasks as their parents end.

A blocked task waits in the scheduler's store (state `blocked`, one `edges` row
per parent). The scheduler learns how tasks end from its own queue on the results
exchange (:mod:`leveret.scheduler.outcomes`), records each outcome, and hands the
blocked tasks waiting for those parents to :meth:`Resolver.resolve`:

- every parent completed → the task is released: dispatched like any admitted
  task (or delayed, if it also has a due time still in the future);
- a parent failed, was cancelled or was rejected → the task ends without running,
  ``failed``/``dependency_failed`` or ``cancelled``/``dependency_cancelled``, and
  so, in turn, do the tasks waiting for it (transitively);
- otherwise it keeps waiting.

Every move is a guarded UPDATE from `blocked`, so concurrent resolutions (the
outcome consumer, admission's re-check of new blocked tasks, another replica)
never release or end a task twice. At start-up :meth:`Resolver.recover` re-publishes
endings a crash interrupted and re-checks every blocked task whose parents ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from loguru import logger

from leveret.contracts import utcnow
from leveret.scheduler.dispatch import Dispatcher
from leveret.scheduler.holds import End, Release, decide
from leveret.scheduler.store import BLOCKED, ENDED, Ending, Submission, SubmissionStore

#: How long the background loop waits after a failed resolution before trying again.
BACKOFF_S = 1.0


class Resolver:
    """Releases or ends blocked tasks whose parents ended."""

    def __init__(
        self,
        store: SubmissionStore,
        dispatcher: Dispatcher,
        *,
        on_delayed: Callable[[datetime], None] = lambda _: None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.on_delayed = on_delayed
        self.released = 0
        self.ended = 0
        self._todo: set[str] = set()
        self._kick = asyncio.Event()

    def kick(self, ids: Iterable[str]) -> None:
        """Check these blocked tasks soon, in the background (see :meth:`run`)."""
        self._todo.update(ids)
        self._kick.set()

    async def run(self) -> None:
        """Check what :meth:`kick` asked for, forever (cancel to stop); retry on trouble."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            todo, self._todo = sorted(self._todo), set()
            try:
                await self.resolve(todo)
            except Exception:  # loop boundary: keep the ids and try again later
                logger.exception("resolving {} blocked task(s) failed", len(todo))
                self._todo.update(todo)
                await asyncio.sleep(BACKOFF_S)
                self._kick.set()

    async def recover(self) -> None:
        """Finish what a crash interrupted: publish decided endings again, then re-check
        every blocked task one of whose parents has ended."""
        failing = await self.store.failing()
        if failing:
            await self.dispatcher.end([(s, e) for s, e in failing])
            await self.store.mark((s.id for s, _ in failing), ENDED)
            logger.warning("re-published {} dependency failures after a crash", len(failing))
            await self.resolve(await self.store.waiting_children([s.id for s, _ in failing]))
        stale = await self.store.resolvable()
        if stale:
            logger.info("re-checking {} blocked task(s) whose parents ended", len(stale))
            await self.resolve(stale)

    async def resolve(self, ids: Sequence[str]) -> None:
        """Release or end these tasks if they are blocked and their parents decide it;
        endings propagate to their own dependants until nothing more changes."""
        while ids:
            releases: list[str] = []
            endings: list[Ending] = []
            for blocked in await self.store.blocked(ids):
                decision = decide(blocked.parents)
                if isinstance(decision, Release):
                    releases.append(blocked.submission.id)
                elif isinstance(decision, End):
                    endings.append(
                        Ending(
                            blocked.submission.id,
                            decision.status,
                            decision.error_type,
                            decision.message,
                        )
                    )
            await self._release(releases)
            ended = await self._end(endings)
            ids = await self.store.waiting_children(ended) if ended else []

    async def _release(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        now, later = await self.store.release(ids, utcnow())
        try:
            await self.dispatcher.send(now, [(s, "delayed") for s in later])
        except BaseException:
            await self.store.mark((s.id for s in now), BLOCKED)  # re-decided on the retry
            raise
        await self.store.mark_dispatched(s.id for s in now)
        for s in now:
            logger.bind(task_id=s.id).info("task {} released: its parents completed", s.id)
        if later:
            self.on_delayed(min(s.run_at for s in later if s.run_at is not None))
        self.released += len(now) + len(later)

    async def _end(self, endings: Sequence[Ending]) -> list[str]:
        """End these blocked tasks (publish their results, then mark them); return their ids."""
        if not endings:
            return []
        by_id = {e.id: e for e in endings}
        moved: list[Submission] = await self.store.end(endings)
        try:
            await self.dispatcher.end([(s, by_id[s.id]) for s in moved])
        except BaseException:
            await self.store.mark((s.id for s in moved), BLOCKED)  # re-decided on the retry
            raise
        await self.store.mark((s.id for s in moved), ENDED)
        self.ended += len(moved)
        return [s.id for s in moved]
