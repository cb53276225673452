"""``leveret bench``: what leveret costs over a bare aio-pika round trip, measured.

Flood (every path sends N tasks as fast as confirms allow):

- raw: a producer publishes persistent tasks (confirms awaited in windows) to a quorum
  queue; 2 consumer processes consume, publish a persistent result (confirmed) to a
  result quorum queue, then ack; the producer's process collects the results.
- amqp: a *foreign* aio-pika producer (no leveret code) publishes to
  ``<ns>.submit`` with ``reply_to``; done when every reply came back and the tracker
  recorded every task. Scheduler, tracker and 2 workers run as separate processes.
- http: the same cluster fed ``POST /tasks/batch`` of 500.

Light load (a paced 50 tasks/s for 10 s): publish -> result for raw, publish -> reply
for leveret over AMQP.

Peers (``--paths ...,peers``): Celery at its fastest and with leveret's guarantees,
and Dramatiq, run by ``deploy/bench/peers.py`` in a venv of its own
(``.venv-peers``, from ``deploy/bench/requirements.txt``) on the same broker.

Prints tasks/s, the ratio to raw, latency percentiles, CPU seconds per 1000 tasks
and peak RSS per process, the issue-12 goals met or not, and appends it all to
docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import psutil
from rich.console import Console
from rich.table import Table

from leveret.amqp import connect, open_channel
from leveret.cli.procs import Cluster, wait_for
from leveret.runtime import loop_factory
from leveret.settings import CommonSettings
from leveret.topology import Topology, delete_namespace

WINDOW = 500
PATHS = ("raw", "amqp", "http", "raw-light", "light", "peers")
#: The light load: tasks per second, for this many seconds.
LIGHT_RATE = 50.0
LIGHT_SECONDS = 10


@dataclass
class Run:
    """The figures of one measured path."""

    name: str
    tasks: int
    seconds: float
    latencies_s: list[float]
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    light: bool = False  # a paced load: compared by latency, not rate
    #: Latency percentiles (ms) measured elsewhere, when `latencies_s` is not known.
    given_ms: dict[int, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Tasks per second."""
        return self.tasks / self.seconds

    def percentile(self, p: float) -> float:
        """Latency percentile `p` (0-100), seconds."""
        if int(p) in self.given_ms:
            return self.given_ms[int(p)] / 1000
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


async def _raw(
    url: str, n: int, workers: int, prefetch: int, *, rate: float | None = None
) -> tuple[Run, list[int]]:
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

    def publish(i: int) -> Any:
        body = f"task-{i}".encode()
        sent[body] = time.perf_counter()
        return channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), tasks_q
        )

    await results.consume(on_result)
    sampler = Sampler({f"raw-worker-{i}": p.pid or 0 for i, p in enumerate(procs, 1)})
    name = "raw aio-pika" if rate is None else f"raw aio-pika, {rate:g}/s"
    with sampler.running():
        start = time.perf_counter()
        await _send(publish, n, rate)
        await asyncio.wait_for(done.wait(), 600)
        seconds = time.perf_counter() - start
    run = Run(name, n, seconds, latencies, sampler.cpu(), sampler.peak)
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


async def _foreign_producer(
    url: str, namespace: str, n: int, *, rate: float | None = None
) -> list[float]:
    """Publish `n` echo submissions to ``<ns>.submit`` with plain aio-pika, each with
    `reply_to` and its own correlation id, and wait for every terminal reply; the
    latencies publish -> reply. `rate`: paced at that many per second, else a flood
    with confirms awaited in windows of :data:`WINDOW`."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(f"{namespace}.submit")
        sent: dict[str, float] = {}
        latencies: list[float] = []
        done = asyncio.Event()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            t0 = sent.pop(message.correlation_id or "", None)
            if t0 is not None:
                latencies.append(time.perf_counter() - t0)
                if len(latencies) >= n:
                    done.set()

        await replies.consume(on_reply, no_ack=True)

        def publish(i: int) -> Any:
            corr = f"b{i}"
            body = json.dumps({"kind": "echo", "payload": i}).encode()
            sent[corr] = time.perf_counter()
            return exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=corr,
                    reply_to=replies.name,
                ),
                "default",
            )

        await _send(publish, n, rate)
        await asyncio.wait_for(done.wait(), 900)
        return latencies


async def _send(publish: Callable[[int], Any], n: int, rate: float | None) -> None:
    """Call `publish(i)` for i in 0..n-1 and await every confirm: paced at `rate` per
    second (the next one is never held back by a confirm), or in windows."""
    if rate is None:
        for base in range(0, n, WINDOW):
            await asyncio.gather(*(publish(i) for i in range(base, min(n, base + WINDOW))))
        return
    start = time.perf_counter()
    pending = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the pace itself
        pending.append(asyncio.ensure_future(publish(i)))
    await asyncio.gather(*pending)


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


# --- peers -------------------------------------------------------------------------------------

PEERS_DIR = Path("deploy/bench")
PEERS_VENV = Path(".venv-peers")


def _peers(url: str, tasks: int, console: Console) -> dict[str, Run]:
    """Celery and Dramatiq measured by ``deploy/bench/peers.py`` in a venv of their own
    (made from its pinned requirements on first use); empty if the script is not here."""
    script = PEERS_DIR / "peers.py"
    if not script.exists():
        console.print(f"peers: {script} not found (run from the repository root); skipped")
        return {}
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        console.print(f"peers: making {PEERS_VENV} from {PEERS_DIR / 'requirements.txt'}")
        made = subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=False)
        if made.returncode == 0:
            requirements = str(PEERS_DIR / "requirements.txt")
            made = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "-r", requirements], check=False
            )
        if made.returncode != 0:
            console.print(f"peers: could not make {PEERS_VENV}; skipped")
            return {}
    done = subprocess.run(
        [str(python), str(script), "--amqp-url", url, "--tasks", str(tasks), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        console.print(f"peers: no result (exit {done.returncode}): {done.stderr[-2000:]}")
        return {}
    report = json.loads(lines[-1])
    for path, error in report.get("errors", {}).items():
        console.print(f"peers: {path} failed: {error}")
    runs: dict[str, Run] = {}
    for path, r in report["results"].items():
        latency = r["latency_ms"]
        runs[path] = Run(
            f"{path} ({'; '.join(r.get('notes', [])[:1]) or r['setup']})"[:80],
            int(r["tasks"]),
            float(r["seconds"]),
            [],
            {f"{path}-{k}": float(v) for k, v in r["cpu_s"].items()},
            {f"{path}-{k}": int(v) for k, v in r["peak_rss_bytes"].items()},
            light=r["mode"] == "light",
            given_ms={50: latency["p50"], 95: latency["p95"], 99: latency["p99"]},
        )
    return runs


# --- memory under a backlog -------------------------------------------------------------------


@dataclass
class Backlog:
    """Resident memory of scheduler and tracker as a backlog builds (no worker runs)."""

    points: list[tuple[int, dict[str, int]]]  # (tasks queued, RSS per process)

    def growth(self) -> dict[str, float]:
        """RSS at the last point against the first, per process (1.0: flat)."""
        (_, first), (_, last) = self.points[0], self.points[-1]
        return {name: last[name] / first[name] for name in first}


def _backlog(url: str, n: int, checkpoints: tuple[int, ...] = (10_000,)) -> Backlog:
    """Submit `n` tasks over HTTP with no worker running and read the resident memory
    of scheduler and tracker once each checkpoint (and `n`) is queued."""
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(
        namespace=namespace, amqp_url=url, workdir=Path(tempfile.mkdtemp(prefix="leveret-bench-"))
    )
    try:
        procs = {
            "tracker": psutil.Process(cluster.start_tracker().pid),
            "scheduler": psutil.Process(cluster.start_scheduler().pid),
        }
        points: list[tuple[int, dict[str, int]]] = []
        done = 0
        for mark in sorted({*(c for c in checkpoints if c < n), n}):
            asyncio.run(_submit_http(cluster.scheduler_url, mark - done))
            done = mark
            # the tracker has recorded every acceptance: its memory is measured after it
            wait_for(partial(_recorded, cluster, done), 3600, f"{done} recorded", interval_s=1)
            points.append((done, {name: p.memory_info().rss for name, p in procs.items()}))
        return Backlog(points)
    finally:
        cluster.stop_all()
        asyncio.run(_drop(url, namespace))


def _recorded(cluster: Cluster, n: int) -> bool:
    """Whether the tracker holds at least `n` tasks."""
    stats = httpx.get(f"{cluster.tracker_url}/stats", timeout=30).json()
    return int(stats["total"]) >= n


# --- report ------------------------------------------------------------------------------------


def _ratio(run: Run, runs: dict[str, Run]) -> str:
    """A flood's rate against raw's, a light load's p50 against raw's light p50."""
    if run.light:
        raw = runs.get("raw-light")
        if raw is None or run is raw:
            return "1.00" if run is raw else "—"
        return f"{run.percentile(50) / raw.percentile(50):.2f}x p50"
    raw = runs.get("raw")
    return f"{run.rate / raw.rate:.2f}" if raw else "—"


def _rows(runs: dict[str, Run]) -> list[tuple[str, ...]]:
    return [
        (
            run.name,
            str(run.tasks),
            f"{run.rate:.0f}",
            _ratio(run, runs),
            f"{run.percentile(50) * 1000:.1f}",
            f"{run.percentile(95) * 1000:.1f}",
            f"{run.percentile(99) * 1000:.1f}",
            f"{1000 * sum(run.cpu_s.values()) / run.tasks:.2f}",
        )
        for run in runs.values()
    ]


COLUMNS = ("path", "tasks", "tasks/s", "vs raw", "p50 ms", "p95 ms", "p99 ms", "CPU s/1000")


def _table(runs: dict[str, Run]) -> Table:
    table = Table(title="leveret bench")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col != "path" else "left")
    for row in _rows(runs):
        table.add_row(*row)
    return table


@dataclass
class Goal:
    """One of issue 12's goals, as measured in this run."""

    what: str
    measured: str
    target: str
    met: bool


def _goals(runs: dict[str, Run]) -> list[Goal]:
    """The goals this run's paths can judge."""
    goals: list[Goal] = []
    raw, amqp, http = runs.get("raw"), runs.get("amqp"), runs.get("http")
    if raw and amqp:
        r = amqp.rate / raw.rate
        goals.append(Goal("AMQP intake vs raw round trip", f"{r:.2f}x", ">= 0.70x", r >= 0.7))
        mine = sum(amqp.cpu_s.values()) / amqp.tasks
        theirs = sum(raw.cpu_s.values()) / raw.tasks
        goals.append(
            Goal(
                "CPU per task, scheduler + tracker + workers vs raw workers (AMQP)",
                f"{mine * 1000:.2f} vs {theirs * 1000:.2f} ms ({mine / theirs:.2f}x)",
                "<= 2x",
                mine <= 2 * theirs,
            )
        )
    if raw and http:
        r = http.rate / raw.rate
        goals.append(Goal("HTTP batches vs raw round trip", f"{r:.2f}x", ">= 0.90x", r >= 0.9))
    raw_light, light = runs.get("raw-light"), runs.get("light")
    if raw_light and light:
        p50, raw50 = light.percentile(50), raw_light.percentile(50)
        goals.append(
            Goal(
                "light load p50 vs raw p50",
                f"{p50 * 1000:.1f} vs {raw50 * 1000:.1f} ms",
                f"<= {3 * raw50 * 1000:.1f} ms (3x)",
                p50 <= 3 * raw50,
            )
        )
        p99, raw99 = light.percentile(99), raw_light.percentile(99)
        bound = max(0.025, 2 * raw99)
        goals.append(
            Goal(
                "light load p99",
                f"{p99 * 1000:.1f} ms (raw {raw99 * 1000:.1f})",
                f"<= {bound * 1000:.1f} ms (max(25 ms, 2x raw))",
                p99 <= bound,
            )
        )
    for key, factor in (("celery-fast", 1.0), ("celery-safe", 2.0)):
        peer = runs.get(key)
        if amqp and peer:
            r = amqp.rate / peer.rate
            goals.append(
                Goal(f"AMQP intake vs {peer.name}", f"{r:.2f}x", f">= {factor:.1f}x", r >= factor)
            )
    return goals


def _backlog_goals(backlog: Backlog) -> list[Goal]:
    (first_n, first), (last_n, last) = backlog.points[0], backlog.points[-1]
    return [
        Goal(
            f"RSS of the {name}, {first_n} -> {last_n} tasks queued",
            f"{first[name] / 2**20:.0f} -> {last[name] / 2**20:.0f} MiB ({growth - 1:+.0%})",
            "flat (+-10 %)",
            abs(growth - 1) <= 0.10,
        )
        for name, growth in backlog.growth().items()
    ]


def _markdown(runs: dict[str, Run], goals: list[Goal], workers: int, concurrency: int) -> str:
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — {platform.node()}",
        "",
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{workers} workers x concurrency {concurrency}, echo tasks, quorum queues; "
        f"light load: {LIGHT_RATE:g} tasks/s for {LIGHT_SECONDS} s.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(runs)] if runs else ["(none)"]
    lines += ["", "CPU seconds per 1000 tasks and peak RSS, per process:", ""]
    for run in runs.values():
        parts = [
            f"{name} {1000 * cpu / run.tasks:.2f} s / {run.peak_rss.get(name, 0) / 2**20:.0f} MiB"
            for name, cpu in sorted(run.cpu_s.items())
        ]
        lines.append(f"- {run.name}: " + ", ".join(parts))
    if goals:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [
            f"| {g.what} | {g.measured} | {g.target} | {'yes' if g.met else 'no'} |" for g in goals
        ]
    return "\n".join(lines) + "\n\n"


def run_bench(
    *,
    tasks: int,
    workers: int,
    concurrency: int,
    out: Path,
    paths: tuple[str, ...] = PATHS,
    backlog: int = 0,
) -> int:
    """Run the chosen paths (and, if `backlog`, the memory check with that many tasks
    queued) and report; return 0."""
    console = Console()
    url = CommonSettings().amqp_url
    broker = _broker_pid()
    broker_cpu0 = _cpu(psutil.Process(broker)) if broker else None
    light_n = int(LIGHT_RATE * LIGHT_SECONDS)
    console.print(f"bench: {tasks} tasks per path, {workers} workers x {concurrency}")
    runs: dict[str, Run] = {}
    if "raw" in paths:
        runs["raw"], _ = asyncio.run(_raw(url, tasks, workers, concurrency))
    if "raw-light" in paths:
        runs["raw-light"], _ = asyncio.run(
            _raw(url, light_n, workers, concurrency, rate=LIGHT_RATE)
        )
        runs["raw-light"].light = True
    submitters: dict[str, tuple[str, int, Callable[[Cluster], list[float] | None]]] = {
        "amqp": (
            "leveret via AMQP intake, reply_to",
            tasks,
            lambda c: asyncio.run(_foreign_producer(url, c.namespace, tasks)),
        ),
        "http": (
            "leveret via HTTP batches",
            tasks,
            lambda c: asyncio.run(_submit_http(c.scheduler_url, tasks)),
        ),
        "light": (
            f"leveret via AMQP, {LIGHT_RATE:g}/s",
            light_n,
            lambda c: asyncio.run(_foreign_producer(url, c.namespace, light_n, rate=LIGHT_RATE)),
        ),
    }
    for key, (name, n, submit) in submitters.items():
        if key in paths:
            runs[key] = _leveret(name, url, n, workers, concurrency, submit)
            runs[key].light = key == "light"
            console.print(f"{key}: done")
    if "peers" in paths:
        runs.update(_peers(url, tasks, console))
    if runs:
        console.print(_table(runs))
    goals = _goals(runs)
    if backlog:
        console.print(f"backlog: {backlog} tasks queued, no worker running")
        goals += _backlog_goals(_backlog(url, backlog))
    for g in goals:
        mark = "[green]met[/]" if g.met else "[red]not met[/]"
        console.print(f"{mark} {g.what}: {g.measured} (goal {g.target})")
    if broker and broker_cpu0 is not None:
        used = _cpu(psutil.Process(broker)) - broker_cpu0
        console.print(f"broker CPU over the whole bench: {used:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Benchmarks\n\nAppended by `leveret bench`; newest last.\n\n")
    with out.open("a") as f:
        f.write(_markdown(runs, goals, workers, concurrency))
    console.print(f"appended to {out}")
    return 0
