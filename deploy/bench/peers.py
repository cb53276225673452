"""Peer comparison for ``leveret bench``: Celery and Dramatiq on the same RabbitMQ.

Runs on its own interpreter with the pinned requirements of this directory (it does not
import leveret). Each set-up gets a fresh virtual host on the broker, created here and
deleted afterwards, and its own Redis key prefix, deleted afterwards too. Workers run as
subprocesses (two processes each) and are stopped at the end, also when a run fails.

Set-ups (see README.md for why each is the fair comparison):

- ``celery-fast``: Celery at its fastest: non-durable classic queue, transient messages,
  ``rpc://`` results, acknowledgement on receipt, large prefetch, prefork pool of 2.
- ``celery-safe``: Celery with leveret's guarantees: durable quorum queue, persistent
  messages with publisher confirms, late acknowledgement, rejection when a worker process
  is lost, results stored in Redis, prefork pool of 2.
- ``dramatiq``: Dramatiq's RabbitMQ broker (durable classic queues, persistent messages,
  here with confirms, acknowledgement after the actor ran), results in Redis, 2 processes.

Each set-up has a flood path (``--tasks`` echo tasks sent as fast as the producer can, the
producer waits for every result) and a light path (``<set-up>-light``: one task at a time,
paced at 50 tasks/s for 10 s).

With ``--json`` the last line of stdout is one JSON object with every figure; progress
goes to stderr. The exit status is 1 when a path failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
SETUPS = ("celery-fast", "celery-safe", "dramatiq")
PATHS = SETUPS + tuple(f"{s}-light" for s in SETUPS)
#: Pool processes (Celery prefork) or worker processes (Dramatiq) per set-up.
PROCESSES = 2
#: Threads per Dramatiq worker process (Dramatiq's default).
DRAMATIQ_THREADS = 8
#: The light path: one task at a time, paced at this rate for this long.
LIGHT_RATE = 50
LIGHT_SECONDS = 10
#: How often the Dramatiq flood looks for results while it sends, seconds.
LOOK_EVERY_S = 0.005
#: Deadlines, seconds.
READY_TIMEOUT = 120
RESULT_TIMEOUT = 600
STOP_TIMEOUT = 15

DESCRIPTIONS = {
    "celery-fast": (
        "Celery, non-durable classic queue, transient messages, rpc:// results, "
        "acks on receipt, prefetch 64 x 2, prefork 2"
    ),
    "celery-safe": (
        "Celery, durable quorum queue, persistent messages with publisher confirms, "
        "acks_late + reject_on_worker_lost, results in Redis, prefetch 64 x 2, prefork 2"
    ),
    "dramatiq": (
        f"Dramatiq, RabbitmqBroker (durable classic queue, persistent messages, confirms), "
        f"acks after the actor ran, results in Redis, {PROCESSES} processes x "
        f"{DRAMATIQ_THREADS} threads"
    ),
}
NOTES = {
    "dramatiq": [
        "Dramatiq's RabbitMQ broker declares durable classic queues and has no option for "
        "quorum queues, so this set-up runs on a classic queue.",
        "Dramatiq results are awaited in send order; a result is timed when the producer "
        "reaches it, so a result that overtook an earlier one counts a little late.",
    ],
}


def log(message: str) -> None:
    """Progress for the reader, on stderr so stdout stays for the results."""
    print(f"[peers {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- measurements -----------------------------------------------------------------------------


@dataclass
class Measured:
    """What the producer saw on one path."""

    tasks: int
    seconds: float
    latencies_s: list[float]
    #: First send to last send (the flood), when the producer's own pace matters.
    send_seconds: float | None = None


@dataclass
class Result:
    """The figures of one path, as they go into the JSON object."""

    path: str
    measured: Measured
    cpu_s: dict[str, float]
    peak_rss: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON form; see README.md for the keys."""
        m = self.measured
        setup = self.path.removesuffix("-light")
        return {
            "setup": DESCRIPTIONS[setup],
            "mode": "light" if self.path.endswith("-light") else "flood",
            "tasks": m.tasks,
            "seconds": round(m.seconds, 4),
            "send_seconds": None if m.send_seconds is None else round(m.send_seconds, 4),
            "tasks_per_s": round(m.tasks / m.seconds, 1),
            "latency_ms": {
                f"p{p}": round(percentile(m.latencies_s, p) * 1000, 2) for p in (50, 95, 99)
            },
            "cpu_s": {name: round(v, 3) for name, v in self.cpu_s.items()},
            "cpu_s_per_1000": round(1000 * sum(self.cpu_s.values()) / m.tasks, 3),
            "peak_rss_bytes": self.peak_rss,
            "notes": self.notes,
        }


def percentile(values: list[float], p: int) -> float:
    """Percentile `p` (1-99) of `values`, inclusive method, as ``leveret bench`` does."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


class TreeSampler:
    """CPU seconds and peak RSS of a worker's process tree (the parent and its children).

    Children are discovered on every sample, so pool processes that appear later count
    too. CPU is what each process used since the sampler started (a process born later
    counts from zero).
    """

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.start_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        for proc in self._tree():
            with suppress(psutil.Error):
                self.start_cpu[proc.pid] = _cpu(proc)
        self._sample()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self) -> None:
        for proc in self._tree():
            with suppress(psutil.Error):
                self.last_cpu[proc.pid] = _cpu(proc)
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    @contextmanager
    def running(self) -> Iterator[TreeSampler]:
        """Sample for the duration of the block, and once more at its end."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._sample()

    def _names(self) -> dict[int, str]:
        children = sorted(pid for pid in self.last_cpu if pid != self.root.pid)
        names = {self.root.pid: "main"}
        names.update({pid: f"child-{i}" for i, pid in enumerate(children, 1)})
        return names

    def cpu(self) -> dict[str, float]:
        """CPU seconds per process of the tree since the sampler started."""
        names = self._names()
        return {
            names[pid]: cpu - self.start_cpu.get(pid, 0.0) for pid, cpu in self.last_cpu.items()
        }

    def peak_rss(self) -> dict[str, int]:
        """Peak resident set size per process of the tree, bytes."""
        names = self._names()
        return {names[pid]: rss for pid, rss in self.peak.items()}


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


# --- broker and Redis housekeeping ----------------------------------------------------------


class Broker:
    """Creates and deletes virtual hosts, through the management API or rabbitmqctl."""

    def __init__(self, amqp_url: str, management_url: str) -> None:
        parts = urllib.parse.urlsplit(amqp_url)
        self.amqp = parts
        self.user = urllib.parse.unquote(parts.username or "guest")
        self.password = urllib.parse.unquote(parts.password or "guest")
        self.management_url = management_url.rstrip("/")

    def url_for(self, vhost: str) -> str:
        """The AMQP URL of `vhost` on the same broker with the same credentials."""
        return urllib.parse.urlunsplit(
            self.amqp._replace(path="/" + urllib.parse.quote(vhost, safe=""))
        )

    def _api(self, method: str, path: str, body: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.management_url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30):
            pass

    def create_vhost(self, vhost: str) -> None:
        """Create `vhost` and give the user full permissions on it."""
        quoted = urllib.parse.quote(vhost, safe="")
        try:
            self._api("PUT", f"/api/vhosts/{quoted}", {})
            self._api(
                "PUT",
                f"/api/permissions/{quoted}/{urllib.parse.quote(self.user, safe='')}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
        except (urllib.error.URLError, OSError) as exc:
            log(f"management API unavailable ({exc}); using rabbitmqctl")
            _ctl("add_vhost", vhost)
            _ctl("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        """Delete `vhost` with everything in it; its connections are closed by the broker."""
        try:
            self._api("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        except (urllib.error.URLError, OSError):
            _ctl("delete_vhost", vhost)


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def delete_redis_keys(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix`; return how many there were."""
    # Imported here so that the rest of this module loads without the peers' packages.
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


# --- workers --------------------------------------------------------------------------------


class Worker:
    """A worker started as a subprocess in its own session, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], logfile: Path) -> None:
        self.logfile = logfile
        self._log = logfile.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        """Raise if the worker exited, with the end of its log."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the worker's log."""
        self._log.flush()
        text = self.logfile.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """Ask the worker's process group to stop; kill it if it has not within a deadline."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"worker {self.proc.pid} did not stop in {STOP_TIMEOUT} s; killing it")
        # Pool processes that outlived their parent are in the same process group.
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        self._log.close()


def worker_env(amqp_url: str, redis_url: str, prefix: str, extra: dict[str, str]) -> dict[str, str]:
    """The environment both the worker and the producer module read their set-up from."""
    env = dict(os.environ)
    env.update(
        {
            "PEERS_AMQP_URL": amqp_url,
            "PEERS_REDIS_URL": redis_url,
            "PEERS_REDIS_PREFIX": prefix,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def load_module(name: str, env: dict[str, str]) -> ModuleType:
    """Import (or re-import) a peer module in this process under the set-up's environment."""
    for key, value in env.items():
        if key.startswith("PEERS_"):
            os.environ[key] = value
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


def deadline_loop(timeout_s: float, what: str, check: Callable[[], None]) -> Iterator[float]:
    """Yield the time left until `timeout_s` passed (then raise), calling `check` each turn."""
    end = time.monotonic() + timeout_s
    while True:
        check()
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: not done within {timeout_s} s")
        yield left


# --- Celery ---------------------------------------------------------------------------------


class CeleryPeer:
    """Producer side of a Celery set-up, with its worker."""

    def __init__(self, mode: str, env: dict[str, str], workdir: Path) -> None:
        self.module = load_module("peer_celery", env)
        self.app = self.module.app
        self.echo = self.module.echo
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "peer_celery",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(PROCESSES),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "--hostname",
            f"peers-{mode}@%h",
        ]
        self.worker = Worker(argv, env, workdir / f"celery-{mode}.log")

    def wait_ready(self) -> None:
        """Ready when a ping task sent to the worker's queue came back."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        result = self.echo.delay("ping")
        for left in deadline_loop(READY_TIMEOUT, "celery worker ready", self.worker.check_alive):
            with suppress(CeleryTimeout):
                if result.get(timeout=min(1.0, left)) == "ping":
                    return

    def _drain_nowait(self) -> None:
        """Let the result consumer take every reply already received, without waiting.

        Called after every send, so it first asks the socket whether anything came, which
        costs a system call. The Redis backend reads one pub/sub message per call (a result
        or the confirmation of a subscription); the rpc backend's AMQP connection reads one
        frame per call, and reads no more from the socket than that frame.
        """
        consumer = self.app.backend.result_consumer
        pubsub = getattr(consumer, "_pubsub", None)
        if pubsub is not None:
            while pubsub.connection is not None and pubsub.connection.can_read(timeout=0):
                consumer.drain_events(timeout=0)
            return
        connection = getattr(consumer, "_connection", None)
        if connection is None:
            return
        sock = connection.connection.sock
        while sock is not None and select.select([sock], [], [], 0)[0]:
            try:
                consumer.drain_events(timeout=0.001)
            except (TimeoutError, BlockingIOError):
                return

    def flood(self, n: int) -> Measured:
        """Send `n` echo tasks, then wait for every result; each is timed when it arrives."""
        sent: dict[str, float] = {}
        arrived: dict[str, float] = {}
        results = []

        def on_ready(result: Any) -> None:
            arrived.setdefault(result.id, time.perf_counter())

        start = sent_all = time.perf_counter()
        for i in range(n):
            # The result is awaited before the task is sent: the Redis backend learns of a
            # result through a subscription, and one that came before it would only be
            # seen (and timed) when the producer gets to it.
            result = self.echo.AsyncResult(str(uuid.uuid4()))
            result.then(on_ready)
            t0 = time.perf_counter()
            self.echo.apply_async((i,), task_id=result.id)
            sent[result.id] = t0
            sent_all = time.perf_counter()
            results.append(result)
            self._drain_nowait()
        end = time.monotonic() + RESULT_TIMEOUT
        for i, result in enumerate(results):
            value = result.get(timeout=max(1.0, end - time.monotonic()))
            if value != i:
                raise RuntimeError(f"task {i} returned {value!r}")
        last = max(arrived.values())
        if len(arrived) != n:
            raise RuntimeError(f"{n - len(arrived)} results were not seen arriving")
        latencies = [arrived[k] - sent[k] for k in sent]
        return Measured(n, last - start, latencies, sent_all - start)

    def light(self) -> Measured:
        """One task at a time, paced at LIGHT_RATE per second for LIGHT_SECONDS."""
        return paced(lambda i: self.echo.delay(i).get(timeout=60))

    def close(self) -> None:
        """Stop the worker and close the producer's connections."""
        self.worker.stop()
        with suppress(Exception):
            self.app.close()


# --- Dramatiq -------------------------------------------------------------------------------


class DramatiqPeer:
    """Producer side of the Dramatiq set-up, with its worker."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.module = load_module("peer_dramatiq", env)
        self.echo = self.module.echo
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "peer_dramatiq",
            "--processes",
            str(PROCESSES),
            "--threads",
            str(DRAMATIQ_THREADS),
        ]
        self.worker = Worker(argv, env, workdir / "dramatiq.log")

    def wait_ready(self) -> None:
        """Ready when a ping message came back with its result."""
        from dramatiq.results import ResultTimeout

        message = self.echo.send("ping")
        for left in deadline_loop(READY_TIMEOUT, "dramatiq worker ready", self.worker.check_alive):
            with suppress(ResultTimeout):
                if message.get_result(block=True, timeout=int(min(1.0, left) * 1000)) == "ping":
                    return

    def flood(self, n: int) -> Measured:
        """Send `n` echo messages, then wait for every result, in send order."""
        from dramatiq.results import ResultMissing

        sent: list[float] = []
        messages = []
        arrived: list[float] = []

        def take_ready() -> None:
            while len(arrived) < len(messages):
                try:
                    messages[len(arrived)].get_result(block=False)
                except ResultMissing:
                    return
                arrived.append(time.perf_counter())

        start = sent_all = looked = time.perf_counter()
        for i in range(n):
            sent.append(time.perf_counter())
            messages.append(self.echo.send(i))
            sent_all = time.perf_counter()
            if sent_all - looked >= LOOK_EVERY_S:
                take_ready()
                looked = time.perf_counter()
        end = time.monotonic() + RESULT_TIMEOUT
        for i in range(len(arrived), n):
            left_ms = int(max(1.0, end - time.monotonic()) * 1000)
            value = messages[i].get_result(block=True, timeout=left_ms)
            arrived.append(time.perf_counter())
            if value != i:
                raise RuntimeError(f"task {i} returned {value!r}")
        latencies = [b - a for a, b in zip(sent, arrived, strict=True)]
        return Measured(n, arrived[-1] - start, latencies, sent_all - start)

    def light(self) -> Measured:
        """One message at a time, paced at LIGHT_RATE per second for LIGHT_SECONDS."""
        return paced(lambda i: self.echo.send(i).get_result(block=True, timeout=60_000))

    def close(self) -> None:
        """Stop the worker and close the producer's broker connections."""
        self.worker.stop()
        with suppress(Exception):
            self.module.broker.close()


def paced(run_one: Callable[[int], object]) -> Measured:
    """Run one task at a time on a fixed schedule; a late task makes the next one go at once.

    The wait between tasks paces the load; it synchronises nothing.
    """
    n = LIGHT_RATE * LIGHT_SECONDS
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        slot = start + i / LIGHT_RATE
        now = time.perf_counter()
        if slot > now:
            time.sleep(slot - now)
        t0 = time.perf_counter()
        value = run_one(i)
        latencies.append(time.perf_counter() - t0)
        if value != i:
            raise RuntimeError(f"task {i} returned {value!r}")
    return Measured(n, time.perf_counter() - start, latencies)


# --- driver ---------------------------------------------------------------------------------


def run_setup(
    setup: str,
    modes: list[str],
    n: int,
    broker: Broker,
    redis_url: str,
    workdir: Path,
) -> list[Result]:
    """Run the flood and/or light path of one set-up on a fresh virtual host."""
    tag = uuid.uuid4().hex[:8]
    vhost = f"leveret-peers-{setup}-{tag}"
    prefix = f"leveret-peers-{tag}-"
    broker.create_vhost(vhost)
    peer: CeleryPeer | DramatiqPeer | None = None
    out = []
    try:
        if setup == "dramatiq":
            env = worker_env(broker.url_for(vhost), redis_url, prefix, {})
            peer = DramatiqPeer(env, workdir)
        else:
            mode = setup.removeprefix("celery-")
            env = worker_env(broker.url_for(vhost), redis_url, prefix, {"PEERS_CELERY_MODE": mode})
            peer = CeleryPeer(mode, env, workdir)
        log(f"{setup}: waiting for the worker on vhost {vhost}")
        peer.wait_ready()
        for mode in modes:
            path = setup if mode == "flood" else f"{setup}-light"
            log(f"{path}: running")
            sampler = TreeSampler(peer.worker.proc.pid)
            with sampler.running():
                measured = peer.flood(n) if mode == "flood" else peer.light()
            result = Result(path, measured, sampler.cpu(), sampler.peak_rss(), NOTES.get(setup, []))
            log(f"{path}: {measured.tasks / measured.seconds:.0f} tasks/s")
            out.append(result)
        return out
    except Exception:
        if peer is not None:
            log(f"{setup}: worker log tail:\n{peer.worker.log_tail()}")
        raise
    finally:
        if peer is not None:
            peer.close()
        broker.delete_vhost(vhost)
        delete_redis_keys(redis_url, prefix)


def versions() -> dict[str, str]:
    """Versions of the interpreter and of the peers' packages."""
    out = {"python": platform.python_version()}
    for name in ("celery", "kombu", "amqp", "dramatiq", "pika", "redis", "psutil"):
        with suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the results for a reader."""
    head = (
        f"{'path':<20} {'tasks':>6} {'tasks/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'CPU s/1000':>10}"
    )
    rows = [head, "-" * len(head)]
    for path, r in results.items():
        lat = r["latency_ms"]
        rows.append(
            f"{path:<20} {r['tasks']:>6} {r['tasks_per_s']:>8.0f} {lat['p50']:>8.1f} "
            f"{lat['p95']:>8.1f} {lat['p99']:>8.1f} {r['cpu_s_per_1000']:>10.2f}"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--management-url", default="http://127.0.0.1:15672")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per flood path")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated paths among {', '.join(PATHS)} (default: all)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on the last line of stdout"
    )
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths: {', '.join(unknown)}")
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen paths and print the results; 1 if any path failed."""
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # A SIGTERM (from `leveret bench`, say) unwinds through the clean-ups like Ctrl-C.
    signal.signal(signal.SIGTERM, on_term)
    broker = Broker(args.amqp_url, args.management_url)
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="leveret-peers-") as tmp:
        for setup in SETUPS:
            wanted = (("flood", setup), ("light", f"{setup}-light"))
            modes = [mode for mode, path in wanted if path in args.paths]
            if not modes:
                continue
            try:
                done = run_setup(setup, modes, args.tasks, broker, args.redis_url, Path(tmp))
                results.update({result.path: result.as_json() for result in done})
            except Exception as exc:
                log(f"{setup}: failed: {exc!r}")
                traceback.print_exc(file=sys.stderr)
                for mode in modes:
                    errors[setup if mode == "flood" else f"{setup}-light"] = repr(exc)
    report = {
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "tasks": args.tasks,
        "processes": PROCESSES,
        "results": results,
        "errors": errors,
    }
    if args.json:
        print(table(results), file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print(table(results))
        for path, error in errors.items():
            print(f"{path}: FAILED: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
