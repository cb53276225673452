"""What every service's entry point does the same way: logging, signals, the HTTP
server, and running a ``run(settings, stop)`` coroutine until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import uvicorn
from loguru import logger

from leveret.errors import LeveretError
from leveret.log import configure
from leveret.settings import ApiSettings, CommonSettings

S = TypeVar("S", bound=CommonSettings)


class HttpServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the service (one stop event rules all)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Do not install uvicorn's own signal handlers."""
        yield


def http_server(app: Any, settings: ApiSettings) -> HttpServer:
    """A uvicorn server for `app` on the settings' host and port, logging through
    loguru, without access logs; HTTPS when the settings name a certificate and key."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    return HttpServer(config)


async def wait_started(server: HttpServer, stop: asyncio.Event) -> bool:
    """Wait until the server listens (True) or the service is stopping (False)."""
    while not server.started:
        if stop.is_set():
            return False
        await asyncio.sleep(0.02)  # uvicorn offers no event to await
    return True


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.warning("{} again: exiting now", sig.name)
            sys.exit(1)
        logger.info("{} received: stopping gracefully", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (noticeably cheaper per message), else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def run_service(name: str, settings: S, run: Callable[[S, asyncio.Event], Awaitable[None]]) -> None:
    """Configure logging, install signal handlers and run `run` until it returns."""
    configure(name, json=settings.log_json, level=settings.log_level)
    # Everything imported so far lives forever: keep the collector from rescanning it,
    # and collect young objects less often (a service allocates a lot per message).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run(settings, stop)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(main())
    except LeveretError as exc:
        logger.error("{} cannot run: {}", name, exc)
        sys.exit(2)
    logger.info("{} stopped", name)
