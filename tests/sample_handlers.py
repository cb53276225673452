"""Handlers the tests load into real workers with ``--handlers sample_handlers``."""

from __future__ import annotations

import os
import time

from leveret import TaskContext, TaskFailed, task


@task("block")
def block(ctx: TaskContext, payload: float) -> float:
    """Sync and blocking; ignores cancellation (only killing its process ends it early)."""
    time.sleep(float(payload))
    return float(payload)


@task("burn")
def burn(ctx: TaskContext, payload: float) -> int:
    """CPU-bound for `payload` seconds."""
    end = time.monotonic() + float(payload)
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@task("whoami")
def whoami(ctx: TaskContext, payload: object) -> dict:
    """Report the attempt context (sync, runs in a child process)."""
    return {"attempt": ctx.attempt, "key": ctx.idempotency_key, "pid": os.getpid()}


@task("picky")
def picky(ctx: TaskContext, payload: object) -> None:
    raise TaskFailed("not today", type="picky")


@task("die")
async def die(ctx: TaskContext, payload: object) -> None:
    """Kills the whole worker process (a poison task)."""
    os._exit(17)


@task("die_in_child")
def die_in_child(ctx: TaskContext, payload: object) -> None:
    """Kills the child process that runs it."""
    os._exit(9)


@task("flaky", max_retries=3)
async def flaky(ctx: TaskContext, payload: int) -> int:
    """Fails its first `payload` attempts, then succeeds; retried by default (3 times)."""
    if ctx.attempt <= int(payload):
        raise TaskFailed(f"attempt {ctx.attempt} fails on purpose", type="flaky")
    return ctx.attempt


@task("steps")
async def steps(ctx: TaskContext, payload: int) -> str:
    """Reports progress `payload` times, 0.3 s apart (async)."""
    import asyncio

    for i in range(1, int(payload) + 1):
        ctx.progress(i / int(payload), f"step {i} of {payload}")
        await asyncio.sleep(0.3)
    return "done"


@task("steps_sync")
def steps_sync(ctx: TaskContext, payload: int) -> str:
    """Reports progress `payload` times, 0.3 s apart (sync, in a child process)."""
    for i in range(1, int(payload) + 1):
        ctx.progress(i / int(payload), f"step {i} of {payload}")
        time.sleep(0.3)
    return "done"


@task("slow_first")
def slow_first(ctx: TaskContext, payload: float) -> int:
    """Sync: blocks `payload` seconds on attempt 1 (to run into its timeout), then
    answers at once; returns the attempt that answered."""
    if ctx.attempt == 1:
        time.sleep(float(payload))
    return ctx.attempt


@task("not_json")
async def not_json(ctx: TaskContext, payload: object) -> object:
    """Async: returns a set, which no JSON result can hold."""
    return {1, 2, 3}


@task("not_sendable")
def not_sendable(ctx: TaskContext, payload: object) -> object:
    """Sync: returns a generator, which cannot even leave its child process."""
    return (i for i in range(3))
