"""Per-client submission limits for the HTTP API: a token bucket per client.

A client is the API token it authenticated with (by the token's id) when API tokens
are configured, else its address; never a header the caller chooses. Each submitted
*task* costs one bucket token (a batch of 500 costs 500), so batching does not dodge
the limit. When a bucket is empty the API answers 429 with ``Retry-After`` (whole
seconds until enough tokens are back) and accepts nothing from that request.
Buckets live in the scheduler's memory: with several scheduler replicas each
enforces its own share. At most `max_clients` buckets are
kept: past it the least recently seen client is forgotten (and with it any full
bucket next in line: a full bucket carries no state), so one that comes back
starts with a full burst again.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets: `rate_per_s` tokens per second, up to `burst`, per client."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        self.rate = rate_per_s
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first

    @property
    def enabled(self) -> bool:
        """False when the rate is 0 (no limit)."""
        return self.rate > 0

    def take(self, client: str, cost: float = 1.0) -> float:
        """Take `cost` tokens; return 0 if granted, else seconds until they would be."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._make_room(now)
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(client)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if cost > self.burst:
            return math.inf  # can never be granted: the request is larger than the burst
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def _make_room(self, now: float) -> None:
        """Forget the least recently seen clients: one at least, and every full bucket
        after it up to the first that is not (O(1) a client, amortised)."""
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            full = bucket.tokens + (now - bucket.stamp) * self.rate >= self.burst
            if not full and len(self._buckets) < self.max_clients:
                return
            self._buckets.popitem(last=False)
