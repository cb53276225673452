"""``leveret worker``: build the handler registry and run a :class:`Worker`."""

from __future__ import annotations

import asyncio

from leveret.builtin_http import HttpPolicy, parse_allow
from leveret.handlers import Registry
from leveret.runtime import run_service
from leveret.settings import WorkerSettings
from leveret.worker.loopwatch import LoopMonitor
from leveret.worker.runner import Worker


def build_registry(settings: WorkerSettings) -> Registry:
    """Built-in handlers plus those of every ``--handlers`` module."""
    http = HttpPolicy(parse_allow(settings.http_allow), settings.http_max_bytes)
    registry = Registry.with_builtins(
        shell_enabled=settings.shell_enabled, http=http, shell_env=settings.shell_env
    )
    for module in settings.handlers:
        registry.load_module(module)
    return registry


async def run(
    settings: WorkerSettings, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Run one worker until `stop` is set, with a monitor that interrupts an async
    handler blocking the event loop (started once the handler modules are imported,
    which may take a while on the loop; a daemon thread, so it never holds the
    process)."""
    worker = Worker(settings, build_registry(settings))
    monitor = LoopMonitor(settings.loop_block_limit_s, blocker=worker.attempt_of)
    monitor.start()
    try:
        await worker.run(stop, ready=ready)
    finally:
        monitor.stop()


def main(settings: WorkerSettings) -> None:
    """Entry point of ``leveret worker``."""
    run_service("worker", settings, run)
