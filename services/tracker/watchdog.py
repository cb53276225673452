"""The watchdog: declares silent workers dead and makes the broker release their tasks.

Every ``heartbeat_timeout_s / 4`` it looks for workers that are neither stopped nor
already written off and whose last heartbeat was heard (by the tracker's clock; a
worker's own clock never counts) longer than ``heartbeat_timeout_s`` ago
(counted from the tracker's start at the earliest, so a restarted tracker gives
every worker one timeout to be heard again; the same after the tracker's consumer
reconnected to the broker). Silence is judged up to the moment the tracker's
consumer had caught up with its queue while connected: a heartbeat still waiting
in the tracker's own backlog is not silence.

For each such worker it closes the worker's AMQP connections (``connection_name``
= worker id, in the tracker's vhost, and owned by the verified user its news came
from: see :meth:`leveret.roles.RoleUsers.fence_users`) through the management API, with a reason
containing ``leveret-fenced`` so that the worker, if it ever wakes up, knows to
re-register under a new id. The broker requeues the worker's unacked deliveries
at once. Then, in one transaction, the worker becomes `dead` and its open
attempts `fenced`, and their tasks `pending` again (see
:meth:`leveret.tracker.store.TrackerStore.declare_dead`).

A fenced worker is left alone only while it stays silent: if it is heard from
again under its fenced id (its close reason was lost in a connection reset, so it
did not know to re-register), a heartbeat sent after the fence revives the
registration and this watchdog watches it, and fences it, again (see
:mod:`leveret.tracker.workers`).

A connection that is not listed at all counts as gone (a crashed worker's
connection is closed already, so the broker requeued its deliveries; its open
attempts become `lost`), but only
after it stayed unlisted for :data:`GONE_CONFIRM_S`: the management API lists a
new connection only after its next statistics round (5 s by default).

Without a working management API the worker is marked dead for display only,
its attempts stay open (it still holds their deliveries and its late result must
still count) and a loud warning says what that costs; the watchdog keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from loguru import logger

from leveret.contracts import FENCED_MARKER, utcnow
from leveret.errors import BrokerError
from leveret.tracker.store import TrackerStore
from leveret.tracker.workers import Death, Overdue, overdue

#: How long a worker's connection must stay unlisted before it counts as gone.
GONE_CONFIRM_S = 6.0
#: Longest pause between two tries at fencing a worker whose connection could not be closed.
RETRY_MAX_S = 30.0
#: The substring a worker looks for in the close reason.
CONSEQUENCE = (
    "hung workers will keep their tasks until RabbitMQ's consumer_timeout (30 min by "
    "default); enable rabbitmq_management and set LEVERET_MANAGEMENT_URL"
)


class ConnectionCloser(Protocol):
    """What the watchdog needs of :class:`leveret.management.ManagementApi`."""

    async def available(self) -> bool: ...

    async def sees_all_connections(self) -> bool: ...

    async def closes_all_connections(self) -> bool: ...

    async def close_connections(
        self,
        connection_name: str,
        vhost: str | None,
        reason: str,
        users: frozenset[str] | None = None,
    ) -> int: ...


class Watchdog:
    """Fences workers that stopped heartbeating (see the module docstring)."""

    def __init__(
        self,
        store: TrackerStore,
        api: ConnectionCloser,
        *,
        timeout_s: float,
        vhost: str | None,
        clock: Callable[[], datetime] = utcnow,
        caught_up: Callable[[], datetime] | None = None,
        listening_since: Callable[[], datetime] | None = None,
        started_at: datetime | None = None,
        gone_confirm_s: float = GONE_CONFIRM_S,
        fence_users: Callable[[str], frozenset[str]] | None = None,
    ) -> None:
        """`caught_up` and `listening_since` come from the consumer (see the module
        docstring); `started_at` is the tracker's start (default: now); `fence_users`
        names the users whose connections a worker's fence may close (None: any)."""
        self.fence_users = fence_users
        self.store = store
        self.api = api
        self.timeout_s = timeout_s
        self.vhost = vhost
        self.clock = clock
        self.caught_up = caught_up or clock
        self.started_at = started_at or clock()
        self.listening_since = listening_since or (lambda: self.started_at)
        self.gone_confirm_s = gone_confirm_s
        self.declared = 0
        self._sees_all: bool | None = None
        self._absent_since: dict[str, datetime] = {}
        self._retry: dict[str, tuple[datetime, float]] = {}
        self._warned: set[str] = set()

    @property
    def interval_s(self) -> float:
        """Time between two checks."""
        return self.timeout_s / 4

    async def check_api(self) -> bool:
        """Warn loudly (once, at start) when fencing cannot work; True when it can."""
        if not await self.api.available():
            logger.warning("RabbitMQ management API unavailable: {}", CONSEQUENCE)
            return False
        try:
            sees_all = await self._visibility()
        except BrokerError as exc:
            logger.warning("asking the management API who it is failed: {}; {}", exc, CONSEQUENCE)
            return False
        if not sees_all:
            logger.warning(
                "the management API user cannot see other users' connections (needs the "
                "administrator tag): workers connecting as another user cannot be fenced, and {}",
                CONSEQUENCE,
            )
            return False
        try:
            closes_all = await self.api.closes_all_connections()
        except BrokerError as exc:
            logger.warning("asking the management API who it is failed: {}; {}", exc, CONSEQUENCE)
            return False
        if not closes_all:
            logger.warning(
                "the management API user sees every connection but may close only its own "
                "(needs the administrator tag): workers connecting as another user cannot be "
                "fenced, and {}",
                CONSEQUENCE,
            )
            return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Check every :attr:`interval_s` until `stop` is set."""
        try:
            await self.check_api()
        except Exception:  # loop boundary: a failed check must not stop the tracker
            logger.exception("checking the management API failed")
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # loop boundary: try again next time
                logger.exception("watchdog check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def tick(self) -> None:
        """One check: act on every worker that is overdue now."""
        now = self.clock()
        judged_at = min(now, self.caught_up())
        cutoff = judged_at - timedelta(seconds=self.timeout_s)
        silent = await self.store.silent_workers(cutoff)
        since = max(self.started_at, self.listening_since())
        due = overdue(silent, judged_at, since, self.timeout_s)
        for item in due:
            retry = self._retry.get(item.worker.id)
            if retry is None or retry[0] <= now:
                await self._act(item, now)
        ids = {item.worker.id for item in due}
        for memo in (self._absent_since, self._retry):
            for worker_id in [w for w in memo if w not in ids]:
                del memo[worker_id]
        self._warned &= ids

    async def _act(self, item: Overdue, now: datetime) -> None:
        worker = item.worker
        reason = f"{FENCED_MARKER}: no heartbeat for {item.silent_s:.0f} s"
        try:
            users = self.fence_users(worker.id) if self.fence_users is not None else None
            closed = await self.api.close_connections(worker.id, self.vhost, reason, users)
            sees_all = closed > 0 or await self._visibility()
        except BrokerError as exc:
            await self._unfenced(item, now, str(exc))
            return
        if closed > 0:
            death = Death.FENCED
        elif not sees_all:
            await self._unfenced(item, now, "its connection is not visible to the API user")
            return
        else:
            first = self._absent_since.setdefault(worker.id, now)
            if (now - first).total_seconds() < self.gone_confirm_s:
                return  # maybe not listed yet; look again next time
            death = Death.GONE
        released = await self.store.declare_dead(worker.id, now, death)
        self.declared += 1
        self._absent_since.pop(worker.id, None)
        self._retry.pop(worker.id, None)
        logger.bind(worker=worker.id).info(
            "worker {} declared dead after {:.1f} s without heartbeat; "
            "closed {} connections; released {} tasks",
            worker.id,
            item.silent_s,
            closed,
            released,
        )

    async def _unfenced(self, item: Overdue, now: datetime, why: str) -> None:
        """The connection could not be closed: dead for display; its attempts stay open."""
        worker = item.worker
        if worker.death is None:
            await self.store.declare_dead(worker.id, now, Death.UNFENCED)
        if worker.id not in self._warned:
            self._warned.add(worker.id)
            logger.bind(worker=worker.id).warning(
                "worker {} silent for {:.1f} s but its connection could not be closed ({}); "
                "it keeps its tasks: {}",
                worker.id,
                item.silent_s,
                why,
                CONSEQUENCE,
            )
        _, pause = self._retry.get(worker.id, (now, self.interval_s / 2))
        pause = min(pause * 2, RETRY_MAX_S)
        self._retry[worker.id] = (now + timedelta(seconds=pause), pause)

    async def _visibility(self) -> bool:
        """Whether the API user sees every connection (asked once, then remembered)."""
        if self._sees_all is None:
            self._sees_all = await self.api.sees_all_connections()
        return self._sees_all
