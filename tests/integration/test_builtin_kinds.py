"""The built-in kinds `shell` and `http` end to end, and which failures are retried.

Everything goes through a real cluster (scheduler, worker, tracker on a real broker):
tasks are submitted over the scheduler's HTTP API and judged by what the tracker
recorded (`GET /tasks/{id}`: status, error, the attempt history), which is what a
user checks. `http` fetches from a server the test runs on 127.0.0.1.

Retry rules under test (leveret.worker.execution): a failed attempt is retried
while ``attempt <= max_retries`` (the task's own `max_retries` if given, even 0,
else its kind's default), except for the errors another attempt cannot fix —
`unknown_kind`, `bad_payload`, `shell_disabled`, `result_not_json` — which end
the task at once whatever `max_retries` says.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import TrackerApi, drop_namespace, eventually, report, submit_task

from leveret.amqp import connect
from leveret.cli.procs import Cluster, free_port
from leveret.contracts import TaskRetrying
from leveret.topology import RK_TASK_RETRYING, Topology

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


def _with_sample_handlers(cluster: Cluster) -> None:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )


def _attempts(state: dict[str, Any]) -> list[tuple[int, str | None]]:
    """The attempt history as (attempt, outcome), in order."""
    return [(a["attempt"], a["outcome"]) for a in sorted(state["attempts"], key=_number)]


def _number(a: dict[str, Any]) -> int:
    return int(a["attempt"])


def _failed_once(state: dict[str, Any], error_type: str) -> None:
    """The task failed with `error_type` on its first attempt and never ran again."""
    assert state["status"] == "failed", state
    assert state["error"]["type"] == error_type, state
    assert state["attempt"] == 1, state
    assert _attempts(state) == [(1, "failed")], state


@asynccontextmanager
async def _retrying_events(cluster: Cluster) -> AsyncIterator[list[TaskRetrying]]:
    """Every `task.retrying` event published while the block runs (a queue of the
    test's own on the events exchange): which error each retried attempt had."""
    seen: list[TaskRetrying] = []
    connection = await connect(cluster.amqp_url, "test-builtin-kinds-retrying")
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology(cluster.namespace).events_exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, RK_TASK_RETRYING)

        async def on_event(message: Any) -> None:
            seen.append(TaskRetrying.model_validate_json(message.body))

        await queue.consume(on_event, no_ack=True)
        yield seen


# --- a local HTTP server ----------------------------------------------------------------


class _Site(BaseHTTPRequestHandler):
    """``/bytes/<n>``: 200 with n bytes; ``/status/<code>``: that status."""

    hits: Counter[str]

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        _, what, arg = self.path.split("/", 2)
        if what == "bytes":
            self._answer(200, b"x" * int(arg))
        elif what == "status":
            self._answer(int(arg), b"nope")
        else:
            self._answer(400, b"unknown path")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[tuple[str, Counter[str]]]:
    """A threaded HTTP server on 127.0.0.1 (port 0): its base URL and hits per path."""
    hits: Counter[str] = Counter()
    handler = type("Site", (_Site,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


# --- shell ------------------------------------------------------------------------------


async def test_shell_runs_only_on_workers_started_with_shell(cluster: Cluster) -> None:
    """Proves: with no `--shell` worker the scheduler refuses `shell` (422 unknown_kind);
    a worker without `--shell` that still gets one fails it as `shell_disabled`, never
    retried even with `max_retries` on the task; a `--shell` worker returns exit code,
    stdout and stderr; a non-zero exit is `exit_status`, not retried by the kind's
    default (0) but retried when the task itself asks for a retry."""
    c = cluster
    c.start_tracker()
    c.start_scheduler()
    c.start_worker("plain", "--concurrency", "2")  # pool default, no --shell
    api = TrackerApi(c.tracker_url)
    async with httpx.AsyncClient(base_url=c.scheduler_url, timeout=10) as http:
        refused = await http.post("/tasks", json={"kind": "shell", "payload": "true"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"]["error"] == "unknown_kind"

        # A shell worker in a pool of its own: the scheduler learns the kind from it.
        shell_worker = c.start_worker("sh", "--concurrency", "2", "--pool", "shell", "--shell")

        async def shell_known() -> bool:
            return "shell" in (await http.get("/healthz")).json()["kinds"]

        await eventually(shell_known, 20, "the scheduler to learn `shell`")

    disabled = await submit_task(c, kind="shell", payload="touch /tmp/never", max_retries=3)
    ok = await submit_task(c, kind="shell", pool="shell", payload="printf out; printf err >&2")
    exit3 = await submit_task(c, kind="shell", pool="shell", payload="echo boom >&2; exit 3")
    exit3_retried = await submit_task(
        c, kind="shell", pool="shell", payload="echo boom >&2; exit 3", max_retries=1
    )
    not_a_command = await submit_task(c, kind="shell", pool="shell", payload=42, max_retries=3)

    state = await api.ended(disabled)
    _failed_once(state, "shell_disabled")
    assert state["worker"] == "plain"
    assert "--shell" in state["error"]["message"]

    state = await api.ended(ok)
    assert state["status"] == "completed", state
    assert state["worker"] == "sh"
    assert state["result"] == {"exit_code": 0, "stdout": "out", "stderr": "err"}

    state = await api.ended(exit3)
    _failed_once(state, "exit_status")  # the kind's default: no retries
    assert "exit status 3" in state["error"]["message"]
    assert "boom" in state["error"]["message"]

    state = await api.ended(exit3_retried)
    assert state["status"] == "failed", state
    assert state["error"]["type"] == "exit_status"
    assert _attempts(state) == [(1, "failed"), (2, "failed")], state

    _failed_once(await api.ended(not_a_command), "bad_payload")
    await api.close()
    shell_worker.stop()
    drop_namespace(c.amqp_url, c.namespace, pools=("shell",))


# --- http -------------------------------------------------------------------------------


async def test_http_fetches_and_reports_transport_failures(
    cluster: Cluster, site: tuple[str, Counter[str]]
) -> None:
    """Proves: `http` GETs the URL (a string or ``{"url": ...}``) and returns the
    status and body size; a 404 is a result, not a failure; a transport failure
    (connection refused) is `http_error`, which is retried `max_retries` times; a
    payload that is not an http(s) URL is `bad_payload`, never retried."""
    base, hits = site
    c = cluster
    c.start_tracker()
    c.start_scheduler()
    # The site is on loopback, which `http` refuses unless allowed (test_handler_safety).
    c.start_worker("hw", "--concurrency", "4", env={"LEVERET_HTTP_ALLOW": "127.0.0.1/32"})
    api = TrackerApi(c.tracker_url)
    closed = free_port()  # nothing listens there: connection refused

    fetched = await submit_task(c, kind="http", payload=f"{base}/bytes/1234")
    missing = await submit_task(c, kind="http", payload={"url": f"{base}/status/404"})
    refused = await submit_task(
        c, kind="http", payload=f"http://127.0.0.1:{closed}/", max_retries=2
    )
    not_url = await submit_task(c, kind="http", payload="ftp://127.0.0.1/x", max_retries=3)
    not_str = await submit_task(c, kind="http", payload={"href": base}, max_retries=3)

    state = await api.ended(fetched)
    assert state["status"] == "completed", state
    assert state["result"]["status"] == 200
    assert state["result"]["bytes"] == 1234
    assert state["result"]["elapsed_s"] >= 0
    assert hits["/bytes/1234"] == 1

    state = await api.ended(missing)
    assert state["status"] == "completed", state
    assert state["result"]["status"] == 404
    assert state["result"]["bytes"] == len(b"nope")

    state = await api.ended(refused)
    assert state["status"] == "failed", state
    assert state["error"]["type"] == "http_error"
    assert f"127.0.0.1:{closed}" in state["error"]["message"]
    assert _attempts(state) == [(1, "failed"), (2, "failed"), (3, "failed")], state

    _failed_once(await api.ended(not_url), "bad_payload")
    _failed_once(await api.ended(not_str), "bad_payload")
    assert set(hits) == {"/bytes/1234", "/status/404"}  # the bad payloads fetched nothing
    await api.close()


# --- retry rules ------------------------------------------------------------------------


@pytest.fixture
def handlers_cluster(cluster: Cluster) -> Cluster:
    """Tracker, a scheduler that also accepts the kind `ghost` (which no worker runs),
    and one worker with the sample handlers."""
    _with_sample_handlers(cluster)
    cluster.start_tracker()
    cluster.extra_env["LEVERET_KINDS"] = "ghost"
    cluster.start_scheduler()
    del cluster.extra_env["LEVERET_KINDS"]
    cluster.start_worker("rw", "--concurrency", "4", "--handlers", "sample_handlers")
    return cluster


async def test_unfixable_errors_are_never_retried_and_max_retries_on_the_task_wins(
    handlers_cluster: Cluster,
) -> None:
    """Proves: each error type another attempt cannot fix ends the task on attempt 1
    although the task allows 3 retries — `unknown_kind` (accepted by the scheduler, no
    handler on the worker), `bad_payload`, `result_not_json` from an async handler and
    from a sync one (its value cannot even leave the child process). And `max_retries`
    given on the task overrides the kind's default (`flaky` allows 3): 1 gives two
    attempts, 0 gives one, and a retryable error with retries left is retried."""
    c = handlers_cluster
    api = TrackerApi(c.tracker_url)
    never = {
        "unknown_kind": await submit_task(c, kind="ghost", payload=1, max_retries=3),
        "bad_payload": await submit_task(c, kind="sleep", payload="soon", max_retries=3),
        "result_not_json": await submit_task(c, kind="not_json", max_retries=3),
        "result_not_json (sync)": await submit_task(c, kind="not_sendable", max_retries=3),
    }
    flaky_once = await submit_task(c, kind="flaky", payload=99, max_retries=1)
    flaky_never = await submit_task(c, kind="flaky", payload=99, max_retries=0)
    flaky_default = await submit_task(c, kind="flaky", payload=1)  # kind default: 3 retries
    failing = await submit_task(c, kind="fail", payload="again", max_retries=1)

    for label, task_id in never.items():
        state = await api.ended(task_id)
        _failed_once(state, label.split()[0])
    assert "set" in (await api.task(never["result_not_json"]))["error"]["message"]
    assert "generator" in (await api.task(never["result_not_json (sync)"]))["error"]["message"]

    state = await api.ended(flaky_once)
    assert state["status"] == "failed" and state["error"]["type"] == "flaky", state
    assert _attempts(state) == [(1, "failed"), (2, "failed")], state

    _failed_once(await api.ended(flaky_never), "flaky")

    state = await api.ended(flaky_default)
    assert state["status"] == "completed" and state["result"] == 2, state
    assert _attempts(state) == [(1, "failed"), (2, "completed")], state

    state = await api.ended(failing)
    assert state["status"] == "failed" and state["error"]["type"] == "requested_failure"
    assert _attempts(state) == [(1, "failed"), (2, "failed")], state
    await api.close()


async def test_an_attempt_that_times_out_is_retried_and_the_retry_succeeds(
    handlers_cluster: Cluster,
) -> None:
    """Proves: a sync attempt past its `timeout_s` is stopped (its child killed) and
    fails as `timeout`, a retryable error: with `max_retries=1` the task runs again
    after the broker-held backoff and completes on attempt 2."""
    c = handlers_cluster
    api = TrackerApi(c.tracker_url)
    async with _retrying_events(c) as retrying:
        # Attempt 1 would block 60 s; its timeout is 1 s. Attempt 2 answers at once.
        task_id = await submit_task(c, kind="slow_first", payload=60, timeout_s=1, max_retries=1)
        state = await api.ended(task_id)
    assert state["status"] == "completed", state
    assert state["result"] == 2
    assert _attempts(state) == [(1, "failed"), (2, "completed")], state
    mine = [e for e in retrying if e.id == task_id]
    assert [(e.attempt, e.error.type) for e in mine] == [(1, "timeout")], mine
    assert mine[0].retry_in_s >= 0.5  # attempt 1's backoff step is 1 s, jittered to [0.5, 1]

    first, second = sorted(state["attempts"], key=_number)
    ran_s = _span(first["started_at"], first["finished_at"])
    waited_s = _span(first["finished_at"], second["started_at"])
    report(
        f"builtin kinds: timed-out attempt ran {ran_s:.2f} s (timeout_s 1), "
        f"its retry started {waited_s:.2f} s later"
    )
    assert ran_s >= 1.0  # it ran into its timeout ...
    assert ran_s < 30  # ... and was stopped there, not after the 60 s it would block
    assert waited_s >= mine[0].retry_in_s - 0.02  # the broker held it for the drawn delay
    await api.close()


def _span(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_the_site_fixture_answers(site: tuple[str, Counter[str]]) -> None:
    """The local server itself (so an `http` failure above is not the fixture's)."""
    base, hits = site
    r = httpx.get(f"{base}/bytes/3")
    assert (r.status_code, r.content) == (200, b"xxx")
    assert httpx.get(f"{base}/status/404").status_code == 404
    assert hits == Counter({"/bytes/3": 1, "/status/404": 1})
