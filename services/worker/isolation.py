"""Blocking handlers run in child processes that can be killed.

A sync handler cannot be cancelled: a thread stuck in a blocking call keeps
running after its task timed out. So each blocking call goes to a warm child
process; on timeout or cancellation that child is killed and replaced, which
ends the call whatever it was doing. A child that dies by itself (a crash in a
C extension, ``os._exit``) fails only its task, not the worker.

Handlers must be importable by reference (module-level functions, which is what
``--handlers`` modules hold); one that cannot be pickled runs in a thread instead.

A task's timeout bounds the call, not the start-up of the child that runs it: a
fresh child (the first ones, and each replacement of a killed one) first starts
and imports the handler's module, bounded by :data:`STARTUP_TIMEOUT_S`, and only
then is the call timed. Otherwise the retry of a timed-out attempt, which always
gets a fresh child, could time out before its handler even ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import multiprocessing
import pickle
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

from loguru import logger

from leveret.contracts import MAX_ERROR_MESSAGE_CHARS
from leveret.errors import TaskFailed
from leveret.handlers import HandlerFunc, ProgressReporter, TaskContext, clip

_CTX = multiprocessing.get_context("spawn")


#: How long a fresh child may take to start and import a handler's module.
STARTUP_TIMEOUT_S = 60.0


class HandlerCrashed(Exception):
    """The child process running a handler died before answering."""


class CallTimedOut(Exception):
    """A call ran past its timeout (or its child did not start); the child was killed."""


def _child_main(conn: Connection) -> None:
    """The child's loop: receive a call, run it, send the outcome. A ``load`` message
    only imports its function's module (unpickling does) and says so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "load":
            conn.send(("loaded",))
            continue
        _, func, ctx, payload = message
        ctx = dataclasses.replace(ctx, reporter=_progress_sender(conn))
        try:
            value = func(ctx, payload)
            if inspect.isawaitable(value):
                value = asyncio.run(_await(value))
        except TaskFailed as exc:  # texts cut here too: a huge one need not cross the pipe
            conn.send(("failed", exc.type, clip(str(exc), MAX_ERROR_MESSAGE_CHARS)))
        except BaseException as exc:  # report everything; the parent fails the task
            text = clip(str(exc) or repr(exc), MAX_ERROR_MESSAGE_CHARS)
            conn.send(("error", type(exc).__name__, text))
        else:
            _answer(conn, value)


def _answer(conn: Connection, value: Any) -> None:
    """Send a handler's return value; one that cannot leave the process (a generator,
    a lock) fails the task as `result_not_json`, as a non-JSON value does in the parent."""
    try:
        data = ForkingPickler.dumps(("ok", value))
    except Exception as exc:
        kind = type(value).__name__
        conn.send(("failed", "result_not_json", f"handler returned {kind}: {exc}"))
    else:
        conn.send_bytes(data)


def _progress_sender(conn: Connection) -> ProgressReporter:
    def send(fraction: float | None, message: str | None) -> None:
        conn.send(("progress", fraction, message))

    return send


async def _await(value: Any) -> Any:
    return await value


class _Child:
    """One child process and the parent's end of its pipe."""

    def __init__(self) -> None:
        self.conn, child_end = _CTX.Pipe(duplex=True)
        self.proc: BaseProcess = _CTX.Process(target=_child_main, args=(child_end,), daemon=True)
        self.proc.start()
        child_end.close()
        self.modules: set[str] = set()  # handler modules this child has imported

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class ProcessPool:
    """At most `size` warm child processes, each running one blocking call at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[_Child] = []
        self._slots = asyncio.Semaphore(size)
        self.replaced = 0

    @staticmethod
    def picklable(func: HandlerFunc) -> bool:
        """Whether `func` can be sent to a child (module-level functions can)."""
        try:
            pickle.dumps(func)
        except Exception:
            return False
        return True

    async def call(
        self, func: HandlerFunc, ctx: TaskContext, payload: Any, timeout_s: float | None = None
    ) -> Any:
        """Run ``func(ctx, payload)`` in a child, for at most `timeout_s` once the child
        is ready (raising :class:`CallTimedOut`); cancelling the call kills the child."""
        async with self._slots:
            child = self._idle.pop() if self._idle else await asyncio.to_thread(_Child)
            healthy = False
            try:
                await self._ready(child, func)
                try:
                    async with asyncio.timeout(timeout_s):
                        reply = await self._roundtrip(
                            child, ("call", func, ctx, payload), ctx.reporter
                        )
                except TimeoutError as exc:  # the child's own errors come back as replies
                    raise CallTimedOut(f"attempt exceeded timeout_s={timeout_s}") from exc
                healthy = True
            finally:
                if healthy:
                    self._idle.append(child)
                else:
                    self.replaced += 1
                    child.kill()
        return _unpack(reply)

    async def _ready(self, child: _Child, func: HandlerFunc) -> None:
        """Make sure `child` runs and has imported `func`'s module."""
        module = getattr(func, "__module__", None) or ""
        if module in child.modules:
            return
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await self._roundtrip(child, ("load", func), None)
        except TimeoutError as exc:
            message = f"handler process not ready within {STARTUP_TIMEOUT_S:g} s"
            raise CallTimedOut(message) from exc
        child.modules.add(module)

    async def _roundtrip(
        self, child: _Child, message: Any, reporter: ProgressReporter | None
    ) -> Any:
        """Send a call; relay progress reports until the final answer arrives."""
        child.conn.send(message)
        while True:
            reply = await self._receive(child)
            if reply[0] != "progress":
                return reply
            if reporter is not None:
                reporter(reply[1], reply[2])

    async def _receive(self, child: _Child) -> Any:
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fd = child.conn.fileno()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        if not child.conn.poll():
            loop.add_reader(fd, on_readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
        try:
            return child.conn.recv()
        except (EOFError, OSError) as exc:
            child.proc.join(1)
            code = child.proc.exitcode
            raise HandlerCrashed(f"handler process died (exit code {code})") from exc

    def close(self) -> None:
        """Kill every idle child (busy ones are killed by their cancelled calls)."""
        for child in self._idle:
            with contextlib.suppress(Exception):
                child.kill()
        self._idle.clear()


def _unpack(reply: Any) -> Any:
    tag = reply[0]
    if tag == "ok":
        return reply[1]
    if tag == "failed":
        raise TaskFailed(reply[2], reply[1])
    logger.debug("handler raised {}: {}", reply[1], reply[2])
    raise TaskFailed(reply[2], reply[1])
