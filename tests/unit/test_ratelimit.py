"""The HTTP submission rate limiter (pure logic, fake clock)."""

from __future__ import annotations

import math

from leveret.scheduler.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 20, clock=clock)
    assert all(limiter.take("a") == 0 for _ in range(20))
    wait = limiter.take("a")
    assert 0.09 < wait <= 0.1
    clock.now += 0.5  # five tokens back
    assert all(limiter.take("a") == 0 for _ in range(5))
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0  # other clients are not affected


def test_batches_cost_one_token_per_task() -> None:
    clock = Clock()
    limiter = RateLimiter(100, 500, clock=clock)
    assert limiter.take("a", 500) == 0
    assert math.isclose(limiter.take("a", 100), 1.0)
    assert limiter.take("a", 501) == math.inf


def test_disabled_and_forgetting() -> None:
    assert RateLimiter(0, 10).take("x", 1e9) == 0
    clock = Clock()
    limiter = RateLimiter(1, 1, clock=clock, max_clients=2)
    limiter.take("a")
    limiter.take("b")
    clock.now += 5
    limiter.take("c")  # a and b have refilled and are forgotten
    assert len(limiter._buckets) == 1
