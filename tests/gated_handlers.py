"""A handler that runs until the test releases it (``--handlers gated_handlers``).

Tests that hit a worker while it holds a task use it, so that the task cannot
finish before the fault however slow the machine is: it returns only once the
file named by its payload exists.
"""

from __future__ import annotations

import asyncio
import os

from leveret import TaskContext, task

#: How often a gated task looks for its release file.
POLL_S = 0.02


@task("gated")
async def gated(ctx: TaskContext, payload: str) -> str:
    """Wait until the file `payload` exists, then return the id of the worker that ran it
    (async, on the worker's event loop: a stopping worker can cancel it)."""
    # The release comes from another process: a file to poll, no event to await.
    while not await asyncio.to_thread(os.path.exists, payload):  # noqa: ASYNC110
        await asyncio.sleep(POLL_S)
    return ctx.worker_id
