"""Cluster-wide limits per kind, enforced through the broker.

A limited kind has a work queue of its own per pool, declared with
``x-single-active-consumer``: every worker offering the kind consumes it, and
the broker lets exactly one of them receive at a time. That election is the
distributed lock: it needs no extra service, and when the active worker dies
(its connection drops) the broker hands the queue, and the unacked tasks, to
the next one. The active worker takes at most `max_running` deliveries (its
channel's prefetch) and starts them no faster than `max_starts_per_s` (a token
bucket), so the limits hold for the whole cluster, not per worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from leveret.contracts import KindLimit
from leveret.errors import ConfigError
from leveret.handlers import Registry
from leveret.settings import WorkerSettings


def parse_limits(specs: Iterable[str]) -> dict[str, KindLimit]:
    """``kind:running=5,rate=10`` (either part optional) to limits by kind."""
    limits: dict[str, KindLimit] = {}
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        if not sep or not kind or not rest:
            raise ConfigError(f"invalid limit {spec!r}: want kind:running=N,rate=R")
        values: dict[str, float] = {}
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if key.strip() not in ("running", "rate") or not eq:
                raise ConfigError(f"invalid limit {spec!r}: unknown part {part!r}")
            try:
                values[key.strip()] = float(value)
            except ValueError as exc:
                raise ConfigError(f"invalid limit {spec!r}: {value!r} is not a number") from exc
        running = values.get("running")
        limits[kind] = KindLimit(
            max_running=int(running) if running is not None else None,
            max_starts_per_s=values.get("rate"),
        )
    return limits


def kind_limits(registry: Registry, settings: WorkerSettings) -> dict[str, KindLimit]:
    """The limits this worker enforces: its handlers' own, overridden by ``--limit``."""
    limits = {
        h.kind: KindLimit(max_running=h.max_running, max_starts_per_s=h.max_starts_per_s)
        for h in registry.handlers.values()
        if h.advertised and (h.max_running or h.max_starts_per_s)
    }
    for kind, limit in parse_limits(settings.limits).items():
        if registry.get(kind) is None:
            raise ConfigError(f"--limit names kind {kind!r}, which this worker does not run")
        limits[kind] = limit
    return limits


class StartPacer:
    """A token bucket (burst 1) spacing starts at most `rate_per_s` apart."""

    def __init__(self, rate_per_s: float) -> None:
        self.interval = 1.0 / rate_per_s
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when the next start is allowed."""
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            if delay > 0:
                await asyncio.sleep(delay)  # pacing itself, not synchronisation
                now = time.monotonic()
            self._next = max(now, self._next) + self.interval
