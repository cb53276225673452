"""A kind with a cluster-wide limit declared in code, for ``--handlers limited_handlers``.

Kept apart from ``sample_handlers``: every worker that loads a limited kind declares
and consumes the kind's single-active-consumer queue, which the other tests do not need.
"""

from __future__ import annotations

import asyncio

from leveret import TaskContext, task


@task("paced", max_running=2, max_starts_per_s=5)
async def paced(ctx: TaskContext, payload: float) -> float:
    """Sleep `payload` seconds; at most 2 run at once and 5 start per second, cluster-wide."""
    await asyncio.sleep(float(payload))
    return float(payload)
