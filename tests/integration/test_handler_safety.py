"""The built-in handlers cannot reach too far (issue 11, "Handlers"), end to end.

Real scheduler, tracker and workers on a real broker; tasks go in over the
scheduler's HTTP API and are judged by what the tracker recorded, as a user would.
`http` fetches from a server the test runs on 127.0.0.1, which a worker refuses
unless started with ``LEVERET_HTTP_ALLOW=127.0.0.1/32``; `shell` runs on a worker
started with ``--shell``, and what outlives a command is checked with psutil.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import TrackerApi, eventually, report, submit_task

from leveret.builtin_shell import OUTPUT_LIMIT, SAFE_PATH
from leveret.cli.procs import Cluster

pytestmark = pytest.mark.broker

OPEN_MAX_BYTES = 64 * 1024  # the allowing worker's LEVERET_HTTP_MAX_BYTES


def _failed(state: dict[str, Any], error_type: str) -> str:
    """The task failed with `error_type` (once: built-ins are not retried); its message."""
    assert state["status"] == "failed", state
    assert state["error"]["type"] == error_type, state
    assert len(state["attempts"]) == 1, state
    return str(state["error"]["message"])


def _ran_s(state: dict[str, Any]) -> float:
    attempt = state["attempts"][0]
    started = datetime.fromisoformat(attempt["started_at"])
    return (datetime.fromisoformat(attempt["finished_at"]) - started).total_seconds()


# --- a local HTTP server ----------------------------------------------------------------


class _Site(BaseHTTPRequestHandler):
    """``/ok``: 5 bytes; ``/hop``: a redirect to /ok; ``/to-metadata``: a redirect to the
    cloud metadata address; ``/loop/<n>``: a redirect to /loop/<n+1>, forever;
    ``/endless``: a body that never ends; ``/slow``: one byte every 0.1 s."""

    hits: Counter[str]
    sent: Counter[str]
    stop: threading.Event

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        path = self.path.split("?")[0]
        if path == "/ok":
            self._answer(b"hello")
        elif path == "/hop":
            self._redirect("/ok")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif path.startswith("/loop/"):
            self._redirect(f"/loop/{int(path.rsplit('/', 1)[1]) + 1}")
        elif path in ("/endless", "/slow"):
            self._stream(path)
        else:
            self.send_error(404)

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def _stream(self, path: str) -> None:
        """No content-length: the body ends when the connection does, here never."""
        self.send_response(200)
        self.end_headers()
        chunk, pause = (b"x" * 16384, 0.0) if path == "/endless" else (b"x", 0.1)
        try:
            while not self.stop.wait(pause):
                self.wfile.write(chunk)
                self.wfile.flush()
                self.sent[path] += len(chunk)
        except OSError:  # the client hung up: what the test wants
            pass
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[tuple[str, type[_Site]]]:
    """A threaded HTTP server on 127.0.0.1 (port 0): its base URL and its handler class,
    which counts hits per path and bytes sent by the streaming paths."""
    handler = type(
        "Site", (_Site,), {"hits": Counter(), "sent": Counter(), "stop": threading.Event()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    handler.stop.set()
    server.shutdown()
    server.server_close()


# --- http -------------------------------------------------------------------------------


async def test_http_refuses_local_addresses_unless_allowed_and_bounds_every_fetch(
    cluster: Cluster, site: tuple[str, type[_Site]]
) -> None:
    """Proves: a worker with default settings refuses a URL on 127.0.0.1, on
    `localhost`, on the IPv4-mapped IPv6 form of 127.0.0.1 and on the cloud metadata
    address (`http_forbidden_address`), without connecting. A worker with
    LEVERET_HTTP_ALLOW=127.0.0.1/32 fetches from the site and follows a redirect there,
    but refuses a redirect from it to the metadata address, stops after 5 redirects
    (`http_too_many_redirects`), stops an endless body at LEVERET_HTTP_MAX_BYTES
    (`http_too_large`), and ends a fetch that dribbles a byte every 0.1 s at its
    deadline (`http_timeout`): the payload's `timeout_s`, or the task's own."""
    base, served = site
    port = base.rsplit(":", 1)[1]
    c = cluster
    c.start_tracker()
    c.extra_env["LEVERET_POOLS"] = "default,open"
    c.start_scheduler()
    del c.extra_env["LEVERET_POOLS"]
    c.start_worker("guarded", "--concurrency", "4")
    allow = {"LEVERET_HTTP_ALLOW": "127.0.0.1/32", "LEVERET_HTTP_MAX_BYTES": str(OPEN_MAX_BYTES)}
    c.start_worker("open", "--concurrency", "8", "--pool", "open", env=allow)
    api = TrackerApi(c.tracker_url)

    guarded = {
        "loopback": f"{base}/ok?guarded",
        "local host name": f"http://localhost:{port}/ok?by-name",
        "loopback (mapped)": f"http://[::ffff:127.0.0.1]:{port}/ok?mapped",
        "link-local": "http://169.254.169.254/latest/meta-data/",
    }
    refused = {
        what: await submit_task(c, kind="http", payload=url) for what, url in guarded.items()
    }
    hop = await submit_task(c, kind="http", pool="open", payload=f"{base}/hop")
    to_metadata = await submit_task(c, kind="http", pool="open", payload=f"{base}/to-metadata")
    loop = await submit_task(c, kind="http", pool="open", payload=f"{base}/loop/0")
    endless = await submit_task(c, kind="http", pool="open", payload=f"{base}/endless")
    slow_payload = await submit_task(
        c,
        kind="http",
        pool="open",
        payload={"url": f"{base}/slow?payload", "timeout_s": 1},
    )
    slow_task = await submit_task(c, kind="http", pool="open", payload=f"{base}/slow", timeout_s=2)

    for what, task_id in refused.items():
        message = _failed(await api.ended(task_id, 30), "http_forbidden_address")
        assert what.split(" (")[0] in message and "LEVERET_HTTP_ALLOW" in message, message
    assert not [path for path in served.hits if "guarded" in path or "by-name" in path]
    assert not [path for path in served.hits if "mapped" in path]

    state = await api.ended(hop, 30)
    assert state["status"] == "completed", state
    assert state["result"]["status"] == 200 and state["result"]["bytes"] == len(b"hello")
    assert state["result"]["url"] == f"{base}/ok"

    message = _failed(await api.ended(to_metadata, 30), "http_forbidden_address")
    assert "169.254.169.254" in message and "link-local" in message

    message = _failed(await api.ended(loop, 30), "http_too_many_redirects")
    assert "more than 5 redirects" in message
    assert sorted(p for p in served.hits if p.startswith("/loop/")) == [
        f"/loop/{n}" for n in range(6)
    ]

    state = await api.ended(endless, 30)
    message = _failed(state, "http_too_large")
    assert f"{OPEN_MAX_BYTES} bytes" in message and "LEVERET_HTTP_MAX_BYTES" in message

    state = await api.ended(slow_payload, 30)
    assert "within 1 s" in _failed(state, "http_timeout")
    payload_s = _ran_s(state)
    assert 1.0 <= payload_s < 5, payload_s
    state = await api.ended(slow_task, 30)
    _failed(state, "http_timeout")  # the task's timeout_s bounds the fetch, and says so
    task_s = _ran_s(state)
    assert 1.5 <= task_s < 10, task_s  # at its deadline (1.8 s), not after 300 s
    report(
        f"handler safety: endless body stopped at {OPEN_MAX_BYTES} bytes after the server "
        f"sent {served.sent['/endless']} (socket buffers); dribbling fetch ended after "
        f"{payload_s:.2f} s (payload timeout_s 1) and {task_s:.2f} s (task timeout_s 2)"
    )
    await api.close()


# --- shell ------------------------------------------------------------------------------


def _survivors(pid_file: Path) -> list[int]:
    """The processes whose pids the command wrote that still run (zombies count as gone)."""
    alive = []
    for pid in (int(p) for p in pid_file.read_text().split()):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _spawner(pid_file: Path) -> str:
    """A command that starts a shell with two background sleeps and waits for them,
    writing the three pids to `pid_file`."""
    inner = f"sleep 300 & echo $! >> {pid_file}; sleep 300 & echo $! >> {pid_file}; "
    return f"sh -c '{inner}echo $$ >> {pid_file}; wait'"


def _pids_in(pid_file: Path) -> int:
    return len(pid_file.read_text().split()) if pid_file.exists() else 0


async def _pids_written(pid_file: Path) -> None:
    async def written() -> bool:
        return _pids_in(pid_file) == 3

    await eventually(written, 20, f"three pids in {pid_file}")


async def test_shell_has_a_clean_environment_capped_output_and_leaves_no_process_behind(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Proves: a `shell` command sees PATH (a safe default) and the variables
    LEVERET_SHELL_ENV names, never the worker's LEVERET_AMQP_URL (broker credentials)
    nor anything else of its environment; 1 MB of output comes back as its last 64 KiB
    with a marker; cancelling a running command (`sh -c 'sleep 300 & sleep 300 & wait'`)
    and a command's timeout both end its whole process group, children included."""
    c = cluster
    c.start_tracker()
    c.start_scheduler()
    worker_env = {
        "LEVERET_SHELL_ENV": "PASSED_ON",
        "PASSED_ON": "yes",
        "NOT_NAMED": "secret",
    }
    c.start_worker("sh", "--concurrency", "4", "--shell", env=worker_env)
    api = TrackerApi(c.tracker_url)
    async with httpx.AsyncClient(base_url=c.scheduler_url, timeout=10) as http:

        async def shell_known() -> bool:
            return "shell" in (await http.get("/healthz")).json()["kinds"]

        await eventually(shell_known, 20, "the scheduler to learn `shell`")

    env_task = await submit_task(c, kind="shell", payload="env")
    loud = await submit_task(c, kind="shell", payload="head -c 1000000 /dev/zero | tr '\\0' x")
    cancelled_pids, timed_out_pids = tmp_path / "cancelled.pids", tmp_path / "timed-out.pids"
    to_cancel = await submit_task(c, kind="shell", payload=_spawner(cancelled_pids))
    to_time_out = await submit_task(c, kind="shell", payload=_spawner(timed_out_pids), timeout_s=3)

    state = await api.ended(env_task, 30)
    assert state["status"] == "completed", state
    seen = dict(line.split("=", 1) for line in state["result"]["stdout"].splitlines())
    assert seen["PATH"] == SAFE_PATH
    assert seen["PASSED_ON"] == "yes"
    assert "LEVERET_AMQP_URL" not in seen and "NOT_NAMED" not in seen, seen
    assert "amqp://" not in state["result"]["stdout"]
    assert not [name for name in seen if name.startswith("LEVERET_")], seen

    state = await api.ended(loud, 30)
    assert state["status"] == "completed", state
    stdout = state["result"]["stdout"]
    marker = f"[truncated: the first {1_000_000 - OUTPUT_LIMIT} of 1000000 bytes dropped]\n"
    assert stdout == marker + "x" * OUTPUT_LIMIT

    await _pids_written(cancelled_pids)
    assert len(_survivors(cancelled_pids)) == 3  # all running before the cancel
    async with httpx.AsyncClient(base_url=c.scheduler_url, timeout=10) as http:
        r = await http.delete(f"/tasks/{to_cancel}")
    assert r.status_code == 202, r.text
    state = await api.ended(to_cancel, 30)
    assert state["status"] == "cancelled", state

    async def none_left(pid_file: Path) -> bool:
        return not _survivors(pid_file)

    await eventually(lambda: none_left(cancelled_pids), 10, "the cancelled command's processes")

    await _pids_written(timed_out_pids)
    state = await api.ended(to_time_out, 30)
    assert _failed(state, "timeout")
    await eventually(lambda: none_left(timed_out_pids), 10, "the timed-out command's processes")
    await api.close()
