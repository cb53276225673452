"""Run leveret services as child processes under one namespace.

The demo and the benchmark compose a whole system with this, and the test suite
uses it to SIGTERM, SIGKILL and SIGSTOP real processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Service:
    """One child process and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the process has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Send a signal (SIGTERM, SIGKILL, SIGSTOP, SIGCONT …)."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, and SIGKILL if it does not exit in time; return the exit code."""
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@dataclass
class Cluster:
    """Services of one namespace, started as `python -m leveret.cli ...` processes."""

    namespace: str
    amqp_url: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    scheduler_port: int = field(default_factory=free_port)
    tracker_port: int = field(default_factory=free_port)
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def scheduler_url(self) -> str:
        """Base URL of the scheduler API."""
        return f"http://127.0.0.1:{self.scheduler_port}"

    @property
    def tracker_url(self) -> str:
        """Base URL of the tracker API."""
        return f"http://127.0.0.1:{self.tracker_port}"

    def env(self) -> dict[str, str]:
        """The environment every service of the cluster gets."""
        env = dict(os.environ)
        env.update(
            {
                "LEVERET_AMQP_URL": self.amqp_url,
                "LEVERET_NAMESPACE": self.namespace,
                "LEVERET_DATA_DIR": str(self.workdir / "data"),
                "LEVERET_LOG_JSON": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Service:
        """Start ``leveret <args>`` as a child process logging to `<workdir>/<name>.log`."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "leveret.cli", *args],
                env={**self.env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        service = Service(name, proc, log_path)
        self.services.append(service)
        return service

    def start_scheduler(self, timeout_s: float = 60.0) -> Service:
        """Start the scheduler and wait until its API answers."""
        service = self.spawn("scheduler", "scheduler", "--port", str(self.scheduler_port))
        self._wait_http(service, f"{self.scheduler_url}/healthz", timeout_s)
        return service

    def start_tracker(self, timeout_s: float = 60.0) -> Service:
        """Start the tracker and wait until its API answers."""
        service = self.spawn("tracker", "tracker", "--port", str(self.tracker_port))
        self._wait_http(service, f"{self.tracker_url}/healthz", timeout_s)
        return service

    def start_worker(
        self, name: str, *args: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
    ) -> Service:
        """Start a worker (id = `name`) and wait until it consumes."""
        service = self.spawn(name, "worker", "--worker-id", name, *args, env=env)

        def ready() -> bool:
            # A worker may be ready and already gone (a poison task killed it).
            return f"worker {name} ready" in service.log() or not _check_alive(service)

        wait_for(ready, timeout_s, f"worker {name} to start")
        return service

    def _wait_http(self, service: Service, url: str, timeout_s: float) -> None:
        def answers() -> bool:
            _check_alive(service)
            try:
                return httpx.get(url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout_s, f"{service.name} at {url}", interval_s=0.1)

    def stop_all(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop every running service (SIGTERM, then SIGKILL); return their exit codes."""
        codes: dict[str, int] = {}
        for service in reversed(self.services):
            if service.alive() or service.proc.returncode is None:
                codes[service.name] = service.stop(timeout_s)
            else:
                codes[service.name] = service.proc.returncode
        return codes


def _check_alive(service: Service) -> bool:
    if not service.alive():
        raise RuntimeError(
            f"{service.name} exited with {service.proc.returncode}:\n{service.log()[-3000:]}"
        )
    return True
