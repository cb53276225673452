"""``leveret scheduler``: AMQP intake + HTTP API in front of the work queues."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from loguru import logger
from pydantic import ValidationError

from leveret.amqp import BROKER_EXCEPTIONS, connect, json_message, open_channel, stamp_sender
from leveret.auth import access_from
from leveret.contracts import SchedulerStarted, WorkerStarted, decode_event
from leveret.db import map_db_errors
from leveret.errors import LeveretError
from leveret.roles import RefusedSenders, sender_of
from leveret.runtime import http_server, run_service, wait_started
from leveret.scheduler.admission import Admission, KindCatalog
from leveret.scheduler.api import create_app
from leveret.scheduler.catalog import PoolCatalog, RequirementSets
from leveret.scheduler.dependencies import Resolver
from leveret.scheduler.dispatch import Dispatcher
from leveret.scheduler.intake import Intake
from leveret.scheduler.outcomes import Outcomes
from leveret.scheduler.ratelimit import RateLimiter
from leveret.scheduler.releaser import Releaser
from leveret.scheduler.retention import Purger
from leveret.scheduler.store import SubmissionStore
from leveret.settings import SchedulerSettings
from leveret.topology import RK_SCHEDULER_STARTED, RK_WORKER_STARTED

#: How long a stopping scheduler waits for submissions it holds to be admitted.
DRAIN_TIMEOUT_S = 10.0


async def run(
    settings: SchedulerSettings, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Run the scheduler until `stop` is set, then drain and close."""
    name = f"leveret-scheduler-{socket.gethostname()}-{os.getpid()}"
    access = access_from(settings)  # refuses an unsafe bind before anything opens
    assert settings.scheduler_database_url is not None
    store = await SubmissionStore.open(settings.scheduler_database_url)
    connection = await connect(settings.amqp_url, name, tls=settings.amqp_tls)
    try:
        channel = await open_channel(connection)
        declared = await settings.topology.declare(channel)
        kinds = KindCatalog(settings.kinds)
        kinds.add(await store.known_kinds())
        pools = PoolCatalog(settings.pools)
        pools.add(await store.known_pools())
        sets = RequirementSets(settings.max_requirement_sets, await store.known_requirement_sets())
        dispatcher = Dispatcher(declared, limited=kinds.limited)
        releaser = Releaser(store, dispatcher, batch_max=settings.batch_max)
        resolver = Resolver(store, dispatcher, on_delayed=releaser.wake)
        admission = Admission(
            store,
            dispatcher,
            batch_max=settings.batch_max,
            batch_wait_ms=settings.batch_wait_ms,
            on_delayed=releaser.wake,
            on_blocked=resolver.kick,
            pools=pools,
            requirement_sets=sets,
        )
        await admission.recover()
        await resolver.recover()
        outcomes = Outcomes(store, resolver, settings.topology, roles=settings.roles)
        intake = Intake(
            admission, declared, kinds, max_bytes=settings.max_payload_bytes, roles=settings.roles
        )
        limiter = RateLimiter(settings.http_rate_per_s, settings.http_burst)
        app = create_app(
            admission,
            kinds,
            max_bytes=settings.max_payload_bytes,
            limiter=limiter,
            body_budget_bytes=settings.http_body_budget_bytes,
            body_timeout_s=settings.http_body_timeout_s,
            access=access,
        )
        server = http_server(app, settings)

        async with asyncio.TaskGroup() as group:
            flusher = group.create_task(admission.run(), name="admission")
            holders = [
                group.create_task(releaser.run(), name="releaser"),
                group.create_task(resolver.run(), name="resolver"),
                group.create_task(outcomes.run(), name="outcomes"),
                group.create_task(intake.keys.run(), name="intake-keys"),
            ]
            if settings.retention:
                purger = Purger(store, settings.retention)
                holders.append(group.create_task(purger.run(), name="retention"))
            await outcomes.start(connection)
            kinds_channel = await _watch_workers(connection, settings, kinds, pools, store)
            intake_channel = await open_channel(connection, prefetch=settings.intake_prefetch)
            intake_queue = await settings.topology.intake.declare(intake_channel)
            tag = await intake_queue.consume(intake.on_message)
            events = declared.exchange(settings.topology.events_exchange)
            hello = stamp_sender(events, json_message(SchedulerStarted(), persistent=False))
            # for the workers that listen (none may run yet: not mandatory)
            await events.publish(hello, RK_SCHEDULER_STARTED, mandatory=False)
            http = group.create_task(server.serve(), name="http")
            if await wait_started(server, stop):
                logger.info(
                    "scheduler ready: {}://{}:{} , intake {} , kinds {}",
                    "https" if settings.tls_cert_file else "http",
                    settings.host,
                    settings.port,
                    settings.topology.intake.name,
                    ",".join(kinds.names()),
                )
                if ready is not None:
                    ready.set()
            await stop.wait()

            logger.info("scheduler stopping: no new submissions")
            with contextlib.suppress(*BROKER_EXCEPTIONS):  # a channel restored after a drop
                await intake_queue.cancel(tag)
            server.should_exit = True
            await http
            try:
                await asyncio.wait_for(intake.idle.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                logger.warning("{} intake messages left unacked (redelivered)", intake.in_flight)
            flusher.cancel()
            await outcomes.stop()
            for task in holders:
                task.cancel()
        intake_closed = False
        for open_ in (kinds_channel, intake_channel, channel):
            with contextlib.suppress(*BROKER_EXCEPTIONS):
                await open_.close()
                intake_closed |= open_ is intake_channel
        # The intake channel's close-ok follows every ack written on it: its keys can go
        # (else the flusher's rule holds: the last second of acks keeps its keys).
        await intake.keys.forget(settled_only=not intake_closed)
    finally:
        await connection.close()
        await store.close()


async def _watch_workers(
    connection: AbstractRobustConnection,
    settings: SchedulerSettings,
    kinds: KindCatalog,
    pools: PoolCatalog,
    store: SubmissionStore,
) -> AbstractChannel:
    """Learn the kinds and pools workers announce (on `worker.started`), and remember
    them in the store; returns the channel."""
    channel = await open_channel(connection, prefetch=100)
    exchange = await channel.get_exchange(settings.topology.events_exchange)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, RK_WORKER_STARTED)
    forged = RefusedSenders()  # its messages are dropped: the tracker's copy is set aside

    async def on_event(message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=False, ignore_processed=True):
            try:
                event = decode_event(message.body)
            except ValidationError as exc:
                logger.warning("ignoring malformed worker announcement: {}", exc)
                return
            if not isinstance(event, WorkerStarted):
                return
            if settings.roles.may_send(event.type, sender_of(message)):
                await _learn(event, kinds, pools, store)
            else:
                forged.refused(event.type, sender_of(message), message.message_id)

    await queue.consume(on_event)
    return channel


async def _learn(
    event: WorkerStarted, kinds: KindCatalog, pools: PoolCatalog, store: SubmissionStore
) -> None:
    """Accept what a worker announced (within the catalogs' bounds) and remember it in
    the store; a store error only logs: workers announce again when a scheduler starts."""
    worker = event.worker
    new_kinds = kinds.add(worker.kinds)
    kinds.limit(worker.limits)
    new_pools = pools.add([worker.pool])
    if new_kinds:
        logger.info("learned kinds {} from {}", sorted(new_kinds), worker.id)
    if new_pools:
        logger.info("learned pool {} from {}", worker.pool, worker.id)
    try:
        with map_db_errors():
            await store.add_kinds(new_kinds)
            await store.add_pools(new_pools)
    except LeveretError as exc:
        logger.warning("announcement of {} not remembered: {}", worker.id, exc)


def main(settings: SchedulerSettings) -> None:
    """Entry point of ``leveret scheduler``."""
    run_service("scheduler", settings, run)
