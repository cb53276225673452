"""A handler that blocks the worker's event loop (``--handlers blocking_handlers``).

The mistake it makes is a common one: blocking code inside ``async def``. While it
sleeps, nothing else on that worker runs, heartbeats included; the worker's loop
monitor is expected to interrupt it (``leveret.worker.loopwatch``).
"""

from __future__ import annotations

import time

from leveret import TaskContext, task


@task("sleep_on_loop")
async def sleep_on_loop(ctx: TaskContext, payload: float) -> float:
    """Sleep `payload` seconds with ``time.sleep``, on the event loop."""
    time.sleep(float(payload))  # noqa: ASYNC251 - the point of this handler
    return float(payload)
