"""``leveret bench``: what leveret costs over a bare aio-pika round trip, measured.

(a) raw: a producer publishes persistent tasks (confirms awaited in windows) to a
    quorum queue; 2 consumer processes consume, publish a persistent result (with
    confirm) to a result quorum queue, then ack; a collector drains the results.
(b) leveret end to end, tasks accepted -> result recorded by the tracker, through
    the AMQP intake (client.submit_many) and through HTTP batches, with 2 worker
    processes, all on the same broker.
(c) what a producer that waits sees: the same flood through the AMQP intake with
    `reply_to` (latency = publish -> the one terminal reply, which the tracker sends
    once it recorded the outcome), and one task at a time (`Client.run`, light load).

Prints tasks/s, the ratio (b)/(a), latency percentiles, CPU seconds per 1000
tasks and peak RSS per process, and appends them to docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import psutil
from rich.console import Console
from rich.table import Table

from leveret.amqp import connect, open_channel
from leveret.cli.procs import Cluster, wait_for
from leveret.client import Client
from leveret.contracts import SubmitTask
from leveret.runtime import loop_factory
from leveret.settings import CommonSettings
from leveret.topology import Topology, delete_namespace

WINDOW = 500
PATHS = ("raw", "amqp", "http", "reply", "single")
#: Tasks the one-at-a-time path runs (a light-load latency, not a throughput).
SINGLE_TASKS = 200


@dataclass
class Run:
    """The figures of one measured path."""

    name: str
    tasks: int
    seconds: float
    latencies_s: list[float]
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Tasks per second."""
        return self.tasks / self.seconds

    def percentile(self, p: float) -> float:
        """Latency percentile `p` (0-100), seconds."""
        if not self.latencies_s:
            return float("nan")
        qs = statistics.quantiles(self.latencies_s, n=100, method="inclusive")
        return qs[min(int(p) - 1, 98)]


class Sampler:
    """Samples CPU time and peak RSS of named processes while a run goes on."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.cpu0 = {n: _cpu(p) for n, p in self.procs.items()}
        self.peak = dict.fromkeys(self.procs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            for name, proc in self.procs.items():
                with suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        """Sample for the duration of the block."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def cpu(self) -> dict[str, float]:
        """CPU seconds used by each process since the sampler was made."""
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = _cpu(proc) - self.cpu0[name]
            except psutil.Error:
                out[name] = float("nan")
        return out


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _broker_pid() -> int | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "beam.smp" and "rabbit" in " ".join(proc.info["cmdline"] or []):
            return int(proc.pid)
    return None


# --- (a) raw aio-pika ------------------------------------------------------------------------


def _raw_consumer(url: str, tasks_q: str, results_q: str, prefetch: int, ready: Any) -> None:
    async def main() -> None:
        connection = await aio_pika.connect_robust(url)
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(tasks_q)
        exchange = channel.default_exchange

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                results_q,
            )
            await message.ack()

        await queue.consume(on_message)
        ready.set()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())


async def _raw(url: str, n: int, workers: int, prefetch: int) -> tuple[Run, list[int]]:
    tag = uuid.uuid4().hex[:6]
    tasks_q, results_q = f"bench.raw.{tag}.tasks", f"bench.raw.{tag}.results"
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel(publisher_confirms=True)
    for name in (tasks_q, results_q):
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    ctx = multiprocessing.get_context("spawn")
    ready = [ctx.Event() for _ in range(workers)]
    procs = [
        ctx.Process(target=_raw_consumer, args=(url, tasks_q, results_q, prefetch, ev), daemon=True)
        for ev in ready
    ]
    for p in procs:
        p.start()
    for ev in ready:
        await asyncio.to_thread(ev.wait, 60)
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    rchannel = await connection.channel()
    await rchannel.set_qos(prefetch_count=1000)
    results = await rchannel.get_queue(results_q)

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        latencies.append(time.perf_counter() - sent[message.body])
        await message.ack()
        if len(latencies) >= n:
            done.set()

    await results.consume(on_result)
    sampler = Sampler({f"raw-worker-{i}": p.pid or 0 for i, p in enumerate(procs, 1)})
    with sampler.running():
        start = time.perf_counter()
        for base in range(0, n, WINDOW):
            batch = []
            for i in range(base, min(n, base + WINDOW)):
                body = f"task-{i}".encode()
                sent[body] = time.perf_counter()
                batch.append(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        tasks_q,
                    )
                )
            await asyncio.gather(*batch)
        await asyncio.wait_for(done.wait(), 600)
        seconds = time.perf_counter() - start
    run = Run("raw aio-pika", n, seconds, latencies, sampler.cpu(), sampler.peak)
    for p in procs:
        p.kill()
    for name in (tasks_q, results_q):
        await channel.queue_delete(name)
    await connection.close()
    return run, [p.pid or 0 for p in procs]


# --- (b) leveret -------------------------------------------------------------------------------


def _completed(cluster: Cluster) -> int:
    stats = httpx.get(f"{cluster.tracker_url}/stats", timeout=10).json()
    return int(stats["counts"]["completed"]) + int(stats["counts"]["failed"])


def _latencies(cluster: Cluster, limit: int) -> list[float]:
    """submitted_at -> finished_at of recorded tasks, read back from the tracker."""
    out: list[float] = []
    cursor = None
    while len(out) < limit:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(f"{cluster.tracker_url}/tasks", params=params, timeout=30).json()
        for t in page["tasks"]:
            if t.get("submitted_at") and t.get("finished_at"):
                a = datetime.fromisoformat(t["submitted_at"])
                b = datetime.fromisoformat(t["finished_at"])
                out.append((b - a).total_seconds())
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return out


async def _submit_amqp(url: str, namespace: str, n: int) -> None:
    async with Client(url, namespace=namespace) as client:
        for base in range(0, n, WINDOW):
            tasks = [SubmitTask(kind="echo", payload=i) for i in range(base, min(n, base + WINDOW))]
            await client.submit_many(tasks)


async def _submit_waiting(url: str, namespace: str, n: int) -> list[float]:
    """The flood, each task with `reply_to`: publish -> terminal reply, per task."""
    async with Client(url, namespace=namespace) as client:
        sent: dict[str, float] = {}
        waits = []
        for base in range(0, n, WINDOW):
            tasks = [SubmitTask(kind="echo", payload=i) for i in range(base, min(n, base + WINDOW))]
            t0 = time.perf_counter()
            for task_id in await client.submit_many(tasks, wait=True):
                sent[task_id] = t0
                waits.append(task_id)

        async def one(task_id: str) -> float:
            await client.result(task_id, timeout_s=900)
            return time.perf_counter() - sent[task_id]

        return list(await asyncio.gather(*(one(t) for t in waits)))


async def _one_at_a_time(url: str, namespace: str, n: int) -> list[float]:
    """`Client.run` n times in a row: the round trip a lone producer waits for."""
    async with Client(url, namespace=namespace) as client:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await client.run("echo", i, timeout_s=60)
            out.append(time.perf_counter() - t0)
        return out


async def _submit_http(base_url: str, n: int) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        sem = asyncio.Semaphore(4)

        async def post(lo: int) -> None:
            async with sem:
                body = {
                    "tasks": [
                        {"kind": "echo", "payload": i} for i in range(lo, min(n, lo + WINDOW))
                    ]
                }
                (await http.post("/tasks/batch", json=body)).raise_for_status()

        await asyncio.gather(*(post(lo) for lo in range(0, n, WINDOW)))


def _leveret(
    name: str,
    url: str,
    n: int,
    workers: int,
    concurrency: int,
    submit: Callable[[Cluster], list[float] | None],
) -> Run:
    """One leveret path; latencies are the ones `submit` measured, else read back."""
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="leveret-bench-"))
    cluster = Cluster(namespace=namespace, amqp_url=url, workdir=workdir)
    try:
        pids = {
            "tracker": cluster.start_tracker().pid,
            "scheduler": cluster.start_scheduler().pid,
        }
        for i in range(1, workers + 1):
            pids[f"worker-{i}"] = cluster.start_worker(
                f"bench-w{i}", "--concurrency", str(concurrency)
            ).pid
        sampler = Sampler(pids)
        with sampler.running():
            start = time.perf_counter()
            measured = submit(cluster)
            wait_for(lambda: _completed(cluster) >= n, 900, f"{n} results", interval_s=0.1)
            seconds = time.perf_counter() - start
        latencies = measured if measured is not None else _latencies(cluster, n)
        return Run(name, n, seconds, latencies, sampler.cpu(), sampler.peak)
    finally:
        cluster.stop_all()
        asyncio.run(_drop(url, namespace))


async def _drop(url: str, namespace: str) -> None:
    connection = await connect(url, "leveret-bench-cleanup", connect_timeout_s=10)
    async with connection:
        channel = await open_channel(connection)
        await delete_namespace(channel, Topology(namespace), ["default"])


# --- report ------------------------------------------------------------------------------------


def _table(runs: list[Run], raw: Run) -> Table:
    table = Table(title="leveret bench")
    for col in ("path", "tasks", "tasks/s", "vs raw", "p50 ms", "p95 ms", "p99 ms", "CPU s/1000"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for run in runs:
        table.add_row(
            run.name,
            str(run.tasks),
            f"{run.rate:.0f}",
            f"{run.rate / raw.rate:.2f}",
            f"{run.percentile(50) * 1000:.1f}",
            f"{run.percentile(95) * 1000:.1f}",
            f"{run.percentile(99) * 1000:.1f}",
            f"{1000 * sum(run.cpu_s.values()) / run.tasks:.2f}",
        )
    return table


def _markdown(runs: list[Run], raw: Run, workers: int, concurrency: int) -> str:
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.node()}",
        "",
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{workers} workers x concurrency {concurrency}, echo tasks, quorum queues.",
        "",
        "| path | tasks | tasks/s | vs raw | p50 ms | p95 ms | p99 ms | CPU s per 1000 tasks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.tasks} | {run.rate:.0f} | {run.rate / raw.rate:.2f} | "
            f"{run.percentile(50) * 1000:.1f} | {run.percentile(95) * 1000:.1f} | "
            f"{run.percentile(99) * 1000:.1f} | {1000 * sum(run.cpu_s.values()) / run.tasks:.2f} |"
        )
    lines += ["", "CPU seconds per 1000 tasks and peak RSS, per process:", ""]
    for run in runs:
        parts = [
            f"{name} {1000 * cpu / run.tasks:.2f} s / {run.peak_rss.get(name, 0) / 2**20:.0f} MiB"
            for name, cpu in sorted(run.cpu_s.items())
        ]
        lines.append(f"- {run.name}: " + ", ".join(parts))
    return "\n".join(lines) + "\n\n"


def run_bench(
    *, tasks: int, workers: int, concurrency: int, out: Path, paths: tuple[str, ...] = PATHS
) -> int:
    """Run the chosen paths (raw, amqp, http) and report; return 0."""
    console = Console()
    url = CommonSettings().amqp_url
    broker = _broker_pid()
    broker_cpu0 = _cpu(psutil.Process(broker)) if broker else None
    console.print(f"bench: {tasks} tasks per path, {workers} workers x {concurrency}")
    runs: list[Run] = []
    if "raw" in paths:
        raw, _ = asyncio.run(_raw(url, tasks, workers, concurrency))
        runs.append(raw)
    submitters: dict[str, tuple[str, int, Callable[[Cluster], list[float] | None]]] = {
        "amqp": (
            "leveret via AMQP intake",
            tasks,
            lambda c: asyncio.run(_submit_amqp(url, c.namespace, tasks)),
        ),
        "http": (
            "leveret via HTTP batches",
            tasks,
            lambda c: asyncio.run(_submit_http(c.scheduler_url, tasks)),
        ),
        "reply": (
            "leveret via AMQP, producer waits for replies",
            tasks,
            lambda c: asyncio.run(_submit_waiting(url, c.namespace, tasks)),
        ),
        "single": (
            "leveret one task at a time (Client.run)",
            SINGLE_TASKS,
            lambda c: asyncio.run(_one_at_a_time(url, c.namespace, SINGLE_TASKS)),
        ),
    }
    for key, (name, n, submit) in submitters.items():
        if key in paths:
            runs.append(_leveret(name, url, n, workers, concurrency, submit))
    for run in runs:
        console.print(f"{run.name}: {run.rate:.0f} tasks/s")
    baseline = runs[0]
    console.print(_table(runs, baseline))
    if broker and broker_cpu0 is not None:
        used = _cpu(psutil.Process(broker)) - broker_cpu0
        console.print(f"broker CPU over the whole bench: {used:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Benchmarks\n\nAppended by `leveret bench`; newest last.\n\n")
    with out.open("a") as f:
        f.write(_markdown(runs, baseline, workers, concurrency))
    console.print(f"appended to {out}")
    return 0
