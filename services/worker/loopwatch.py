"""A worker that notices its own event loop is blocked, and unblocks it.

Async handlers run on the worker's event loop. One that calls blocking code
(``time.sleep``, a synchronous HTTP client, a long pure-Python loop) stops the loop
and with it the heartbeats: the tracker fences the worker, the broker hands the
task to the next worker, which blocks too, and the task ends ``poison`` though no
worker crashed. So the worker watches its loop itself:

- **Measure.** The loop stamps the time every quarter of the limit (a
  ``call_later`` chain); a daemon thread checks every eighth. When the stamp is
  overdue by more than ``LEVERET_LOOP_BLOCK_LIMIT_S`` (1 s), the loop is blocked.
- **Name it.** The thread reads the loop's current asyncio task
  (``asyncio.current_task(loop)``), maps it to the attempt it runs
  (``Worker.attempt_of``), and logs a warning with the task id, the
  ``file:line`` of the innermost handler frame and the loop thread's stack.
- **Act.** If the blocker is an attempt and the loop runs in the main thread, the
  thread sends that thread ``SIGUSR2``. Its Python handler runs in the main thread
  between bytecodes (it interrupts ``time.sleep``, socket calls, pure-Python
  loops), checks that the loop is still blocked by that same attempt, inside the
  handler call, and raises :class:`~leveret.errors.BlockedEventLoop` there: the
  attempt fails ``blocked_event_loop`` (not retried) and the worker lives on,
  never silent long enough to be fenced.
- **Escalate.** If the loop is still blocked :data:`ESCALATE_AFTER_S` after the
  interrupt (the handler swallowed the exception, or C code ignores signals), the
  thread logs the stack and exits the process with :data:`EXIT_LOOP_BLOCKED`: the
  broker requeues its deliveries at once, and a supervisor restarts it.

Not every late loop is blocked: on a machine short of CPU a runnable loop just
waits for a core. On Linux the thread reads the loop thread's scheduler state
(``/proc/self/task/<tid>/stat``) and CPU clock, and acts only when the thread
sleeps in a call (state S/D while its timer is overdue) or used most of a core
since the loop last ran (or a whole limit's worth of CPU, however slowly);
runnable with little CPU is *starved*, and only noted.
The thread also acts only when the same asyncio task was current at every check
of the stall (a slow loop running many short steps is not one blocker).
Elsewhere it acts on lag alone.
"""

from __future__ import annotations

import asyncio
import linecache
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from loguru import logger

from leveret.errors import BlockedEventLoop
from leveret.worker.execution import Executor

#: Exit code of a worker whose loop stayed blocked after the interrupt (EX_TEMPFAIL:
#: restart it).
EXIT_LOOP_BLOCKED = 75
#: How long after the interrupt a still-blocked loop makes the worker exit. By then
#: the tracker has fenced a silent worker if it can (3 s by default); exiting ends a
#: process that would sit blocked under a dead registration, and requeues its
#: deliveries when nothing could fence it (no tracker, no management API).
ESCALATE_AFTER_S = 3.0
#: The signal that interrupts the main thread.
INTERRUPT = signal.SIGUSR2
#: A runnable loop thread that used at least this share of a core is busy, not starved.
BUSY_SHARE = 0.5

#: The executor's call of an async handler: frames above it are the handler's.
_HANDLER_CALL: CodeType = Executor._run_here.__code__
#: Code outside these directories is the handler author's own.
_LIBRARY_DIRS = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


@dataclass(frozen=True)
class ThreadState:
    """A thread as the scheduler sees it: state letter (R, S, D, …) and CPU time used."""

    state: str
    cpu_s: float | None


Probe = Callable[[], ThreadState | None]


def proc_probe(thread: threading.Thread) -> Probe | None:
    """Reads `thread`'s scheduler state and CPU clock on Linux; None elsewhere."""
    path = Path(f"/proc/self/task/{thread.native_id}/stat")
    if thread.ident is None or not path.exists():
        return None
    try:
        clock: int | None = time.pthread_getcpuclockid(thread.ident)
    except (AttributeError, OSError):
        clock = None

    def probe() -> ThreadState | None:
        try:
            # The read releases the GIL: a loop thread that only waited for it runs
            # again, so a busy thread reads R here, not S.
            raw = path.read_bytes()
        except OSError:
            return None
        state = raw[raw.rindex(b")") + 2 :].split(maxsplit=1)[0].decode()
        return ThreadState(state, time.clock_gettime(clock) if clock is not None else None)

    return probe


def judge(
    seen: ThreadState | None, cpu_at_tick: float, window_s: float, limit_s: float
) -> str | None:
    """Why the late loop's thread counts as blocked, or None when it is only starved.

    `window_s` is the time since the loop last ran its timer, `cpu_at_tick` the
    thread's CPU time then. A runnable thread is busy when it used most of a core
    since, or a whole limit's worth of CPU (however slowly it got it): a loop that is
    merely starved does not spend that much on one pass.
    """
    if seen is None:
        return "late (no scheduler state on this platform)"
    if seen.state in ("S", "D"):
        return f"waiting in a call (thread state {seen.state})"
    if seen.state != "R":
        return None  # stopped or traced: not the handler's doing
    if seen.cpu_s is None:
        return "late and runnable (no CPU clock)"
    used_s = seen.cpu_s - cpu_at_tick
    share = used_s / window_s if window_s > 0 else 0.0
    if share >= BUSY_SHARE or used_s >= limit_s:
        return f"busy ({used_s:.1f} s of CPU in {window_s:.1f} s)"
    return None


def handler_frames(top: FrameType | None) -> list[FrameType] | None:
    """The frames of the handler call at the top of a stack, innermost first; None when
    the stack is not inside an async handler the executor called."""
    frames: list[FrameType] = []
    frame = top
    while frame is not None:
        if frame.f_code is _HANDLER_CALL:
            return frames
        frames.append(frame)
        frame = frame.f_back
    return None


def where(top: FrameType | None) -> str:
    """``file:line in function: source`` of the innermost handler frame: the innermost
    frame of the handler's own code (not the standard library or an installed
    package), else the innermost frame."""
    frames = handler_frames(top) or ([top] if top is not None else [])
    if not frames:
        return "an unknown place"
    own = [f for f in frames if not f.f_code.co_filename.startswith(_LIBRARY_DIRS)]
    frame = (own or frames)[0]
    code = frame.f_code
    line = linecache.getline(code.co_filename, frame.f_lineno).split("  #")[0].strip()
    place = f"{Path(code.co_filename).name}:{frame.f_lineno} in {code.co_name}"
    return f"{place}: {line}" if line else place


NOT_HANDLED = "the interrupt was not handled yet"


@dataclass
class _Stall:
    """One stretch during which the loop did not tick."""

    since: float  # when the loop last ticked
    cpu_at_tick: float  # its thread's CPU time then
    job: asyncio.Task[Any] | None  # the asyncio task current at the first check
    steady: bool = True  # the same task was current at every check
    reported: bool = False
    starved_noted: bool = False
    task_id: str | None = None
    place: str = ""
    interrupted_at: float | None = None
    answer: str = NOT_HANDLED  # what the signal handler did


class LoopMonitor:
    """Watches one event loop from a daemon thread (see the module docstring).

    `blocker` maps the loop's current asyncio task to the id of the task whose
    attempt it is (``Worker.attempt_of``); only attempts are interrupted. `probe`
    makes the reader of the loop thread's state (tests fake it); `exit` ends the
    process on escalation.
    """

    def __init__(
        self,
        limit_s: float,
        *,
        blocker: Callable[[asyncio.Task[Any] | None], str | None] = lambda job: None,
        escalate_after_s: float = ESCALATE_AFTER_S,
        probe: Callable[[threading.Thread], Probe | None] = proc_probe,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.limit_s = limit_s
        self.escalate_after_s = escalate_after_s
        self.interrupted = 0  # attempts failed with blocked_event_loop
        self._blocker = blocker
        self._make_probe = probe
        self._exit = exit
        self._tick_s = limit_s / 4
        self._check_s = limit_s / 8
        self._last = (0.0, 0.0)  # (monotonic, thread CPU time) of the loop's last tick
        self._stall: _Stall | None = None
        self._pending: _Stall | None = None  # the stall the signal is about
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._probe: Probe | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._watcher: threading.Thread | None = None
        self._armed = False  # the signal handler is installed (main thread only)
        self._previous: Any = signal.SIG_DFL  # the signal's earlier handler, restored on stop

    def start(self) -> None:
        """Start watching the running loop (call it on the loop's thread). A limit of 0
        does nothing."""
        if self.limit_s <= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.current_thread()
        self._probe = self._make_probe(self._loop_thread)
        if self._loop_thread is threading.main_thread():
            # Not loop.add_signal_handler: that runs the handler on the loop, which is
            # exactly what is blocked.
            self._previous = signal.signal(INTERRUPT, self._on_signal)
            self._armed = True
        self._tick()
        self._watcher = threading.Thread(target=self._watch, name="loop-monitor", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching (on the loop's thread)."""
        self._stopping.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._watcher is not None:
            self._watcher.join(timeout=1.0)
        if self._armed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(INTERRUPT, previous)
            self._armed = False

    def _tick(self) -> None:
        assert self._loop is not None
        self._last = (time.monotonic(), time.thread_time())
        if not self._stopping.is_set():
            self._handle = self._loop.call_later(self._tick_s, self._tick)

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_s):
            try:
                self.check()
            except Exception:  # the monitor must never die of a bad read
                logger.exception("event loop monitor: check failed")

    def check(self) -> None:
        """One look at the loop (the watcher thread calls it every eighth of the limit)."""
        ticked_at, cpu_at_tick = self._last
        now = time.monotonic()
        stall = self._stall
        if stall is not None and stall.since != ticked_at:
            self._ended(stall, ticked_at)
            self._stall = stall = None
        late_s = now - ticked_at - self._tick_s  # how long the tick has waited to run
        if late_s < self._tick_s:
            return  # ordinary jitter: do not start sampling yet
        assert self._loop is not None
        job = asyncio.current_task(self._loop)
        if stall is None:
            stall = self._stall = _Stall(ticked_at, cpu_at_tick, job)
        elif job is not stall.job:
            stall.steady = False  # a slow loop running many steps, not one blocker
        if late_s > self.limit_s:
            self._blocked(stall, late_s, now)

    def _blocked(self, stall: _Stall, late_s: float, now: float) -> None:
        """The loop is late by more than the limit: report, interrupt, or escalate."""
        if stall.interrupted_at is not None:
            if now - stall.interrupted_at >= self.escalate_after_s:
                self._escalate(stall, late_s)
            return
        if not stall.reported:
            self._report(stall, late_s)
        if stall.task_id is None or not stall.steady or not self._armed:
            return
        seen = self._probe() if self._probe is not None else None
        verdict = judge(seen, stall.cpu_at_tick, now - stall.since, self.limit_s)
        if verdict is not None:
            self._interrupt(stall, verdict)
        elif not stall.starved_noted:
            stall.starved_noted = True
            logger.warning(
                "event loop {:.1f} s late while running task {}, but its thread is runnable "
                "and got little CPU: the machine is short of CPU; not interrupting",
                late_s,
                stall.task_id,
            )

    def _stack(self) -> tuple[FrameType | None, str]:
        """The loop thread's innermost frame and its formatted stack."""
        assert self._loop_thread is not None and self._loop_thread.ident is not None
        top = sys._current_frames().get(self._loop_thread.ident)
        return top, "".join(traceback.format_stack(top, limit=40)) if top else ""

    def _report(self, stall: _Stall, late_s: float) -> None:
        stall.reported = True
        try:
            stall.task_id = self._blocker(stall.job)
        except RuntimeError:  # the attempts changed while we looked: the loop moves
            stall.task_id = None
        top, stack = self._stack()
        stall.place = where(top)
        name = stall.job.get_name() if stall.job is not None else "no task (a callback)"
        blocker = f"task {stall.task_id}" if stall.task_id else f"{name}, not an attempt"
        logger.warning(
            "event loop blocked for {:.1f} s by {}, in {}; stack of the loop's thread:\n{}",
            late_s,
            blocker,
            stall.place,
            stack.rstrip(),
        )

    def _interrupt(self, stall: _Stall, verdict: str) -> None:
        assert self._loop_thread is not None and self._loop_thread.ident is not None
        logger.warning(
            "interrupting task {}: its async handler holds the event loop ({})",
            stall.task_id,
            verdict,
        )
        self._pending = stall
        stall.interrupted_at = time.monotonic()
        signal.pthread_kill(self._loop_thread.ident, INTERRUPT)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """In the main thread, between two bytecodes of whatever blocks the loop: raise
        BlockedEventLoop there if it still is that attempt's handler. (No logging here:
        the interrupted code may hold the logger's lock.)"""
        stall, self._pending = self._pending, None
        if stall is None:
            return
        assert self._loop is not None
        if self._last[0] != stall.since:
            stall.answer = "the loop had run again"
        elif asyncio.current_task(self._loop) is not stall.job:
            stall.answer = "another task held the loop by then"
        elif handler_frames(frame) is None:
            stall.answer = "the loop was blocked outside the handler call"
        else:
            stall.answer = "raised BlockedEventLoop in the handler"
            self.interrupted += 1
            blocked_s = time.monotonic() - stall.since - self._tick_s
            raise BlockedEventLoop(
                f"the async handler blocked the worker's event loop for {blocked_s:.1f} s "
                f"in {stall.place}; async handlers must not call blocking code: use "
                "asyncio.to_thread, or a sync handler (it runs in a child process)"
            )

    def _ended(self, stall: _Stall, ticked_at: float) -> None:
        if stall.reported:
            logger.warning(
                "event loop ran again after {:.1f} s blocked{}",
                ticked_at - stall.since - self._tick_s,
                f" (task {stall.task_id}: {stall.answer})" if stall.interrupted_at else "",
            )

    def _escalate(self, stall: _Stall, late_s: float) -> None:
        _, stack = self._stack()
        if stall.answer.startswith("raised"):
            why = "its handler caught BlockedEventLoop and went on blocking"
        elif stall.answer == NOT_HANDLED:
            why = "the interrupt was never handled: C code that does not check for signals?"
        else:
            why = stall.answer
        logger.error(
            "event loop still blocked {:.1f} s after interrupting task {} ({}); blocked "
            "for {:.1f} s in all; exiting with {} so the broker requeues this worker's "
            "tasks at once; stack of the loop's thread:\n{}",
            time.monotonic() - (stall.interrupted_at or 0.0),
            stall.task_id,
            why,
            late_s,
            EXIT_LOOP_BLOCKED,
            stack.rstrip(),
        )
        self._stopping.set()
        self._exit(EXIT_LOOP_BLOCKED)
