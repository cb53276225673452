"""Hostile input on a real broker, real processes: whatever a producer sends, the AMQP
intake answers it and moves on, and the HTTP API answers a 4xx naming the problem.

Each body here used to raise something other than a refusal during admission
(RecursionError, OverflowError, ValueError, a serialisation error): over AMQP the
delivery was left unacked, and a flood of them larger than the intake's prefetch
stalled the intake; over HTTP the answer was a 500.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers import eventually, own_cluster, report
from test_backbone import PikaProducer

from leveret.cli.procs import Cluster
from leveret.management import ManagementApi, vhost_of

pytestmark = pytest.mark.broker

PREFETCH = 8
DEEP = 5000

#: (name, body, the error code it is refused with)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("deep-array", b'{"kind":"echo","payload":' + b"[" * DEEP + b"]" * DEEP + b"}", "too_deep"),
    (
        "deep-object",
        b'{"kind":"echo","payload":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
        "too_deep",
    ),
    ("payload-65-levels", b'{"kind":"echo","payload":' + b"[" * 65 + b"]" * 65 + b"}", "too_deep"),
    ("run-at-9999", b'{"kind":"echo","run_at":"9999-12-31T23:59:59Z"}', "invalid_task"),
    ("run-at-overflow", b'{"kind":"echo","run_at":"9999-12-31T23:59:59-14:00"}', "invalid_task"),
    ("run-at-year-1", b'{"kind":"echo","run_at":"0001-01-01T00:00:00+14:00"}', "invalid_task"),
    ("nan", b'{"kind":"echo","payload":NaN}', "invalid_json"),
    ("infinity", b'{"kind":"echo","payload":[Infinity,-Infinity]}', "invalid_json"),
    ("1e400", b'{"kind":"echo","payload":1e400}', "invalid_number"),
    ("huge-int", b'{"kind":"echo","payload":' + b"9" * 5000 + b"}", "invalid_json"),
    ("int-65-bits", b'{"kind":"echo","payload":36893488147419103232}', "invalid_number"),
    ("huge-priority", b'{"kind":"echo","priority":' + b"9" * 5000 + b"}", "invalid_json"),
    ("lone-surrogate", b'{"kind":"echo","payload":"\\ud800"}', "invalid_json"),
    ("nan-timeout", b'{"kind":"echo","timeout_s":NaN}', "invalid_json"),
    (
        "too-many-edges",
        json.dumps({"kind": "echo", "depends_on": [f"p{i}" for i in range(1001)]}).encode(),
        "invalid_task",
    ),
]


@pytest.fixture(scope="module")
def system_http(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler shared by the HTTP cases (they only need it)."""
    with own_cluster(amqp_url, tmp_path_factory.mktemp("http-hostile")) as c:
        c.start_scheduler()
        yield c


async def queue_figures(amqp_url: str, queue: str) -> dict[str, Any]:
    """A queue's ``messages_ready`` and ``messages_unacknowledged`` as the management API
    last sampled them (every 5 s)."""
    async with ManagementApi.from_settings(None, amqp_url) as api:
        path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}/{queue}"
        response = await api._http.get(path)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


async def test_flood_of_hostile_submissions_is_answered_and_the_intake_keeps_going(
    cluster: Cluster,
) -> None:
    """Ten times the intake's prefetch of hostile submissions, then one good task: every
    hostile one is answered `rejected` with its reason, the good one completes, and the
    intake queue ends with nothing ready and nothing unacked."""
    cluster.extra_env["LEVERET_INTAKE_PREFETCH"] = str(PREFETCH)
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1")
    producer = PikaProducer(cluster.amqp_url, cluster.namespace)
    try:
        expected: dict[str, str] = {}
        for i in range(10 * PREFETCH):
            name, body, code = HOSTILE[i % len(HOSTILE)]
            producer.publish(body, correlation_id=f"{name}-{i}")
            expected[f"{name}-{i}"] = code
        started = time.monotonic()
        producer.publish(b'{"kind": "echo", "payload": "after the flood"}', correlation_id="ok")
        replies = producer.collect({*expected, "ok"}, timeout_s=60)
        report(
            f"hostile flood: {len(expected)} refusals + 1 result in "
            f"{time.monotonic() - started:.1f} s"
        )
        assert replies["ok"]["body"]["status"] == "completed"
        assert replies["ok"]["body"]["result"] == "after the flood"
        for corr, code in expected.items():
            result = replies[corr]["body"]
            assert (result["status"], result["error"]["type"]) == ("rejected", code), corr
            assert result["error"]["message"]
        # Each refused original is dead-lettered with its reason.
        rejected = f"{cluster.namespace}.rejected"
        dead = {}
        for _ in expected:
            method, props, _body = producer.channel.basic_get(rejected, auto_ack=True)
            assert method is not None, "fewer dead-lettered copies than refusals"
            dead[props.correlation_id] = props.headers["x-leveret-error-type"]
        assert dead == expected
    finally:
        producer.close()

    async def intake_settled() -> bool:
        figures = await queue_figures(cluster.amqp_url, f"{cluster.namespace}.intake")
        return (figures.get("messages_ready"), figures.get("messages_unacknowledged")) == (0, 0)

    await eventually(intake_settled, 20, "an intake queue with nothing ready or unacked", 0.5)
    for service in cluster.services:
        assert service.alive(), service.name


@pytest.mark.parametrize(("name", "body", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_http_submission_gets_a_4xx_naming_the_problem(
    system_http: Cluster, name: str, body: bytes, code: str
) -> None:
    r = httpx.post(
        f"{system_http.scheduler_url}/tasks",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert r.json()["detail"]["error"] == code, r.text
    assert r.json()["detail"]["message"]


@pytest.mark.parametrize(("name", "body", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_task_in_a_batch_gets_a_4xx_naming_the_problem(
    system_http: Cluster, name: str, body: bytes, code: str
) -> None:
    batch = b'{"tasks": [{"kind": "echo"}, ' + body + b"]}"
    r = httpx.post(
        f"{system_http.scheduler_url}/tasks/batch",
        content=batch,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert r.json()["detail"]["error"], r.text


def test_too_many_dependency_edges_in_one_batch_is_refused(system_http: Cluster) -> None:
    parents = [{"kind": "echo", "id": f"p{i}"} for i in range(20)]
    children = [{"kind": "echo", "depends_on": [f"p{i}" for i in range(20)]} for _ in range(600)]
    r = httpx.post(
        f"{system_http.scheduler_url}/tasks/batch",
        json={"tasks": parents + children},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert r.json()["detail"]["error"] == "too_many_dependencies"
