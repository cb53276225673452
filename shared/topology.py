"""Every exchange, queue and binding leveret uses, with their arguments, in one place.

Names are dotted lowercase and written only here. A *namespace* (default
``leveret``) prefixes every name so that a test run or a demo can share a broker
with production without touching it; the public contract is the default
namespace: ``leveret.submit``, ``leveret.results``, ``leveret.events``.

::

    leveret.submit  (topic) --#--> leveret.intake (quorum, bounded) --> scheduler
    leveret.work    (direct) --<pool>--> leveret.work.<pool> (quorum) --> workers
                             --<pool>.high--> leveret.work.<pool>.high
                             --<pool>.low---> leveret.work.<pool>.low
                             --<pool>.req.<a>+<b>--> leveret.work.<pool>.req.<a>+<b>
                                 (tasks that require capabilities a and b)
    leveret.results (topic, <status>.<pool>.<kind>) --#--> leveret.tracker (quorum)
    leveret.events  (topic, task.* / worker.*)      --(all but task.ended/cancel)--> leveret.tracker
                    --task.ended--> leveret.scheduler.outcomes (quorum; the tracker's
                                    committed outcomes release blocked tasks)
                    --task.cancel--> leveret.cancellations (stream, 1 day, 32 MiB; every
                                     worker reads it)
    leveret.requirements (stream, 256 MiB): every requirement set the scheduler routes to;
                    workers read it from the start and consume the sets they satisfy
    leveret.dead    (direct) --rejected--> leveret.rejected (quorum, newest 100k, for people)
                             --poison----> leveret.dead.letters (quorum, tracker)
    leveret.retry.<n>s (fanout) --> leveret.retry.<n>s (quorum, TTL n s)
                             --expired, dead-lettered--> leveret.work (same routing key: pool)

A retry waits in the broker, never in a worker's memory: the worker publishes the
task to the step queue whose TTL is the backoff and acks its delivery; when the TTL
expires the broker dead-letters it back to the work exchange under its pool.

Quorum queues are used everywhere a message must survive a broker restart.
They have no `x-max-priority` before RabbitMQ 4.0, so nothing here declares it.
Declaration is idempotent: :meth:`Topology.declare` may run in every service at
every start, and :meth:`Topology.declare_pool` caches what it has declared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

DEFAULT_NAMESPACE = "leveret"

#: Routing keys on the events exchange.
RK_TASKS_ACCEPTED = "task.accepted"
RK_TASKS_STARTED = "task.started"
RK_TASKS_ENDED = "task.ended"
RK_TASK_RETRYING = "task.retrying"
RK_TASK_RETURNED = "task.returned"
RK_TASK_PROGRESS = "task.progress"
RK_TASK_CANCEL = "task.cancel"
RK_WORKER_STARTED = "worker.started"
RK_WORKER_HEARTBEAT = "worker.heartbeat"
RK_WORKER_STOPPED = "worker.stopped"
RK_SCHEDULER_STARTED = "scheduler.started"
#: What the tracker records from the events exchange: not its own `task.ended` (for the
#: scheduler), `task.cancel` (for workers) or `scheduler.started` (for workers), which
#: would each cost it a delivery and a transaction that changes nothing.
TRACKER_EVENT_KEYS = (
    RK_TASKS_ACCEPTED,
    RK_TASKS_STARTED,
    RK_TASK_RETRYING,
    RK_TASK_RETURNED,
    RK_TASK_PROGRESS,
    "worker.*",
)
#: Routing keys on the dead-letter exchange.
RK_REJECTED = "rejected"
RK_POISON = "poison"

#: Deliveries of one work message before the broker dead-letters it (crash loops).
WORK_DELIVERY_LIMIT = 3
#: The broker-held delays between attempts, seconds: one TTL queue each.
RETRY_STEPS_S = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: A requirement set whose tags, joined, are longer than this is named by a digest
#: (queue names and routing keys are limited to 255 bytes).
MAX_REQUIREMENT_TEXT = 120

#: Deliveries of one intake message before it is dead-lettered (scheduler crash loops).
INTAKE_DELIVERY_LIMIT = 5

# Bounds on what producers can pile up in the broker (see docs/security.md, "Sizes").
#: Submissions waiting in the intake queue, at most; past either bound the broker
#: nacks a publish (`x-overflow: reject-publish`), never drops one silently.
INTAKE_MAX_MESSAGES = 1_000_000
#: Bytes of message bodies waiting in the intake queue, at most.
INTAKE_MAX_BYTES = 1024**3
#: Refused submissions kept for people to inspect: the newest this many (older go).
REJECTED_MAX_MESSAGES = 100_000
REJECTED_MAX_BYTES = 256 * 1024**2
#: Size caps of the streams. Retention drops whole segments, oldest first.
REQUIREMENTS_MAX_BYTES = 256 * 1024**2
REQUIREMENTS_SEGMENT_BYTES = 8 * 1024**2
CANCELLATIONS_MAX_BYTES = 32 * 1024**2
CANCELLATIONS_SEGMENT_BYTES = 2 * 1024**2
#: How long `task.cancel` commands are kept in their stream (and remembered by workers).
CANCELLATIONS_MAX_AGE = "1D"


def result_routing_key(status: str, pool: str, kind: str) -> str:
    """Routing key of a result on the results exchange: ``<status>.<pool>.<kind>``."""
    return f"{status}.{pool}.{kind}"


class Band(StrEnum):
    """A priority band: one work queue per pool and band (quorum queues have no
    `x-max-priority` before RabbitMQ 4.0). Workers take from all three by weight."""

    HIGH = "high"  # priorities 7-9
    NORMAL = "normal"  # priorities 3-6 (and the default)
    LOW = "low"  # priorities 0-2


#: Share of free slots a busy worker gives each band (smooth weighted round robin):
#: high work goes first, and low work still gets one slot in ten, so it never starves.
BAND_WEIGHTS = {Band.HIGH: 6, Band.NORMAL: 3, Band.LOW: 1}


def band_of(priority: int) -> Band:
    """The band of a task priority (0 lowest … 9 highest)."""
    if priority >= 7:
        return Band.HIGH
    if priority >= 3:
        return Band.NORMAL
    return Band.LOW


def work_key(pool: str, band: Band) -> str:
    """Routing key on the work exchange: ``<pool>`` for normal, ``<pool>.high``, ``<pool>.low``."""
    return pool if band is Band.NORMAL else f"{pool}.{band}"


def limited_key(pool: str, kind: str) -> str:
    """Routing key on the work exchange for a kind with a cluster-wide limit."""
    return f"{pool}.kind.{kind}"


def requirement_set(tags: Iterable[str]) -> tuple[str, ...]:
    """Capability tags in canonical form: each once, sorted."""
    return tuple(sorted(set(tags)))


def requirement_key(pool: str, requires: Iterable[str]) -> str:
    """Routing key on the work exchange for tasks that need `requires`:
    ``<pool>.req.<a>+<b>`` (``+`` is not a tag character), or a digest for a long set."""
    text = "+".join(requirement_set(requires))
    if len(text) > MAX_REQUIREMENT_TEXT:
        text = "sha-" + hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"{pool}.req.{text}"


@dataclass(frozen=True)
class QueueSpec:
    """A queue as a value: its name and every argument it is declared with."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        """Declare the queue (durable); idempotent while the arguments do not change."""
        return await channel.declare_queue(self.name, durable=True, arguments=self.arguments)


def _quorum(dead_letter_exchange: str, dead_letter_key: str, delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-routing-key": dead_letter_key,
        # at-least-once dead-lettering needs reject-publish overflow.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


@dataclass(frozen=True)
class Topology:
    """Names and arguments of the whole topology under one namespace.

    Every service declares the same queues, so each argument must be the same in all
    of them (a difference is a PRECONDITION_FAILED): the bounds are constants, and the
    fields below exist for tests that need a queue that fills quickly.
    """

    namespace: str = DEFAULT_NAMESPACE
    intake_max_messages: int = INTAKE_MAX_MESSAGES
    intake_max_bytes: int = INTAKE_MAX_BYTES

    # exchanges
    @property
    def submit_exchange(self) -> str:
        """Where producers publish tasks (topic; routing key = pool)."""
        return f"{self.namespace}.submit"

    @property
    def work_exchange(self) -> str:
        """Where the scheduler publishes accepted tasks (direct; routing key = pool)."""
        return f"{self.namespace}.work"

    @property
    def results_exchange(self) -> str:
        """Where every outcome is published (topic; ``<status>.<pool>.<kind>``)."""
        return f"{self.namespace}.results"

    @property
    def events_exchange(self) -> str:
        """Task and worker events (topic; ``task.*``, ``worker.*``)."""
        return f"{self.namespace}.events"

    @property
    def dead_exchange(self) -> str:
        """Dead letters and refused submissions (direct)."""
        return f"{self.namespace}.dead"

    # queues
    @property
    def intake(self) -> QueueSpec:
        """The scheduler's inbox: everything published to the submit exchange. Bounded:
        once full, a publish is nacked (the producer's confirm says so) until it drains."""
        arguments = _quorum(self.dead_exchange, RK_REJECTED, INTAKE_DELIVERY_LIMIT)
        arguments["x-max-length"] = self.intake_max_messages
        arguments["x-max-length-bytes"] = self.intake_max_bytes
        return QueueSpec(f"{self.namespace}.intake", arguments)

    def work(self, pool: str, band: Band = Band.NORMAL) -> QueueSpec:
        """The work queue of one pool and priority band (`normal` by default)."""
        return QueueSpec(
            f"{self.namespace}.work.{work_key(pool, band)}",
            _quorum(self.dead_exchange, RK_POISON, WORK_DELIVERY_LIMIT),
        )

    def limited(self, pool: str, kind: str) -> QueueSpec:
        """The work queue of a kind with a cluster-wide limit: one active consumer at a
        time (the broker elects it; see ``leveret.worker.limits``)."""
        arguments = _quorum(self.dead_exchange, RK_POISON, WORK_DELIVERY_LIMIT)
        arguments["x-single-active-consumer"] = True
        return QueueSpec(f"{self.namespace}.work.{limited_key(pool, kind)}", arguments)

    def requirement(self, pool: str, requires: Iterable[str]) -> QueueSpec:
        """The work queue of the tasks of `pool` that need exactly the set `requires`."""
        return QueueSpec(
            f"{self.namespace}.work.{requirement_key(pool, requires)}",
            _quorum(self.dead_exchange, RK_POISON, WORK_DELIVERY_LIMIT),
        )

    @property
    def requirements(self) -> QueueSpec:
        """Every requirement set the scheduler routed tasks to, as a stream that workers
        read from the start. Records are tiny and written once per set per scheduler
        process, so size-based retention keeps them for as long as anyone needs."""
        arguments = {
            "x-queue-type": "stream",
            "x-max-length-bytes": REQUIREMENTS_MAX_BYTES,
            "x-stream-max-segment-size-bytes": REQUIREMENTS_SEGMENT_BYTES,
        }
        return QueueSpec(f"{self.namespace}.requirements", arguments)

    @property
    def tracker(self) -> QueueSpec:
        """The tracker's inbox: every result and every event."""
        return QueueSpec(
            f"{self.namespace}.tracker",
            _quorum(self.dead_exchange, RK_REJECTED, INTAKE_DELIVERY_LIMIT),
        )

    @property
    def scheduler_outcomes(self) -> QueueSpec:
        """The scheduler's inbox of `tasks.ended` events: the outcomes the tracker
        committed, which release or end the tasks that depend on them."""
        return QueueSpec(
            f"{self.namespace}.scheduler.outcomes",
            _quorum(self.dead_exchange, RK_REJECTED, INTAKE_DELIVERY_LIMIT),
        )

    @property
    def rejected(self) -> QueueSpec:
        """Refused submissions, kept with their reason for a person to inspect: the newest
        ones (`drop-head`), so a flood of bad input never blocks the refusals."""
        arguments = {
            "x-queue-type": "quorum",
            "x-max-length": REJECTED_MAX_MESSAGES,
            "x-max-length-bytes": REJECTED_MAX_BYTES,
            "x-overflow": "drop-head",
        }
        return QueueSpec(f"{self.namespace}.rejected", arguments)

    def retry_exchange(self, step_s: int) -> str:
        """The fanout exchange in front of one backoff step's TTL queue."""
        return f"{self.namespace}.retry.{step_s}s"

    def retry(self, step_s: int) -> QueueSpec:
        """The TTL queue of one backoff step; expired messages go back to the work exchange."""
        arguments = {
            "x-queue-type": "quorum",
            "x-message-ttl": step_s * 1000,
            "x-dead-letter-exchange": self.work_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        return QueueSpec(f"{self.namespace}.retry.{step_s}s", arguments)

    @property
    def cancellations(self) -> QueueSpec:
        """Every `task.cancel` of the last day, as a stream: each worker reads it from
        the start, so one that joins later still knows which queued tasks not to run.
        Small segments let the age limit drop old commands (retention drops whole
        segments); the byte cap bounds a flood."""
        arguments = {
            "x-queue-type": "stream",
            "x-max-age": CANCELLATIONS_MAX_AGE,
            "x-max-length-bytes": CANCELLATIONS_MAX_BYTES,
            "x-stream-max-segment-size-bytes": CANCELLATIONS_SEGMENT_BYTES,
        }
        return QueueSpec(f"{self.namespace}.cancellations", arguments)

    @property
    def dead_letters(self) -> QueueSpec:
        """Work messages the broker gave up on (delivery limit); the tracker records them."""
        return QueueSpec(f"{self.namespace}.dead.letters", {"x-queue-type": "quorum"})

    def exchange_names(self) -> list[str]:
        """Every exchange of the namespace (for clean-up)."""
        return [
            self.submit_exchange,
            self.work_exchange,
            self.results_exchange,
            self.events_exchange,
            self.dead_exchange,
            *(self.retry_exchange(s) for s in RETRY_STEPS_S),
        ]

    def fixed_queues(self) -> list[QueueSpec]:
        """Every queue of the namespace except the per-pool work queues."""
        retries = [self.retry(s) for s in RETRY_STEPS_S]
        fixed = [
            self.intake,
            self.tracker,
            self.scheduler_outcomes,
            self.rejected,
            self.dead_letters,
            self.cancellations,
            self.requirements,
        ]
        return [*fixed, *retries]

    async def declare(self, channel: AbstractChannel) -> DeclaredTopology:
        """Declare every exchange, fixed queue and binding. Safe to run again."""
        ex: dict[str, AbstractExchange] = {}
        kinds = {
            self.submit_exchange: ExchangeType.TOPIC,
            self.work_exchange: ExchangeType.DIRECT,
            self.results_exchange: ExchangeType.TOPIC,
            self.events_exchange: ExchangeType.TOPIC,
            self.dead_exchange: ExchangeType.DIRECT,
        }
        for name, kind in kinds.items():
            ex[name] = await channel.declare_exchange(name, kind, durable=True)
        intake = await self.intake.declare(channel)
        await intake.bind(ex[self.submit_exchange], "#")
        tracker = await self.tracker.declare(channel)
        await tracker.bind(ex[self.results_exchange], "#")
        for key in TRACKER_EVENT_KEYS:
            await tracker.bind(ex[self.events_exchange], key)
        # Brokers set up by leveret 0.1 bound every event (`#`); unbinding is a no-op after.
        await tracker.unbind(ex[self.events_exchange], "#")
        rejected = await self.rejected.declare(channel)
        await rejected.bind(ex[self.dead_exchange], RK_REJECTED)
        dead = await self.dead_letters.declare(channel)
        await dead.bind(ex[self.dead_exchange], RK_POISON)
        cancellations = await self.cancellations.declare(channel)
        await cancellations.bind(ex[self.events_exchange], RK_TASK_CANCEL)
        await self.requirements.declare(channel)
        outcomes = await self.scheduler_outcomes.declare(channel)
        await outcomes.bind(ex[self.events_exchange], RK_TASKS_ENDED)
        return DeclaredTopology(self, channel, ex)


class DeclaredTopology:
    """The topology declared on one channel: exchange objects and a pool-queue cache."""

    def __init__(
        self, topology: Topology, channel: AbstractChannel, exchanges: dict[str, AbstractExchange]
    ) -> None:
        self.topology = topology
        self.channel = channel
        self._exchanges = exchanges
        self._pools: dict[str, dict[Band, AbstractQueue]] = {}
        self._limited: dict[tuple[str, str], AbstractQueue] = {}
        self._required: dict[str, AbstractQueue] = {}

    def exchange(self, name: str) -> AbstractExchange:
        """The exchange object for one of the topology's exchange names."""
        return self._exchanges[name]

    async def declare_pool(self, pool: str) -> dict[Band, AbstractQueue]:
        """Declare (once per process) the band queues of `pool` and bind them."""
        queues = self._pools.get(pool)
        if queues is None:
            queues = {}
            for band in Band:
                queue = await self.topology.work(pool, band).declare(self.channel)
                await queue.bind(self._exchanges[self.topology.work_exchange], work_key(pool, band))
                queues[band] = queue
            self._pools[pool] = queues
        return queues

    async def declare_retry(self, step_s: int) -> AbstractExchange:
        """Declare (once per process) one backoff step: its exchange and TTL queue.

        Steps are declared when first needed, not up front: most namespaces use one
        or two, and every quorum queue costs the broker a Raft group.
        """
        name = self.topology.retry_exchange(step_s)
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self.channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
            queue = await self.topology.retry(step_s).declare(self.channel)
            await queue.bind(exchange, "")
            self._exchanges[name] = exchange
        return exchange

    async def declare_limited(self, pool: str, kind: str) -> AbstractQueue:
        """Declare (once per process) the single-active-consumer queue of a limited kind."""
        queue = self._limited.get((pool, kind))
        if queue is None:
            queue = await self.topology.limited(pool, kind).declare(self.channel)
            await queue.bind(self._exchanges[self.topology.work_exchange], limited_key(pool, kind))
            self._limited[(pool, kind)] = queue
        return queue

    async def declare_requirement(self, pool: str, requires: Iterable[str]) -> AbstractQueue:
        """Declare (once per process) the queue of one requirement set and bind it."""
        key = requirement_key(pool, requires)
        queue = self._required.get(key)
        if queue is None:
            queue = await self.topology.requirement(pool, requires).declare(self.channel)
            await queue.bind(self._exchanges[self.topology.work_exchange], key)
            self._required[key] = queue
        return queue


async def delete_namespace(
    channel: AbstractChannel,
    topology: Topology,
    pools: list[str],
    limited_kinds: Iterable[str] = (),
    requirement_sets: Iterable[Iterable[str]] = (),
) -> None:
    """Delete every queue and exchange of a namespace (tests and the demo clean up with it)."""
    work = [topology.work(p, band) for p in pools for band in Band]
    work += [topology.limited(p, k) for p in pools for k in limited_kinds]
    sets = [requirement_set(r) for r in requirement_sets]
    work += [topology.requirement(p, r) for p in pools for r in sets]
    for spec in [*topology.fixed_queues(), *work]:
        await channel.queue_delete(spec.name)
    for name in topology.exchange_names():
        await channel.exchange_delete(name)


__all__ = [
    "BAND_WEIGHTS",
    "DEFAULT_NAMESPACE",
    "Band",
    "DeclaredTopology",
    "QueueSpec",
    "Topology",
    "band_of",
    "delete_namespace",
    "limited_key",
    "requirement_key",
    "requirement_set",
    "result_routing_key",
    "work_key",
]
