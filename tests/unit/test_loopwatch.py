"""The loop monitor on a real event loop: an async handler that blocks it (a blocking
call, a pure-Python loop) fails with `blocked_event_loop` within about the limit; a
loop that is only short of CPU, a blocker that is not an attempt, a loop in another
thread and a disabled monitor are left alone; a handler that swallows the interrupt
or never sees it makes the worker exit. Also: which failures are retried, and the
retry budget."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from leveret.contracts import TaskMessage, TaskStatus, utcnow
from leveret.errors import BlockedEventLoop
from leveret.handlers import Registry, TaskContext
from leveret.worker.execution import Executor, Outcome, failure, retry_delay_s
from leveret.worker.loopwatch import (
    EXIT_LOOP_BLOCKED,
    INTERRUPT,
    LoopMonitor,
    Probe,
    ThreadState,
    judge,
    proc_probe,
)

LIMIT_S = 0.3
#: Far above what the monitor needs (about 1.5 x the limit): catches a handler that
#: was not interrupted, whose blocking call lasts BLOCK_S.
BLOCK_S = 30.0
BOUND_S = 10.0


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """WARNING and ERROR lines logged during the test."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)


def _task(kind: str) -> TaskMessage:
    return TaskMessage(id=f"t-{kind}", kind=kind, submitted_at=utcnow())


def _ctx(task: TaskMessage) -> TaskContext:
    return TaskContext(
        task_id=task.id,
        kind=task.kind,
        pool="default",
        attempt=1,
        worker_id="w-test",
        submitted_at=task.submitted_at,
    )


async def _attempt(
    handler: Callable[[TaskContext, Any], Awaitable[Any]], monitor_args: dict[str, Any]
) -> tuple[Outcome, float, LoopMonitor]:
    """Run `handler` as the executor runs an attempt (its own asyncio task, named like
    the worker's), watched by a monitor that knows that task as the attempt."""
    registry = Registry()
    registry.register("h", handler)
    executor = Executor(registry, 1)
    task = _task("h")
    jobs: dict[str, asyncio.Task[Any]] = {}

    def attempt_of(job: asyncio.Task[Any] | None) -> str | None:
        return next((i for i, j in jobs.items() if j is job), None)

    monitor = LoopMonitor(LIMIT_S, blocker=attempt_of, **monitor_args)
    monitor.start()
    try:
        started = time.monotonic()
        job = asyncio.create_task(executor.run(task, _ctx(task)), name=f"attempt:{task.id}")
        jobs[task.id] = job
        outcome = await job
        return outcome, time.monotonic() - started, monitor
    finally:
        monitor.stop()
        executor.close()


async def sleeps_on_the_loop(ctx: TaskContext, payload: Any) -> str:
    time.sleep(BLOCK_S)  # noqa: ASYNC251 - the bug: a blocking call in an async handler
    return "slept"


async def spins_on_the_loop(ctx: TaskContext, payload: Any) -> int:
    n = 0
    end = time.monotonic() + BLOCK_S
    while time.monotonic() < end:  # pure Python, never awaits
        n += 1
    return n


def _assert_blocked(outcome: Outcome, took_s: float, monitor: LoopMonitor, call: str) -> None:
    assert outcome.status is TaskStatus.FAILED
    assert outcome.error is not None
    assert outcome.error.type == "blocked_event_loop"
    message = outcome.error.message
    assert "test_loopwatch.py:" in message and call in message, message
    assert "asyncio.to_thread" in message
    assert took_s < BOUND_S
    assert monitor.interrupted == 1


async def test_a_blocking_call_is_interrupted(warnings: list[str]) -> None:
    outcome, took_s, monitor = await _attempt(sleeps_on_the_loop, {})
    _assert_blocked(outcome, took_s, monitor, "time.sleep(BLOCK_S)")
    assert any("blocked for" in w and "task t-h" in w for w in warnings), warnings
    # The warning holds the loop thread's stack down to the handler.
    assert any("in sleeps_on_the_loop" in w and "time.sleep" in w for w in warnings)


async def test_a_pure_python_loop_is_interrupted() -> None:
    outcome, took_s, monitor = await _attempt(spins_on_the_loop, {})
    _assert_blocked(outcome, took_s, monitor, "while time.monotonic() < end")


async def test_a_loop_only_short_of_cpu_is_left_alone(warnings: list[str]) -> None:
    """The thread sleeps for real, but the probe says "runnable" with the real CPU clock
    (which barely moves): that is a starved loop, not a blocked one."""

    def starved(thread: threading.Thread) -> Probe | None:
        real = proc_probe(thread)
        if real is None:
            pytest.skip("no /proc scheduler state on this platform")

        def probe() -> ThreadState | None:
            seen = real()
            return ThreadState("R", seen.cpu_s if seen else None)

        return probe

    async def sleeps_a_while(ctx: TaskContext, payload: Any) -> str:
        time.sleep(4 * LIMIT_S)  # noqa: ASYNC251
        return "slept"

    outcome, _, monitor = await _attempt(sleeps_a_while, {"probe": starved})
    assert outcome.status is TaskStatus.COMPLETED and outcome.value == "slept"
    assert monitor.interrupted == 0
    assert any("short of CPU" in w for w in warnings), warnings


async def test_a_disabled_monitor_does_nothing() -> None:
    before = signal.getsignal(INTERRUPT)
    monitor = LoopMonitor(0)
    monitor.start()
    try:
        assert signal.getsignal(INTERRUPT) == before
        time.sleep(4 * LIMIT_S)  # noqa: ASYNC251 - a blocked loop, unwatched
        await asyncio.sleep(0)
    finally:
        monitor.stop()
    assert monitor.interrupted == 0
    assert not any(t.name == "loop-monitor" for t in threading.enumerate())


async def test_a_blocker_that_is_not_an_attempt_is_only_reported(warnings: list[str]) -> None:
    monitor = LoopMonitor(LIMIT_S, blocker=lambda job: None)
    monitor.start()
    try:

        async def housekeeping() -> str:
            time.sleep(4 * LIMIT_S)  # noqa: ASYNC251
            return "done"

        assert await asyncio.create_task(housekeeping(), name="housekeeping") == "done"
        await asyncio.sleep(2 * LIMIT_S)  # the monitor sees the loop run again
    finally:
        monitor.stop()
    assert monitor.interrupted == 0
    assert any("by housekeeping, not an attempt" in w for w in warnings), warnings
    assert any("ran again after" in w for w in warnings), warnings


def test_a_loop_in_another_thread_is_only_reported(warnings: list[str]) -> None:
    """Signals reach the main thread only: a worker whose loop runs elsewhere (as in an
    embedding application) gets the warning, and its handler runs on."""
    result: list[Outcome] = []

    def run() -> None:
        async def main() -> None:
            outcome, _, monitor = await _attempt(sleeps_a_while, {})
            assert monitor.interrupted == 0
            result.append(outcome)

        async def sleeps_a_while(ctx: TaskContext, payload: Any) -> str:
            time.sleep(4 * LIMIT_S)  # noqa: ASYNC251
            return "slept"

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(BOUND_S)
    assert [o.status for o in result] == [TaskStatus.COMPLETED]
    assert any("blocked for" in w and "task t-h" in w for w in warnings), warnings


async def test_a_handler_that_swallows_the_interrupt_makes_the_worker_exit(
    warnings: list[str],
) -> None:
    exited: list[int] = []
    gone = threading.Event()

    def exit(code: int) -> None:  # instead of os._exit: end the handler
        exited.append(code)
        gone.set()

    async def stubborn(ctx: TaskContext, payload: Any) -> str:
        swallowed = 0
        while not gone.is_set():
            try:
                time.sleep(0.05)  # noqa: ASYNC251
            except BlockedEventLoop:
                swallowed += 1  # the wrong thing to do
        return f"swallowed {swallowed}"

    args = {"exit": exit, "escalate_after_s": 0.5}
    outcome, took_s, _ = await _attempt(stubborn, args)
    assert exited == [EXIT_LOOP_BLOCKED]
    assert outcome.value == "swallowed 1"
    assert took_s < BOUND_S
    escalation = [w for w in warnings if "still blocked" in w]
    assert escalation and "exiting with 75" in escalation[0], warnings
    assert "caught BlockedEventLoop" in escalation[0]


async def test_a_handler_deaf_to_the_interrupt_makes_the_worker_exit(
    warnings: list[str],
) -> None:
    """Like C code that never checks for signals: the interrupt is never handled."""
    exited: list[int] = []
    gone = threading.Event()

    def exit(code: int) -> None:
        exited.append(code)
        gone.set()

    async def deaf(ctx: TaskContext, payload: Any) -> str:
        signal.pthread_sigmask(signal.SIG_BLOCK, {INTERRUPT})
        try:
            while not gone.is_set():
                time.sleep(0.05)  # noqa: ASYNC251
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {INTERRUPT})
        return "deaf"

    _, took_s, _ = await _attempt(deaf, {"exit": exit, "escalate_after_s": 0.5})
    assert exited == [EXIT_LOOP_BLOCKED]
    assert took_s < BOUND_S
    assert any("still blocked" in w and "never handled" in w for w in warnings), warnings


def test_the_thread_state_decides_blocked_or_starved() -> None:
    limit = 1.0
    assert judge(ThreadState("S", 0.0), 0.0, 1.5, limit) is not None  # in a call
    assert judge(ThreadState("D", 0.0), 0.0, 1.5, limit) is not None  # in disk I/O
    assert judge(ThreadState("R", 1.4), 0.0, 1.5, limit) is not None  # busy
    assert judge(ThreadState("R", 10.1), 10.0, 1.5, limit) is None  # runnable, starved
    # Starved, but it has burnt a whole limit of CPU without reaching its timer.
    assert judge(ThreadState("R", 11.0), 10.0, 4.0, limit) is not None
    assert judge(ThreadState("T", 0.0), 0.0, 1.5, limit) is None  # stopped
    assert judge(None, 0.0, 1.5, limit) is not None  # no state: lag alone


# --- which failures are retried, and the retry budget (leveret.worker.execution) ----------


def test_a_blocked_loop_is_not_retried() -> None:
    task = _task("h").model_copy(update={"max_retries": 5})
    blocked = failure("blocked_event_loop", "blocked the loop")
    assert retry_delay_s(task, None, 1, blocked, random.Random(1)) is None
    assert retry_delay_s(task, None, 1, failure("boom", "x"), random.Random(1)) is not None


def test_attempts_handed_back_spend_no_retry() -> None:
    rng = random.Random(1)
    boom = failure("boom", "x")
    task = _task("h").model_copy(update={"max_retries": 1})
    # Attempt 1 failed: the one retry is left. Attempt 2 failed: none is.
    assert retry_delay_s(task, None, 1, boom, rng) is not None
    assert retry_delay_s(task, None, 2, boom, rng) is None
    # Attempts 1-3 were handed back by graceful stops: attempt 4 is the first failure,
    # retried after the first backoff step, and attempt 5 spends the one retry.
    returned = task.model_copy(update={"returned": 3})
    retry = retry_delay_s(returned, None, 4, boom, rng)
    assert retry is not None and retry[0] == 1
    assert retry_delay_s(returned, None, 5, boom, rng) is None
