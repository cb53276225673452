"""``leveret demo``: seed 004's main program on a real broker.

Starts a tracker, a scheduler and N worker processes under a namespace of their
own, submits a mix of sample tasks (some fail on purpose, some time out), shows
live progress, and ends with final statistics. Everything it declared on the
broker and wrote on disk is removed afterwards.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.settings import CommonSettings
from leveret.topology import Topology, delete_namespace

#: Scheduling features on show: a small DAG, urgent work, a delayed task, a task only
#: the worker with the `gpu` capability may run, and a long task that the demo
#: cancels while it waits or runs.
GPU = "gpu"
SHOWCASE: list[dict[str, Any]] = [
    {"id": "dag-fetch", "kind": "sleep", "payload": 0.3},
    {"id": "dag-left", "kind": "echo", "payload": "left", "depends_on": ["dag-fetch"]},
    {"id": "dag-right", "kind": "echo", "payload": "right", "depends_on": ["dag-fetch"]},
    {"id": "dag-join", "kind": "echo", "payload": "join", "depends_on": ["dag-left", "dag-right"]},
    {"id": "urgent", "kind": "echo", "payload": "priority 9", "priority": 9},
    {"id": "later", "kind": "echo", "payload": "after 1 s", "delay_s": 1},
    {"id": "render", "kind": "echo", "payload": "needs a gpu", "requires": [GPU]},
    {"id": "doomed", "kind": "sleep", "payload": 60},
]
CANCELLED = "doomed"


def sample_tasks(count: int, tracker_url: str, rng: random.Random) -> list[dict[str, Any]]:
    """A reproducible mix: the showcase, then echo, sleep, http, planned failures and
    timeouts (`count` tasks in all)."""
    tasks: list[dict[str, Any]] = [dict(t) for t in SHOWCASE[:count]]
    for i in range(len(tasks), count):
        roll = rng.random()
        if roll < 0.35:
            tasks.append({"kind": "echo", "payload": {"n": i, "text": f"sample {i}"}})
        elif roll < 0.80:
            tasks.append({"kind": "sleep", "payload": round(rng.uniform(0.02, 0.4), 3)})
        elif roll < 0.90:
            tasks.append({"kind": "http", "payload": f"{tracker_url}/healthz"})
        elif roll < 0.95:
            tasks.append({"kind": "fail", "payload": f"planned failure #{i}"})
        else:
            tasks.append({"kind": "sleep", "payload": 2.0, "timeout_s": 0.2})
    return tasks


def _stats(cluster: Cluster) -> dict[str, Any]:
    return httpx.get(f"{cluster.tracker_url}/stats", timeout=10).json()  # type: ignore[no-any-return]


def _terminal(stats: dict[str, Any]) -> int:
    counts = stats["counts"]
    return int(sum(counts.get(s, 0) for s in ("completed", "failed", "cancelled", "rejected")))


def _watch(console: Console, cluster: Cluster, total: int, timeout_s: float) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]tasks"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout_s
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("run", total=total, detail="")
        while True:
            stats = _stats(cluster)
            counts = stats["counts"]
            detail = " ".join(f"{k}={v}" for k, v in counts.items() if v)
            progress.update(bar, completed=_terminal(stats), detail=detail)
            if _terminal(stats) >= total or time.monotonic() > deadline:
                return stats
            time.sleep(0.25)


def _report(
    console: Console,
    stats: dict[str, Any],
    workers: list[dict[str, Any]],
    wall_s: float,
    total: int,
) -> None:
    counts = stats["counts"]
    summary = Table(title="Final statistics", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for status, n in counts.items():
        summary.add_row(status, str(n))
    summary.add_row("total submitted", str(total))
    summary.add_row("wall time", f"{wall_s:.2f} s")
    summary.add_row("throughput", f"{_terminal(stats) / wall_s:.1f} tasks/s")
    latency = stats.get("latency_s") or {}
    for p in ("p50", "p95", "p99"):
        value = latency.get(p)
        summary.add_row(f"latency {p}", "-" if value is None else f"{value * 1000:.0f} ms")
    console.print(summary)

    per_worker = Table(title="Workers")
    for col in ("worker", "completed", "failed", "busy", "efficiency"):
        per_worker.add_column(col, justify="right" if col != "worker" else "left")
    for w in sorted(workers, key=lambda w: str(w["id"])):
        capacity = wall_s * max(int(w.get("concurrency") or 1), 1)
        busy = float(w.get("busy_s") or 0.0)
        per_worker.add_row(
            str(w["id"]),
            str(w.get("completed", 0)),
            str(w.get("failed", 0)),
            f"{busy:.2f} s",
            f"{100 * busy / capacity:.1f} %",
        )
    console.print(per_worker)


def _showcase(console: Console, cluster: Cluster) -> None:
    """How the scheduling showcase went: status, start order, worker."""
    table = Table(title="Scheduling showcase")
    for col in ("task", "status", "started", "worker", "note"):
        table.add_column(col)
    notes = {
        "dag-join": "ran after dag-left and dag-right",
        "urgent": "priority 9: overtook the backlog",
        "later": "delay_s=1: held by the scheduler",
        "render": f"requires {GPU}: only the last worker has it",
        CANCELLED: "cancelled by the demo",
    }
    for item in SHOWCASE:
        r = httpx.get(f"{cluster.tracker_url}/tasks/{item['id']}", timeout=10)
        if r.status_code != 200:
            continue
        t = r.json()
        started = (t.get("started_at") or "-")[11:23]
        table.add_row(
            item["id"], t["status"], started, str(t.get("worker") or "-"), notes.get(item["id"], "")
        )
    console.print(table)


async def _cleanup_broker(url: str, namespace: str) -> None:
    connection = await connect(url, "leveret-demo-cleanup", connect_timeout_s=10)
    async with connection:
        channel = await connection.channel()
        await delete_namespace(channel, Topology(namespace), ["default"], requirement_sets=[[GPU]])


def run_demo(*, workers: int, tasks: int, concurrency: int, timeout_s: float = 600.0) -> int:
    """Run the demo; return the exit code (0 when every task reached a final status)."""
    console = Console()
    settings = CommonSettings()
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="leveret-demo-"))
    cluster = Cluster(namespace=namespace, amqp_url=settings.amqp_url, workdir=workdir)
    console.print(
        f"[bold]leveret demo[/]: namespace {namespace}, {workers} workers x {concurrency}"
    )
    try:
        cluster.start_tracker()
        cluster.start_scheduler()
        for i in range(1, workers + 1):
            gpu = ["--capability", GPU] if i == workers else []
            # Its `http` tasks fetch the tracker's /healthz, on loopback: allow it.
            allow = {"LEVERET_HTTP_ALLOW": "127.0.0.1/32"}
            cluster.start_worker(f"demo-w{i}", "--concurrency", str(concurrency), *gpu, env=allow)
        batch = sample_tasks(tasks, cluster.tracker_url, random.Random(4))
        started = time.monotonic()
        for start in range(0, len(batch), 500):
            r = httpx.post(
                f"{cluster.scheduler_url}/tasks/batch",
                json={"tasks": batch[start : start + 500]},
                timeout=60,
            )
            r.raise_for_status()
        console.print(f"submitted {tasks} tasks in {time.monotonic() - started:.2f} s")
        if any(t.get("id") == CANCELLED for t in batch):
            httpx.delete(f"{cluster.scheduler_url}/tasks/{CANCELLED}", timeout=10)
            console.print(f"cancelled task {CANCELLED!r} (a 60 s sleep)")
        stats = _watch(console, cluster, tasks, timeout_s)
        wall = time.monotonic() - started
        worker_list = httpx.get(f"{cluster.tracker_url}/workers", timeout=10).json()["workers"]
        _report(console, stats, worker_list, wall, tasks)
        _showcase(console, cluster)
        done = _terminal(stats) >= tasks
    finally:
        codes = cluster.stop_all()
        asyncio.run(_cleanup_broker(settings.amqp_url, namespace))
        shutil.rmtree(workdir, ignore_errors=True)
    clean = all(code == 0 for code in codes.values())
    if not clean:
        console.print(f"[red]some services did not stop cleanly: {codes}")
    if not done:
        console.print("[red]not every task reached a final status in time")
    return 0 if done and clean else 1
