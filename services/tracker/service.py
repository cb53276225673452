"""``leveret tracker``: the tracker-queue consumer and the HTTP API, in one process."""

from __future__ import annotations

import asyncio
import os
import socket

from loguru import logger

from leveret.amqp import connect, open_channel
from leveret.runtime import http_server, run_service, wait_started
from leveret.settings import TrackerSettings
from leveret.tracker.api import create_app
from leveret.tracker.consumer import Consumer
from leveret.tracker.store import TrackerStore

#: How long a stopping tracker keeps applying the deliveries it already holds.
DRAIN_TIMEOUT_S = 10.0


async def run(
    settings: TrackerSettings, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Run the tracker until `stop` is set; `ready` is set once it consumes and listens."""
    name = f"leveret-tracker-{socket.gethostname()}-{os.getpid()}"
    assert settings.database_url is not None  # TrackerSettings fills in the default
    store = await TrackerStore.open(
        settings.database_url, heartbeat_timeout_s=settings.heartbeat_timeout_s
    )
    try:
        connection = await connect(settings.amqp_url, name)
        try:
            channel = await open_channel(connection)
            await settings.topology.declare(channel)
            await channel.close()
            consumer = Consumer(
                store,
                settings.topology,
                prefetch=settings.prefetch,
                batch_max=settings.batch_max,
                batch_wait_ms=settings.batch_wait_ms,
            )
            app = create_app(store, settings, consuming=lambda: consumer.running)
            server = http_server(app, settings.host, settings.port)
            async with asyncio.TaskGroup() as group:
                await consumer.start(connection)
                batches = group.create_task(consumer.run(), name="tracker-consumer")
                http = group.create_task(server.serve(), name="tracker-http")
                if await wait_started(server, stop):
                    logger.info(
                        "tracker ready: http://{}:{} , queue {} , database {}",
                        settings.host,
                        settings.port,
                        settings.topology.tracker.name,
                        store.engine.url.render_as_string(hide_password=True),
                    )
                    if ready is not None:
                        ready.set()
                await stop.wait()

                logger.info("tracker stopping: applying what it holds")
                await consumer.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(batches), DRAIN_TIMEOUT_S)
                except TimeoutError:
                    logger.warning("tracker drain timed out; unacked messages are redelivered")
                    batches.cancel()
                server.should_exit = True
                await http
            await consumer.close()
            logger.info(
                "tracker drained: {} messages applied, {} rejected",
                consumer.applied,
                consumer.refused,
            )
        finally:
            await connection.close()
    finally:
        await store.close()


def main(settings: TrackerSettings) -> None:
    """Entry point of ``leveret tracker``: logging, SIGTERM/SIGINT, then :func:`run`."""
    run_service("tracker", settings, run)
