"""The built-in `shell` kind (off unless the worker runs with ``--shell``).

A command runs under ``/bin/sh -c`` with a clean environment: ``PATH`` (a fixed
safe default) plus only the variables ``LEVERET_SHELL_ENV`` names, passed through
from the worker's environment, so the broker URL and other secrets stay out
unless named. It runs in a process group of its own; on cancel, on timeout, and
when the shell exits leaving children behind, the whole group gets SIGTERM, then
SIGKILL after :data:`KILL_GRACE_S`. stdout and stderr are read as they come and
only their last :data:`OUTPUT_LIMIT` bytes each are kept, the cut marked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psutil

#: ``PATH`` for commands, unless ``LEVERET_SHELL_ENV`` names ``PATH`` itself.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Bytes kept of stdout and of stderr, each (the last ones).
OUTPUT_LIMIT = 64 * 1024
#: How long a process group has between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: How long output is still read once the command and its group have ended.
PIPE_CLOSE_WAIT_S = 1.0
_POLL_S = 0.02


def environment(names: Iterable[str], source: Mapping[str, str] | None = None) -> dict[str, str]:
    """A command's environment: a safe ``PATH`` plus the variables `names` picks from
    `source` (the worker's environment by default)."""
    source = os.environ if source is None else source
    env = {"PATH": SAFE_PATH}
    env.update({name: source[name] for name in names if name in source})
    return env


@dataclass
class Tail:
    """The last `limit` bytes of a stream, and how many it carried in all."""

    limit: int
    total: int = 0
    kept: bytearray = field(default_factory=bytearray)

    def add(self, chunk: bytes) -> None:
        """Count `chunk` and keep at most the last `limit` bytes."""
        self.total += len(chunk)
        self.kept += chunk
        if len(self.kept) > self.limit:
            del self.kept[: len(self.kept) - self.limit]

    def text(self) -> str:
        """What was kept, decoded, led by a marker if anything was dropped."""
        text = self.kept.decode("utf-8", "replace")
        dropped = self.total - len(self.kept)
        if dropped:
            return f"[truncated: the first {dropped} of {self.total} bytes dropped]\n{text}"
        return text


@dataclass(frozen=True)
class Ran:
    """How a command ended."""

    exit_code: int
    stdout: str
    stderr: str


class _Collector(asyncio.SubprocessProtocol):
    """Keeps the tails of a command's output as it arrives; notes its exit and the end
    of its pipes."""

    def __init__(self, limit: int) -> None:
        self.tails = {1: Tail(limit), 2: Tail(limit)}
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.tails[fd].add(data.encode() if isinstance(data, str) else data)

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()  # the process exited and every pipe is closed


async def run(
    command: str,
    env: Mapping[str, str],
    *,
    limit: int = OUTPUT_LIMIT,
    grace_s: float = KILL_GRACE_S,
) -> Ran:
    """Run `command` with ``/bin/sh -c`` in its own process group; its children do not
    outlive it, nor a cancellation of this coroutine."""
    loop = asyncio.get_running_loop()
    transport, collector = await loop.subprocess_exec(
        lambda: _Collector(limit),
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        start_new_session=True,  # its own process group, id = its pid
    )
    pgid = transport.get_pid()
    try:
        await collector.exited.wait()
        await end_group(pgid, grace_s)  # children left behind would hold the pipes open
        # Only a process that left the group (setsid) can still hold them: stop reading.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.closed.wait(), PIPE_CLOSE_WAIT_S)
    except BaseException:  # cancelled: the task, its timeout, the worker stopping
        await end_group(pgid, grace_s)
        raise
    finally:
        transport.close()
    code = transport.get_returncode()
    assert code is not None
    return Ran(code, collector.tails[1].text(), collector.tails[2].text())


async def end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM process group `pgid`, wait up to `grace_s` for its processes to end, then
    SIGKILL whatever is left (also if this wait is itself cancelled)."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    try:
        members = _members(pgid)
        for _ in range(max(1, round(grace_s / _POLL_S))):  # a group has no event to await
            if not any(_running(p) for p in members):
                return
            await asyncio.sleep(_POLL_S)
    finally:
        _signal_group(pgid, signal.SIGKILL)


def _members(pgid: int) -> list[psutil.Process]:
    """The processes of group `pgid` now (zombies included)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def _running(proc: psutil.Process) -> bool:
    """Whether `proc` still runs: an ended child that nobody reaped yet (a zombie, as
    under a container without an init) does not count."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False if it has no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its credentials: nothing more to do
        return False
    return True
