"""`leveret demo` runs seed 004's main program and prints its final statistics, and
those statistics add up: every submitted task ended, exactly the planned failures
failed, the rest completed, and the scheduling showcase went as its notes say."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from leveret.cli.demo import CANCELLED, SHOWCASE, sample_tasks

pytestmark = pytest.mark.broker

TASKS = 80
WORKERS = 2


def table_rows(out: str, title: str) -> list[list[str]]:
    """The body rows of the rich table printed under `title` (cells stripped)."""
    rows: list[list[str]] = []
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("└"):
            break  # the table's bottom border
        if stripped.startswith("│") and stripped.endswith("│"):
            rows.append([cell.strip() for cell in stripped.strip("│").split("│")])
    return rows


def planned_outcomes() -> dict[str, int]:
    """What the demo's reproducible task mix must end as: `fail` tasks and tasks with a
    timeout shorter than their sleep fail, the one cancelled by the demo is cancelled,
    everything else completes."""
    tasks = sample_tasks(TASKS, "http://unused", random.Random(4))
    failed = sum(1 for t in tasks if t["kind"] == "fail" or "timeout_s" in t)
    cancelled = sum(1 for t in tasks if t.get("id") == CANCELLED)
    return {"completed": TASKS - failed - cancelled, "failed": failed, "cancelled": cancelled}


def test_demo_runs_and_its_statistics_add_up(amqp_url: str) -> None:
    env = {**os.environ, "LEVERET_AMQP_URL": amqp_url, "COLUMNS": "160"}
    args = ["demo", "--workers", str(WORKERS), "--tasks", str(TASKS)]
    proc = subprocess.run(
        [sys.executable, "-m", "leveret.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    stats = dict(table_rows(out, "Final statistics"))
    for needle in ("wall time", "throughput", "latency p50", "latency p95", "latency p99"):
        assert needle in stats, f"{needle!r} missing from the final statistics:\n{out[-3000:]}"
    counts = {
        status: int(stats[status])
        for status in (
            "pending",
            "blocked",
            "delayed",
            "running",
            "retrying",
            "completed",
            "failed",
            "cancelled",
            "rejected",
        )
    }
    assert int(stats["total submitted"]) == TASKS
    assert sum(counts.values()) == TASKS, counts
    planned = planned_outcomes()
    assert planned["completed"] >= 0.8 * TASKS  # the mix is mostly work that succeeds
    assert {s: counts[s] for s in planned} == planned, counts
    assert float(stats["throughput"].split()[0]) > 0

    # Per worker: the recorded results of the two workers are the totals above.
    workers = {row[0]: row for row in table_rows(out, "Workers")}
    assert sorted(workers) == [f"demo-w{i}" for i in range(1, WORKERS + 1)]
    assert sum(int(row[1]) for row in workers.values()) == counts["completed"]
    assert sum(int(row[2]) for row in workers.values()) == counts["failed"]

    # The showcase: the DAG, the urgent, delayed and gpu tasks completed (the gpu one on
    # the only worker with the capability); the doomed one was cancelled.
    showcase = {row[0]: row for row in table_rows(out, "Scheduling showcase")}
    assert sorted(showcase) == sorted(t["id"] for t in SHOWCASE)
    for task_id, (_, status, started, worker, _note) in showcase.items():
        assert status == ("cancelled" if task_id == CANCELLED else "completed"), showcase[task_id]
        if task_id != CANCELLED:
            assert started != "-" and worker.startswith("demo-w"), showcase[task_id]
    assert showcase["render"][3] == f"demo-w{WORKERS}"
    # Start times are HH:MM:SS.mmm of one day: string order is time order.
    assert showcase["dag-join"][2] >= max(showcase["dag-left"][2], showcase["dag-right"][2])
    assert min(showcase["dag-left"][2], showcase["dag-right"][2]) >= showcase["dag-fetch"][2]
