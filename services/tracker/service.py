"""``leveret tracker``: the tracker-queue consumer, the dead-letter consumer, the worker
watchdog, the reply sender, retention and the HTTP API, in one process."""

from __future__ import annotations

import asyncio
import os
import socket

from loguru import logger

from leveret.amqp import connect, open_channel
from leveret.auth import access_from
from leveret.contracts import utcnow
from leveret.management import ManagementApi, vhost_of
from leveret.roles import amqp_user
from leveret.runtime import http_server, run_service, wait_started
from leveret.settings import TrackerSettings
from leveret.tracker.api import create_app
from leveret.tracker.consumer import Consumer
from leveret.tracker.deadletters import DeadLetters
from leveret.tracker.replies import ReplySender
from leveret.tracker.retention import Retention, format_duration
from leveret.tracker.store import TrackerStore
from leveret.tracker.watchdog import Watchdog

#: How long a stopping tracker keeps applying the deliveries it already holds.
DRAIN_TIMEOUT_S = 10.0


async def run(
    settings: TrackerSettings, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Run the tracker until `stop` is set; `ready` is set once it consumes and listens."""
    started_at = utcnow()  # every worker gets one heartbeat timeout from here
    name = f"leveret-tracker-{socket.gethostname()}-{os.getpid()}"
    access = access_from(settings)  # refuses an unsafe bind before anything opens
    assert settings.database_url is not None  # TrackerSettings fills in the default
    store = await TrackerStore.open(
        settings.database_url, heartbeat_timeout_s=settings.heartbeat_timeout_s
    )
    api = ManagementApi.from_settings(settings.management_url, settings.amqp_url)
    try:
        connection = await connect(settings.amqp_url, name, tls=settings.amqp_tls)
        try:
            channel = await open_channel(connection)
            await settings.topology.declare(channel)
            await channel.close()
            replies = ReplySender(store)
            consumer = Consumer(
                store,
                settings.topology,
                prefetch=settings.prefetch,
                batch_max=settings.batch_max,
                batch_wait_ms=settings.batch_wait_ms,
                replies=replies,
                roles=settings.roles,
            )
            own_user = amqp_user(settings.amqp_url)
            dead_letters = DeadLetters(store, settings.topology, replies)
            watchdog = Watchdog(
                store,
                api,
                timeout_s=settings.heartbeat_timeout_s,
                vhost=vhost_of(settings.amqp_url),
                caught_up=consumer.caught_up_at,
                listening_since=consumer.listening_since,
                started_at=started_at,
                fence_users=lambda w: settings.roles.fence_users(
                    consumer.worker_users.get(w), own_user
                ),
            )
            retention = Retention(
                store,
                retention_s=settings.retention,
                worker_retention_s=settings.worker_retention,
                on_workers_dropped=consumer.forget_workers,
            )
            app = create_app(
                store,
                settings,
                consuming=lambda: consumer.running and dead_letters.running,
                access=access,
            )
            server = http_server(app, settings)
            async with asyncio.TaskGroup() as group:
                await replies.start(connection)
                await consumer.start(connection)
                await dead_letters.start(connection)
                batches = group.create_task(consumer.run(), name="tracker-consumer")
                letters = group.create_task(dead_letters.run(), name="tracker-dead-letters")
                watching = group.create_task(watchdog.run(stop), name="tracker-watchdog")
                purging = group.create_task(retention.run(stop), name="tracker-retention")
                http = group.create_task(server.serve(), name="tracker-http")
                if await wait_started(server, stop):
                    logger.info(
                        "tracker ready: {}://{}:{} , queue {} , database {} , "
                        "management API {} , heartbeat timeout {} s , retention {} , "
                        "worker retention {}",
                        "https" if settings.tls_cert_file else "http",
                        settings.host,
                        settings.port,
                        settings.topology.tracker.name,
                        store.engine.url.render_as_string(hide_password=True),
                        api.url,
                        settings.heartbeat_timeout_s,
                        format_duration(settings.retention) if settings.retention else "off",
                        format_duration(settings.worker_retention),
                    )
                    if ready is not None:
                        ready.set()
                await stop.wait()

                logger.info("tracker stopping: applying what it holds")
                await watching
                await purging
                await consumer.stop()
                await dead_letters.stop()
                await _drain(batches, letters)
                server.should_exit = True
                await http
            await consumer.close()
            await dead_letters.close()
            await replies.close()
            logger.info(
                "tracker drained: {} messages applied, {} rejected, {} dead letters handled, "
                "{} replies sent, {} workers declared dead",
                consumer.applied,
                consumer.refused,
                dead_letters.handled,
                replies.sent,
                watchdog.declared,
            )
        finally:
            await connection.close()
    finally:
        await api.close()
        await store.close()


async def _drain(*tasks: asyncio.Task[None]) -> None:
    """Let the consumers apply what they hold, for up to :data:`DRAIN_TIMEOUT_S`."""
    _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
    if late:
        logger.warning("tracker drain timed out; unacked messages are redelivered")
        for task in late:
            task.cancel()


def main(settings: TrackerSettings) -> None:
    """Entry point of ``leveret tracker``: logging, SIGTERM/SIGINT, then :func:`run`."""
    run_service("tracker", settings, run)
