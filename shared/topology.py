"""Every exchange, queue and binding leveret uses, with their arguments, in one place.

Names are dotted lowercase and written only here. A *namespace* (default
``leveret``) prefixes every name so that a test run or a demo can share a broker
with production without touching it; the public contract is the default
namespace: ``leveret.submit``, ``leveret.results``, ``leveret.events``.

::

    leveret.submit  (topic) --#--> leveret.intake (quorum) --> scheduler
    leveret.work    (direct) --<pool>--> leveret.work.<pool> (quorum) --> workers
    leveret.results (topic, <status>.<pool>.<kind>) --#--> leveret.tracker (quorum)
    leveret.events  (topic, task.* / worker.*)      --#--> leveret.tracker
    leveret.dead    (direct) --rejected--> leveret.rejected (quorum, for people to inspect)
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

from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

DEFAULT_NAMESPACE = "leveret"

#: Routing keys on the events exchange.
RK_TASKS_ACCEPTED = "task.accepted"
RK_TASKS_STARTED = "task.started"
RK_TASK_RETRYING = "task.retrying"
RK_TASK_PROGRESS = "task.progress"
RK_WORKER_STARTED = "worker.started"
RK_WORKER_HEARTBEAT = "worker.heartbeat"
RK_WORKER_STOPPED = "worker.stopped"
RK_SCHEDULER_STARTED = "scheduler.started"
#: Routing keys on the dead-letter exchange.
RK_REJECTED = "rejected"
RK_POISON = "poison"

#: Deliveries of one work message before the broker dead-letters it (crash loops).
WORK_DELIVERY_LIMIT = 3
#: The broker-held delays between attempts, seconds: one TTL queue each.
RETRY_STEPS_S = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Deliveries of one intake message before it is dead-lettered (scheduler crash loops).
INTAKE_DELIVERY_LIMIT = 5


def result_routing_key(status: str, pool: str, kind: str) -> str:
    """Routing key of a result on the results exchange: ``<status>.<pool>.<kind>``."""
    return f"{status}.{pool}.{kind}"


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
    """Names and arguments of the whole topology under one namespace."""

    namespace: str = DEFAULT_NAMESPACE

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
        """The scheduler's inbox: everything published to the submit exchange."""
        return QueueSpec(
            f"{self.namespace}.intake",
            _quorum(self.dead_exchange, RK_REJECTED, INTAKE_DELIVERY_LIMIT),
        )

    def work(self, pool: str) -> QueueSpec:
        """The work queue of one pool."""
        return QueueSpec(
            f"{self.namespace}.work.{pool}",
            _quorum(self.dead_exchange, RK_POISON, WORK_DELIVERY_LIMIT),
        )

    @property
    def tracker(self) -> QueueSpec:
        """The tracker's inbox: every result and every event."""
        return QueueSpec(
            f"{self.namespace}.tracker",
            _quorum(self.dead_exchange, RK_REJECTED, INTAKE_DELIVERY_LIMIT),
        )

    @property
    def rejected(self) -> QueueSpec:
        """Refused submissions, kept with their reason for a person to inspect."""
        return QueueSpec(f"{self.namespace}.rejected", {"x-queue-type": "quorum"})

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
        return [self.intake, self.tracker, self.rejected, self.dead_letters, *retries]

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
        await tracker.bind(ex[self.events_exchange], "#")
        rejected = await self.rejected.declare(channel)
        await rejected.bind(ex[self.dead_exchange], RK_REJECTED)
        dead = await self.dead_letters.declare(channel)
        await dead.bind(ex[self.dead_exchange], RK_POISON)
        for step in RETRY_STEPS_S:
            name = self.retry_exchange(step)
            ex[name] = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
            queue = await self.retry(step).declare(channel)
            await queue.bind(ex[name], "")
        return DeclaredTopology(self, channel, ex)


class DeclaredTopology:
    """The topology declared on one channel: exchange objects and a pool-queue cache."""

    def __init__(
        self, topology: Topology, channel: AbstractChannel, exchanges: dict[str, AbstractExchange]
    ) -> None:
        self.topology = topology
        self.channel = channel
        self._exchanges = exchanges
        self._pools: dict[str, AbstractQueue] = {}

    def exchange(self, name: str) -> AbstractExchange:
        """The exchange object for one of the topology's exchange names."""
        return self._exchanges[name]

    async def declare_pool(self, pool: str) -> AbstractQueue:
        """Declare (once per process) the work queue of `pool` and bind it."""
        queue = self._pools.get(pool)
        if queue is None:
            queue = await self.topology.work(pool).declare(self.channel)
            await queue.bind(self._exchanges[self.topology.work_exchange], pool)
            self._pools[pool] = queue
        return queue


async def delete_namespace(channel: AbstractChannel, topology: Topology, pools: list[str]) -> None:
    """Delete every queue and exchange of a namespace (tests and the demo clean up with it)."""
    for spec in [*topology.fixed_queues(), *(topology.work(p) for p in pools)]:
        await channel.queue_delete(spec.name)
    for name in topology.exchange_names():
        await channel.exchange_delete(name)


__all__ = [
    "DEFAULT_NAMESPACE",
    "DeclaredTopology",
    "QueueSpec",
    "Topology",
    "delete_namespace",
    "result_routing_key",
]
