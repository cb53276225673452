"""The whole path on a real broker: producer, scheduler, queue, worker, results, tracker."""

from __future__ import annotations

import json
import signal
import time
import uuid
from typing import Any

import httpx
import pika
import pytest

from leveret.cli.procs import Cluster, wait_for

pytestmark = pytest.mark.broker


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
    c = Cluster(
        namespace=f"t{uuid.uuid4().hex[:10]}",
        amqp_url=amqp_url,
        workdir=tmp_path_factory.mktemp("http-bad-input"),
    )
    c.start_scheduler()
    yield c
    c.stop_all()


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


def test_sigterm_during_load_loses_nothing(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    first = cluster.start_worker("w1", "--concurrency", "8")
    cluster.start_worker("w2", "--concurrency", "8")
    tasks = [{"kind": "sleep", "payload": 0.05} for _ in range(400)]
    r = httpx.post(f"{cluster.scheduler_url}/tasks/batch", json={"tasks": tasks}, timeout=30)
    assert r.status_code == 202
    wait_for(
        lambda: httpx.get(f"{cluster.tracker_url}/stats").json()["counts"]["completed"] >= 50,
        60,
        "some tasks to complete",
    )
    first.send(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    stats = wait_all_terminal(cluster, 400)
    assert stats["counts"]["completed"] == 400
    assert stats["counts"]["failed"] == 0
    listed = httpx.get(f"{cluster.tracker_url}/tasks", params={"limit": 1000}).json()["tasks"]
    assert len(listed) == 400
    assert "stopped" in first.log()


def test_http_rate_limit_per_client(cluster: Cluster) -> None:
    cluster.extra_env.update({"LEVERET_HTTP_RATE_PER_S": "2", "LEVERET_HTTP_BURST": "10"})
    cluster.start_scheduler()
    url = f"{cluster.scheduler_url}/tasks"
    ten = {"tasks": [{"kind": "echo"} for _ in range(10)]}
    assert httpx.post(f"{url}/batch", json=ten).status_code == 202
    over = httpx.post(url, json={"kind": "echo"})
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1
    assert over.json()["detail"]["error"] == "rate_limited"
    other = httpx.post(url, json={"kind": "echo"}, headers={"X-Client-Id": "someone-else"})
    assert other.status_code == 202
    too_big = {"tasks": [{"kind": "echo"} for _ in range(11)]}
    r = httpx.post(f"{url}/batch", json=too_big, headers={"X-Client-Id": "big"})
    assert r.status_code == 413
