"""Workers as the tracker sees them: pure functions over heartbeats, goodbyes and the
watchdog's verdicts. No I/O here. The `at` of worker news is the tracker's receipt
time (the consumer stamps it), never the sender's clock: see
:meth:`leveret.tracker.consumer.Consumer._as_received`. Only whether news was sent
after a fence is judged by its `sent_at` (the sender's time, at most its receipt):
a heartbeat queued before the fence must not revive the fenced registration.

A worker the watchdog declares dead carries *how* it died, because that decides
what may bring it back:

- ``fenced``: the tracker closed its AMQP connection. The worker notices (the close
  reason says ``leveret-fenced``) and re-registers under a new id. But the reason
  can be lost (a connection reset after a partition swallows the close frame), and
  a worker that comes back under its fenced id must not hold a connection nobody
  watches: a heartbeat or announcement from that id heard *after* the fence
  (`at` later than `dead_at`) revives the registration, so the watchdog watches it
  (and fences it) again. Its fenced attempts stay written off either way.
- ``gone``: its connection had already vanished (crash, lost host); the broker
  requeued its deliveries. If it was only cut off, it comes back under the same
  id on a new connection, and its next heartbeat revives it.
- ``unfenced``: the connection could not be closed (management API unavailable);
  the worker may still hold its deliveries. It is dead for display only; a
  heartbeat revives it and the watchdog keeps trying to fence it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from leveret.contracts import WorkerHeartbeat, WorkerInfo, WorkerStarted, WorkerStopped
from leveret.tracker.state import WorkerCounters


class WorkerState(StrEnum):
    """How a worker looks from its heartbeats and the watchdog's verdict, at read time."""

    ALIVE = "alive"  # heard from within heartbeat_timeout_s
    SUSPECT = "suspect"  # silent for one to two timeouts, not (yet) declared dead
    DEAD = "dead"  # declared dead by the watchdog, or silent for longer than two timeouts
    STOPPED = "stopped"  # said goodbye on a graceful stop
    UNKNOWN = "unknown"  # results name it, but it never announced itself


class Death(StrEnum):
    """How the watchdog declared a worker dead (see the module docstring)."""

    FENCED = "fenced"  # its connection was closed by the tracker; revived only by news after it
    GONE = "gone"  # its connection was already gone; its attempts are lost
    UNFENCED = "unfenced"  # its connection could not be closed; it may hold its tasks

    @property
    def releases(self) -> bool:
        """True when the broker has requeued the worker's deliveries (attempts are lost)."""
        return self is not Death.UNFENCED


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A worker as registered from its announcements and heartbeats."""

    id: str
    host: str
    pid: int
    pool: str
    concurrency: int
    kinds: tuple[str, ...]
    capabilities: tuple[str, ...]
    version: str
    started_at: datetime
    last_seen: datetime
    in_flight: tuple[str, ...] = ()
    stopped_at: datetime | None = None
    dead_at: datetime | None = None
    death: Death | None = None

    @property
    def stopped(self) -> bool:
        """True when its goodbye is newer than its last heartbeat."""
        return self.stopped_at is not None and self.stopped_at >= self.last_seen


@dataclass(frozen=True)
class WorkerView:
    """A worker with its state at read time and its recorded results."""

    record: WorkerRecord | None
    id: str
    state: WorkerState
    counters: WorkerCounters


def _from_info(info: WorkerInfo, at: datetime) -> WorkerRecord:
    return WorkerRecord(
        id=info.id,
        host=info.host,
        pid=info.pid,
        pool=info.pool,
        concurrency=info.concurrency,
        kinds=tuple(info.kinds),
        capabilities=tuple(info.capabilities),
        version=info.version,
        started_at=at,
        last_seen=at,
    )


def _with_info(record: WorkerRecord, info: WorkerInfo) -> WorkerRecord:
    return replace(
        record,
        host=info.host,
        pid=info.pid,
        pool=info.pool,
        concurrency=info.concurrency,
        kinds=tuple(info.kinds),
        capabilities=tuple(info.capabilities),
        version=info.version,
    )


def _keep(old: WorkerRecord, new: WorkerRecord) -> WorkerRecord:
    return old if new == old else new


def heard_after_fence(record: WorkerRecord | None, at: datetime) -> bool:
    """True when a message sent at `at` comes from a fenced registration after its fence:
    the worker is back under its old id (see the module docstring)."""
    return (
        record is not None
        and record.death is Death.FENCED
        and record.dead_at is not None
        and at > record.dead_at
    )


def _fenced_and_not_since(record: WorkerRecord, at: datetime) -> bool:
    return record.death is Death.FENCED and not heard_after_fence(record, at)


def apply_worker_started(record: WorkerRecord | None, event: WorkerStarted) -> WorkerRecord:
    """A worker announced itself (at start, on a new session, and when a scheduler starts).
    A newer announcement revives a dead worker; a fenced one only if sent after the fence."""
    if record is None:
        return _from_info(event.worker, event.at)
    if _fenced_and_not_since(record, event.sent_at):
        return record
    new = _with_info(record, event.worker)
    if event.at > record.last_seen:
        new = replace(new, last_seen=event.at, dead_at=None, death=None)
    return _keep(record, replace(new, started_at=min(record.started_at, event.at)))


def apply_heartbeat(record: WorkerRecord | None, event: WorkerHeartbeat) -> WorkerRecord:
    """A heartbeat: registers an unknown worker; a newer one refreshes `last_seen` and
    `in_flight` and revives a dead worker (one older than the last heartbeat or the
    goodbye, redelivered, does not). A fenced id is revived only by a heartbeat sent
    after the fence."""
    if record is not None and _fenced_and_not_since(record, event.sent_at):
        return record
    base = record if record is not None else _from_info(event.worker, event.at)
    new = _with_info(base, event.worker)
    fresh = record is None or (
        event.at >= record.last_seen and (record.stopped_at is None or event.at > record.stopped_at)
    )
    if fresh:
        new = replace(new, last_seen=event.at, in_flight=tuple(event.in_flight))
        if record is not None and event.at > record.last_seen:
            new = replace(new, dead_at=None, death=None)
    return new if record is None else _keep(record, new)


def apply_worker_stopped(record: WorkerRecord | None, event: WorkerStopped) -> WorkerRecord | None:
    """A worker stopped gracefully; a goodbye from a worker never seen, or from a fenced
    registration (not revived first), is ignored."""
    if record is None or record.death is Death.FENCED:
        return record
    if record.stopped_at is not None and record.stopped_at >= event.at:
        return record
    return replace(record, stopped_at=event.at, in_flight=(), dead_at=None, death=None)


def declare_dead(record: WorkerRecord, at: datetime, death: Death) -> WorkerRecord:
    """The watchdog's verdict. A worker whose deliveries were released holds nothing."""
    in_flight = () if death.releases else record.in_flight
    return _keep(
        record, replace(record, dead_at=record.dead_at or at, death=death, in_flight=in_flight)
    )


def worker_state(record: WorkerRecord, now: datetime, timeout_s: float) -> WorkerState:
    """The worker's state at `now`: declared dead, stopped, else by heartbeat age."""
    if record.death is not None:
        return WorkerState.DEAD
    if record.stopped:
        return WorkerState.STOPPED
    age = (now - record.last_seen).total_seconds()
    if age <= timeout_s:
        return WorkerState.ALIVE
    if age <= 2 * timeout_s:
        return WorkerState.SUSPECT
    return WorkerState.DEAD


def worker_change(before: WorkerRecord | None, after: WorkerRecord, timeout_s: float) -> str | None:
    """A sentence for the log when a message changed a worker's state, else None.

    States are judged at the time of the message (`after.last_seen`), not the clock.
    """
    at = max(after.last_seen, after.stopped_at or after.last_seen)
    new = worker_state(after, at, timeout_s)
    if before is None:
        return "registered" if new is not WorkerState.STOPPED else None
    old = worker_state(before, at, timeout_s)
    if old is new:
        return None
    if new is WorkerState.STOPPED:
        return "stopped"
    return f"{new} again (was {old})"


@dataclass(frozen=True, slots=True)
class Overdue:
    """A worker the watchdog must act on, and how long it has been silent."""

    worker: WorkerRecord
    silent_s: float


def overdue(
    workers: Iterable[WorkerRecord], now: datetime, since: datetime, timeout_s: float
) -> list[Overdue]:
    """Workers silent for longer than `timeout_s` at `now`, counted from their last
    heartbeat but never from before `since` (the tracker's start: after a restart every
    worker gets one timeout to be heard again). Stopped workers and workers whose
    deliveries were already released are left alone; an `unfenced` one is due again."""
    due: list[Overdue] = []
    for worker in workers:
        if worker.stopped or (worker.death is not None and worker.death.releases):
            continue
        if (now - max(worker.last_seen, since)).total_seconds() > timeout_s:
            due.append(Overdue(worker, (now - worker.last_seen).total_seconds()))
    return sorted(due, key=lambda o: o.worker.id)


def unmet_requirements(
    pool: str | None, requires: Iterable[str], workers: Iterable[WorkerView]
) -> str | None:
    """Why a queued task that needs `requires` cannot start now: no live worker of its
    pool has every one of those capabilities. None when one has (or nothing is needed)."""
    needed = set(requires)
    if not needed:
        return None
    for view in workers:
        r = view.record
        if r is None or view.state is not WorkerState.ALIVE or r.pool != pool:
            continue
        if needed.issubset(r.capabilities):
            return None
    return (
        f"no live worker in pool {pool!r} has every capability it requires "
        f"({', '.join(sorted(needed))}); it waits in its queue until one starts"
    )
