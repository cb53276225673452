"""The worker: consume one pool's work queues with prefetch = concurrency, run each
task's handler, publish its outcome, and only then ack.

The worker is three parts: :class:`Worker` here (its identity and the life cycle of
sessions), :class:`~leveret.worker.session.Session` (one connection: consumers,
heartbeats, announcements, cancellation and requirement listeners, drain), and
:class:`~leveret.worker.delivery.Deliveries` (one delivery: receipt, run, settle),
with one registry of what is in flight (:mod:`leveret.worker.inflight`).

Ack timing: a delivery is acked only after its result (or, for a failure with
retries left, the retry message and its `task.retrying` event) is confirmed by
the broker. If the worker dies first, the broker requeues the delivery and
another worker runs it again (at-least-once); the tracker records one result.
Once the outcome is being published, the ack is sent even if the delivery is
cancelled meanwhile (a drain, a lost session), so a confirmed result never runs twice
for want of its ack.

Sessions: the worker works in *sessions*, one AMQP connection each, named after
its registration id. When a session's connection is lost its deliveries are
void (the broker requeued them), so in-flight attempts are cancelled and a new
session starts, under a new registration id ``<id>~<n>``: the tracker may have
fenced the old one (closed its connection because it stopped heartbeating, and
written its attempts off) even when the close frame saying so never arrived (a
partition, or a connection reset that discards it). Only a loss the worker can
prove was not a fence keeps the id: a close frame from the broker
(``CONNECTION_FORCED``, e.g. a broker restart) without the ``leveret-fenced`` marker.

Graceful hand-back: on a graceful stop, a delivery that waits for a slot, or whose
attempt outlives the grace period, is given back by publishing a copy (confirmed)
straight to the queue it came from and acking the original, not by a requeue: a
quorum queue counts a requeue as a delivery, so four rolling restarts during one
long task would otherwise dead-letter it as poison. A returned attempt is
announced as ``task.returned`` and spends no retry (``TaskMessage.returned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from loguru import logger

from leveret import __version__
from leveret.amqp import BROKER_EXCEPTIONS, connect, map_broker_errors
from leveret.contracts import MAX_EVENT_BYTES, WorkerInfo, WorkerStarted
from leveret.errors import ConfigError, UnavailableError
from leveret.handlers import Registry
from leveret.roles import RefusedSenders
from leveret.settings import WorkerSettings
from leveret.worker.delivery import Deliveries
from leveret.worker.limits import StartPacer, kind_limits
from leveret.worker.reports import Reports
from leveret.worker.session import Session, SessionEnd, first


class Worker:
    """One worker process: its identity, its sessions, and its deliveries."""

    def __init__(self, settings: WorkerSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.base_id = settings.worker_id
        self.generation = 1
        self.info = WorkerInfo(
            id=self.base_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            pool=settings.pool,
            concurrency=settings.concurrency,
            kinds=registry.kinds(),
            capabilities=settings.capabilities,
            limits=kind_limits(registry, settings),
            version=__version__,
        )
        _check_announcement(self.info)
        self._reports = Reports(settings.topology, settings.started_flush_ms / 1000)
        self.deliveries = Deliveries(settings, registry, self._reports, lambda: self.id)
        self._pacers = {
            kind: StartPacer(limit.max_starts_per_s)
            for kind, limit in self.info.limits.items()
            if limit.max_starts_per_s
        }
        self._forged = RefusedSenders()  # cancels from users not in the scheduler role

    @property
    def id(self) -> str:
        """The current registration id (also the AMQP connection name)."""
        return self.info.id

    @property
    def completed(self) -> int:
        """Attempts that completed."""
        return self.deliveries.completed

    @property
    def failed(self) -> int:
        """Attempts that failed for good (or were cancelled)."""
        return self.deliveries.failed

    @property
    def retried(self) -> int:
        """Failed attempts that were retried."""
        return self.deliveries.retried

    def attempt_of(self, job: asyncio.Task[Any] | None) -> str | None:
        """The id of the task whose attempt `job` (an asyncio task) runs now, else None."""
        return self.deliveries.in_flight.attempt_of(job)

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        """Work in sessions until `stop` is set."""
        try:
            failures = 0
            while not stop.is_set():
                try:
                    with map_broker_errors():
                        end = await self._session(stop, ready)
                except UnavailableError as exc:
                    # The session could not start or went wrong on the broker's side (e.g.
                    # a restarted broker whose queues are not all back yet): back off.
                    failures += 1
                    backoff = min(0.2 * 2**failures, 5.0)
                    logger.warning(
                        "worker {} session failed ({}); retrying in {:.1f} s", self.id, exc, backoff
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    continue
                failures = 0
                if end is SessionEnd.STOPPED:
                    break
                if end is SessionEnd.FENCED:
                    self.generation += 1
                    new_id = f"{self.base_id}~{self.generation}"
                    logger.warning(
                        "worker {} may have been declared dead by the tracker; "
                        "re-registering as {}",
                        self.id,
                        new_id,
                    )
                    self.info = self.info.model_copy(update={"id": new_id})
        finally:
            self.deliveries.close()
        logger.info(
            "worker {} stopped: {} completed, {} failed, {} retried",
            self.id,
            self.completed,
            self.failed,
            self.retried,
        )

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> SessionEnd:
        """Connect (until the broker answers or `stop` is set) and run one session."""
        s = self.settings
        connecting = asyncio.ensure_future(
            connect(s.amqp_url, self.id, robust=False, connect_timeout_s=3600, tls=s.amqp_tls)
        )
        await first(connecting, stop.wait())
        if not connecting.done() or connecting.cancelled():
            return SessionEnd.STOPPED  # asked to stop while the broker was unreachable
        connection = connecting.result()
        lost = asyncio.Event()
        reasons: list[str] = []

        def on_close(_sender: object, exc: BaseException | None) -> None:
            reasons.append(str(exc))
            lost.set()

        connection.close_callbacks.add(on_close)
        session = Session(s, self.info, self.deliveries, self._reports, self._pacers, self._forged)
        try:
            return await session.run(connection, stop.wait, lost, reasons, ready)
        finally:
            connection.close_callbacks.discard(on_close)
            with contextlib.suppress(*BROKER_EXCEPTIONS):
                await connection.close()


def _check_announcement(info: WorkerInfo) -> None:
    """Refuse to start a worker whose announcement (kinds, capabilities, limits) would
    leave a heartbeat too little room under MAX_EVENT_BYTES."""
    size = len(WorkerStarted(worker=info).model_dump_json())
    if size > MAX_EVENT_BYTES // 2:
        raise ConfigError(
            f"this worker's announcement would be {size} bytes (its kinds, capabilities "
            f"and limits); it must stay under {MAX_EVENT_BYTES // 2}"
        )
