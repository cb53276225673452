"""`leveret demo` runs seed 004's main program and prints its final statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.broker


def test_demo_runs_and_prints_statistics(amqp_url: str) -> None:
    env = {**os.environ, "LEVERET_AMQP_URL": amqp_url, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "leveret.cli", "demo", "--workers", "2", "--tasks", "80"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for needle in (
        "Final statistics",
        "completed",
        "failed",
        "wall time",
        "throughput",
        "latency p50",
        "latency p95",
        "latency p99",
        "demo-w1",
        "demo-w2",
        "efficiency",
    ):
        assert needle in out, f"{needle!r} missing from the demo output:\n{out[-3000:]}"
