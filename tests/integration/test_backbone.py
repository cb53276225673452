"""The whole path on a real broker: producer, scheduler, queue, worker, results, tracker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from helpers import own_cluster, report

from leveret.cli.procs import Cluster, wait_for

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


def pika_params(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": f"test-pika-{uuid.uuid4().hex[:6]}"}
    return params


def task_state(cluster: Cluster, task_id: str) -> dict[str, Any] | None:
    r = httpx.get(f"{cluster.tracker_url}/tasks/{task_id}", timeout=5)
    return r.json() if r.status_code == 200 else None


def wait_status(cluster: Cluster, task_id: str, status: str, timeout_s: float = 30) -> dict:
    found: dict[str, Any] = {}

    def reached() -> bool:
        state = task_state(cluster, task_id)
        if state is not None:
            found.update(state)
        return state is not None and state["status"] == status

    wait_for(reached, timeout_s, f"task {task_id} to be {status} (last seen: {found})")
    return found


def wait_all_terminal(cluster: Cluster, expected: int, timeout_s: float = 120) -> dict:
    stats: dict[str, Any] = {}

    def done() -> bool:
        stats.update(httpx.get(f"{cluster.tracker_url}/stats", timeout=5).json())
        counts = stats["counts"]
        return counts["completed"] + counts["failed"] >= expected

    wait_for(done, timeout_s, f"{expected} terminal tasks (last: {stats.get('counts')})", 0.2)
    return stats


class PikaProducer:
    """A producer that knows nothing of leveret: plain pika, JSON, reply_to."""

    def __init__(self, url: str, namespace: str) -> None:
        self.connection = pika.BlockingConnection(pika_params(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.exchange = f"{namespace}.submit"
        result = self.channel.queue_declare("", exclusive=True)
        self.reply_queue = result.method.queue
        self.replies: dict[str, dict] = {}

    def publish(self, body: bytes, *, correlation_id: str, routing_key: str = "default", **props):
        self.channel.basic_publish(
            self.exchange,
            routing_key,
            body,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                reply_to=self.reply_queue,
                correlation_id=correlation_id,
                **props,
            ),
            mandatory=True,
        )

    def collect(self, correlation_ids: set[str], timeout_s: float = 30) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while not correlation_ids <= self.replies.keys():
            if time.monotonic() > deadline:
                missing = correlation_ids - self.replies.keys()
                raise TimeoutError(f"no reply for {sorted(missing)}")
            method, props, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            self.replies[props.correlation_id] = {"body": json.loads(body), "props": props}
        return self.replies

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def system(cluster: Cluster) -> Cluster:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "8")
    return cluster


def test_plain_pika_producer_gets_result_via_reply_to(system: Cluster) -> None:
    producer = PikaProducer(system.amqp_url, system.namespace)
    try:
        body = json.dumps({"kind": "echo", "payload": {"hello": "world"}}).encode()
        producer.publish(body, correlation_id="corr-1")
        reply = producer.collect({"corr-1"})["corr-1"]
    finally:
        producer.close()
    result = reply["body"]
    assert result["status"] == "completed"
    assert result["result"] == {"hello": "world"}
    assert result["worker"] == "w1"
    assert result["attempt"] == 1
    assert reply["props"].correlation_id == "corr-1"
    state = wait_status(system, result["id"], "completed")
    assert state["result"] == {"hello": "world"}
    assert state["worker"] == "w1"


def test_http_submission_end_to_end(system: Cluster) -> None:
    r = httpx.post(f"{system.scheduler_url}/tasks", json={"kind": "echo", "payload": "one"})
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert r.json()["status"] == "pending"
    batch = [{"kind": "echo", "payload": i} for i in range(50)] + [{"kind": "fail", "payload": "x"}]
    r = httpx.post(f"{system.scheduler_url}/tasks/batch", json={"tasks": batch})
    assert r.status_code == 202, r.text
    ids = [t["id"] for t in r.json()["tasks"]]
    assert len(set(ids)) == 51
    assert wait_status(system, task_id, "completed")["result"] == "one"
    failed = wait_status(system, ids[-1], "failed")
    assert failed["error"] == {"type": "requested_failure", "message": "x"}
    for i, tid in enumerate(ids[:-1]):
        assert wait_status(system, tid, "completed")["result"] == i
    assert httpx.get(f"{system.tracker_url}/tasks/never-submitted").status_code == 404


BAD_AMQP_INPUT = [
    ("not-json", b"this is not json", "invalid_json"),
    ("not-utf8", b"\xff\xfe\x00garbage", "invalid_encoding"),
    ("not-object", b"[1, 2, 3]", "not_an_object"),
    ("no-kind", b'{"payload": "x"}', "invalid_task"),
    ("bad-kind", b'{"kind": "no-such-kind", "payload": 1}', "unknown_kind"),
    ("extra-field", b'{"kind": "echo", "colour": "red"}', "invalid_task"),
    (
        "too-large",
        json.dumps({"kind": "echo", "payload": "x" * 70_000}).encode(),
        "payload_too_large",
    ),
]


def test_bad_amqp_input_is_rejected_with_reason_and_dead_lettered(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_MAX_PAYLOAD_BYTES"] = "65536"
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1")
    producer = PikaProducer(cluster.amqp_url, cluster.namespace)
    try:
        for name, body, _ in BAD_AMQP_INPUT:
            producer.publish(body, correlation_id=name)
        replies = producer.collect({name for name, _, _ in BAD_AMQP_INPUT})
        for name, _, code in BAD_AMQP_INPUT:
            result = replies[name]["body"]
            assert result["status"] == "rejected", name
            assert result["error"]["type"] == code, (name, result)
            assert result["error"]["message"]
        # The originals sit in the rejected queue, with the reason in their headers.
        channel = producer.channel
        reasons = {}
        for _ in BAD_AMQP_INPUT:
            method, props, body = channel.basic_get(f"{cluster.namespace}.rejected", auto_ack=True)
            assert method is not None, "rejected queue holds fewer messages than were refused"
            reasons[props.correlation_id] = props.headers["x-leveret-error-type"]
            assert props.headers["x-leveret-reason"]
        assert reasons == {name: code for name, _, code in BAD_AMQP_INPUT}
        # Every refusal is recorded by the tracker as rejected.
        rejected_id = replies["bad-kind"]["body"]["id"]
        assert wait_status(cluster, rejected_id, "rejected")["error"]["type"] == "unknown_kind"
        # And the services still work.
        producer.publish(b'{"kind": "echo", "payload": "still here"}', correlation_id="ok")
        assert producer.collect({"ok"})["ok"]["body"]["result"] == "still here"
    finally:
        producer.close()
    for service in cluster.services:
        assert service.alive(), service.name


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_encoding"),
        (b'"just a string"', 400, "not_an_object"),
        (b'{"payload": 1}', 422, "invalid_task"),
        (b'{"kind": "teleport"}', 422, "unknown_kind"),
        (b'{"kind": "echo", "priority": 42}', 422, "invalid_task"),
        (b'{"kind": "echo", "pool": "Bad Pool!"}', 422, "invalid_task"),
        (
            json.dumps({"kind": "echo", "payload": "x" * (1024 * 1024 + 10)}).encode(),
            413,
            "payload_too_large",
        ),
    ],
)
def test_bad_http_input_gets_a_clear_4xx(
    system_http: Cluster, body: bytes, status: int, code: str
) -> None:
    r = httpx.post(
        f"{system_http.scheduler_url}/tasks",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.json()["detail"]["error"] == code
    assert r.json()["detail"]["message"]
    ok = httpx.post(f"{system_http.scheduler_url}/tasks", json={"kind": "echo"})
    assert ok.status_code == 202


@pytest.fixture(scope="module")
def system_http(amqp_url: str, tmp_path_factory: pytest.TempPathFactory):
    """One scheduler shared by the parametrized HTTP bad-input cases (they only need it)."""
    with own_cluster(amqp_url, tmp_path_factory.mktemp("http-bad-input")) as c:
        c.start_scheduler()
        yield c


def test_bad_batch_names_the_bad_item(system: Cluster) -> None:
    tasks = [{"kind": "echo"}, {"kind": "echo"}, {"kind": "nope"}]
    r = httpx.post(f"{system.scheduler_url}/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 422
    assert r.json()["detail"] == {
        "error": "unknown_kind",
        "message": r.json()["detail"]["message"],
        "index": 2,
    }


def test_same_id_twice_makes_one_task(system: Cluster) -> None:
    producer = PikaProducer(system.amqp_url, system.namespace)
    try:
        body = json.dumps({"kind": "sleep", "payload": 0.2, "id": "once-only"}).encode()
        producer.publish(body, correlation_id="first")
        producer.publish(body, correlation_id="second")
        replies = producer.collect({"first", "second"})
        statuses = sorted(r["body"]["status"] for r in replies.values())
        assert statuses == ["completed", "duplicate"]
        # Message-id as the idempotency key when the body has no id.
        anon = json.dumps({"kind": "echo", "payload": "m"}).encode()
        producer.publish(anon, correlation_id="m1", message_id="by-message-id")
        producer.publish(anon, correlation_id="m2", message_id="by-message-id")
        replies = producer.collect({"m1", "m2"})
        assert sorted(replies[c]["body"]["status"] for c in ("m1", "m2")) == [
            "completed",
            "duplicate",
        ]
    finally:
        producer.close()
    again = httpx.post(f"{system.scheduler_url}/tasks", json={"kind": "echo", "id": "once-only"})
    assert again.status_code == 200
    assert again.json() == {"id": "once-only", "status": "duplicate"}
    state = wait_status(system, "once-only", "completed")
    assert state["attempt"] == 1
    assert len(state["attempts"]) == 1


class ResultLog:
    """Every result published on the namespace's results exchange, counted by task id
    (bound before any task is submitted, so none is missed)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.connection = pika.BlockingConnection(pika_params(url))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, f"{namespace}.results", "#")
        self.counts: Counter[str] = Counter()

    def drain(self) -> Counter[str]:
        """Count what arrived since the last call; return all counts so far."""
        while True:
            method, _, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.counts
            self.counts[json.loads(body)["id"]] += 1

    def wait_for_each(self, ids: list[str], timeout_s: float = 60) -> Counter[str]:
        """Wait until every task of `ids` has a result; return the counts."""
        wait_for(lambda: all(self.drain()[i] for i in ids), timeout_s, "a result per task", 0.1)
        return self.counts

    def close(self) -> None:
        self.connection.close()


def ready_in_queue(cluster: Cluster, queue: str) -> int:
    """Messages waiting (not yet delivered) in a queue, as the broker counts them now."""
    connection = pika.BlockingConnection(pika_params(cluster.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def running_on(cluster: Cluster, worker: str) -> list[str]:
    """Ids of the tasks the tracker shows running on `worker`."""
    page = httpx.get(
        f"{cluster.tracker_url}/tasks", params={"status": "running", "limit": 1000}, timeout=5
    ).json()
    return [t["id"] for t in page["tasks"] if t["worker"] == worker]


def worker_view(cluster: Cluster, worker: str) -> dict[str, Any]:
    workers = httpx.get(f"{cluster.tracker_url}/workers", timeout=5).json()["workers"]
    return next((w for w in workers if w["id"] == worker), {})


def test_sigterm_during_load_loses_nothing(cluster: Cluster) -> None:
    """A worker SIGTERMed while it runs tasks and more wait in the queue finishes what it
    runs (well within the grace period), gives back what it prefetched, and exits 0;
    every task completes exactly once."""
    cluster.start_tracker()
    cluster.start_scheduler()
    first = cluster.start_worker("w1", "--concurrency", "8")
    cluster.start_worker("w2", "--concurrency", "8")
    results = ResultLog(cluster.amqp_url, cluster.namespace)
    tasks = [{"kind": "sleep", "payload": 0.2} for _ in range(400)]
    r = httpx.post(f"{cluster.scheduler_url}/tasks/batch", json={"tasks": tasks}, timeout=30)
    assert r.status_code == 202
    ids = [t["id"] for t in r.json()["tasks"]]
    wait_for(
        lambda: httpx.get(f"{cluster.tracker_url}/stats").json()["counts"]["completed"] >= 50,
        60,
        "some tasks to complete",
    )
    wait_for(lambda: bool(running_on(cluster, "w1")), 30, "the tracker to see w1 run tasks")
    # The precondition at the moment of the fault: work still waits in the queue.
    waiting = ready_in_queue(cluster, f"{cluster.namespace}.work.default")
    assert waiting > 0, "the load was over before the SIGTERM"
    sigterm_at = datetime.now(UTC)
    first.send(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    log = first.log()
    # What w1 held when its drain began, in its own words: the tasks it was running.
    held = re.search(r"worker stopping: (\d+) tasks in flight", log)
    assert held is not None, log[-2000:]
    assert int(held[1]) >= 1, "w1 held no task at the SIGTERM: the test tested nothing"
    assert "unfinished tasks" not in log  # 0.2 s tasks all finish within the grace period
    assert "stopped" in log
    stats = wait_all_terminal(cluster, 400)
    assert stats["counts"]["completed"] == 400
    assert stats["counts"]["failed"] == 0
    listed = httpx.get(f"{cluster.tracker_url}/tasks", params={"limit": 1000}).json()["tasks"]
    assert len(listed) == 400
    # The tasks w1 was running at the SIGTERM completed there, after the signal.
    finished_on_w1 = [
        t
        for t in listed
        if t["worker"] == "w1" and datetime.fromisoformat(t["finished_at"]) > sigterm_at
    ]
    assert len(finished_on_w1) >= int(held[1]), (held[1], len(finished_on_w1))
    counts = results.wait_for_each(ids)
    results.close()
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}, "a task was run twice"
    assert worker_view(cluster, "w1")["state"] == "stopped"
    report(
        f"SIGTERM under load: {waiting} tasks queued, w1 finished {held[1]} in flight and exited 0"
    )


GRACE_PERIOD_S = 1.0


def test_sigterm_returns_tasks_longer_than_the_grace_period(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Tasks that outlast the grace period are returned to the queue when it expires
    (not before), run again on another worker, and complete there exactly once; the
    SIGTERMed worker exits 0 soon after the grace period."""
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.extra_env["LEVERET_KINDS"] = "gated"  # accepted before any worker announces it
    cluster.start_tracker()
    cluster.start_scheduler()
    gated = ("--concurrency", "4", "--handlers", "gated_handlers")
    grace = {"LEVERET_GRACE_PERIOD_S": str(GRACE_PERIOD_S)}
    first = cluster.start_worker("w1", *gated, env=grace)
    results = ResultLog(cluster.amqp_url, cluster.namespace)
    release = tmp_path / "release"  # gated tasks run until this file exists
    batch = [{"kind": "gated", "payload": str(release)} for _ in range(4)]
    r = httpx.post(f"{cluster.scheduler_url}/tasks/batch", json={"tasks": batch}, timeout=30)
    assert r.status_code == 202, r.text
    ids = sorted(t["id"] for t in r.json()["tasks"])

    def w1_runs_all() -> bool:
        return sorted(running_on(cluster, "w1")) == ids

    wait_for(w1_runs_all, 30, "w1 to run the four tasks")
    second = cluster.start_worker("w2", *gated)
    wait_for(lambda: worker_view(cluster, "w2").get("state") == "alive", 30, "w2 registered")
    # The precondition at the moment of the fault: w1 runs all four (and says so in its
    # heartbeat), they cannot finish (gated), and w2 is up and idle.
    wait_for(
        lambda: sorted(worker_view(cluster, "w1").get("in_flight", [])) == ids,
        30,
        "w1's heartbeat to list the four tasks",
    )
    assert w1_runs_all()
    assert worker_view(cluster, "w2")["in_flight"] == []
    sigterm_at = datetime.now(UTC)
    signalled = time.monotonic()
    first.send(signal.SIGTERM)
    assert first.proc.wait(GRACE_PERIOD_S + 20) == 0
    exited_s = time.monotonic() - signalled
    log = first.log()
    assert "worker stopping: 4 tasks in flight" in log, log[-2000:]
    assert "returned 4 unfinished tasks to the queue" in log, log[-2000:]

    wait_for(lambda: sorted(running_on(cluster, "w2")) == ids, 30, "w2 to run the four tasks")
    restarted = []
    for task_id in ids:
        state = task_state(cluster, task_id)
        assert state is not None
        attempts = {a["attempt"]: a for a in state["attempts"]}
        assert attempts[1]["worker"] == "w1", state
        again = attempts[state["attempt"]]
        assert state["attempt"] > 1 and again["worker"] == "w2", state
        # Returned when the grace period expired, not before.
        started = datetime.fromisoformat(again["started_at"])
        assert (started - sigterm_at).total_seconds() >= GRACE_PERIOD_S, (sigterm_at, state)
        restarted.append((started - sigterm_at).total_seconds())
    assert second.alive()
    release.touch()
    for task_id in ids:
        state = wait_status(cluster, task_id, "completed")
        assert (state["worker"], state["result"]) == ("w2", "w2"), state
    counts = results.wait_for_each(ids)
    results.close()
    assert counts == Counter(dict.fromkeys(ids, 1)), counts
    report(
        f"SIGTERM with tasks longer than the grace period ({GRACE_PERIOD_S} s): w1 exited "
        f"{exited_s:.2f} s after the signal; the tasks restarted on w2 "
        f"{min(restarted):.2f}-{max(restarted):.2f} s after it"
    )


def test_http_rate_limit_per_client(cluster: Cluster) -> None:
    # One token per 1000 s: the bucket cannot refill during the test, however slow.
    cluster.extra_env.update({"LEVERET_HTTP_RATE_PER_S": "0.001", "LEVERET_HTTP_BURST": "10"})
    cluster.start_scheduler()
    url = f"{cluster.scheduler_url}/tasks"
    ten = {"tasks": [{"kind": "echo"} for _ in range(10)]}
    assert httpx.post(f"{url}/batch", json=ten).status_code == 202
    over = httpx.post(url, json={"kind": "echo"})
    assert over.status_code == 429
    assert over.json()["detail"]["error"] == "rate_limited"
    # Retry-After is when one token is back: ~1000 s at this rate, less what elapsed.
    retry_after = int(over.headers["Retry-After"])
    assert 900 < retry_after <= 1000, retry_after
    # A refused request takes nothing: asking again at once is refused again, no later.
    again = httpx.post(url, json={"kind": "echo"})
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) <= retry_after
    # A header the caller chooses does not make another client; another address does.
    spoofed = httpx.post(url, json={"kind": "echo"}, headers={"X-Client-Id": "someone-else"})
    assert spoofed.status_code == 429
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport) as other:
        assert other.post(url, json={"kind": "echo"}).status_code == 202
        too_big = {"tasks": [{"kind": "echo"} for _ in range(11)]}
        assert other.post(f"{url}/batch", json=too_big).status_code == 413
