"""Handlers that produce too much: loaded into real workers with ``--handlers
oversized_handlers`` by the size-bound tests."""

from __future__ import annotations

import asyncio

from leveret import TaskContext, task
from leveret.contracts import MAX_RESULT_BYTES


@task("huge_result", max_retries=3)
async def huge_result(ctx: TaskContext, payload: object) -> str:
    """A result bigger than any result message may be (retries allowed, but useless)."""
    return "x" * MAX_RESULT_BYTES


@task("long_error")
async def long_error(ctx: TaskContext, payload: int) -> None:
    """Fails with an error message of `payload` characters."""
    raise ValueError("e" * int(payload))


@task("surrogate_error")
async def surrogate_error(ctx: TaskContext, payload: object) -> None:
    """Fails with text JSON cannot carry (a lone surrogate, as in an undecodable file name)."""
    raise FileNotFoundError("no such file: 'caf\udce9.txt'")


@task("surrogate_result")
async def surrogate_result(ctx: TaskContext, payload: object) -> str:
    """Returns text JSON cannot carry."""
    return "caf\udce9"


@task("noisy_progress")
async def noisy_progress(ctx: TaskContext, payload: object) -> str:
    """Reports one long progress message holding a lone surrogate, then finishes."""
    ctx.progress(0.5, "p" * 5000 + "\udce9")
    await asyncio.sleep(0.5)  # long enough for the worker's 200 ms report interval
    return "done"
