"""Capability routing, pure parts: requirement sets and their names, why a task waits."""

from __future__ import annotations

from datetime import UTC, datetime

from leveret.contracts import AcceptedTask
from leveret.topology import MAX_REQUIREMENT_TEXT, Topology, requirement_key, requirement_set
from leveret.tracker.state import TaskRecord, WorkerCounters, apply_accepted
from leveret.tracker.workers import WorkerRecord, WorkerState, WorkerView, unmet_requirements

AT = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_requirement_set_has_one_name_whatever_the_order() -> None:
    assert requirement_set(["region-eu", "gpu", "gpu"]) == ("gpu", "region-eu")
    assert requirement_key("default", ["region-eu", "gpu"]) == "default.req.gpu+region-eu"
    assert requirement_key("default", ["gpu", "region-eu", "gpu"]) == "default.req.gpu+region-eu"
    spec = Topology("ns").requirement("cpu", ["b", "a"])
    assert spec.name == "ns.work.cpu.req.a+b"
    assert spec.arguments["x-queue-type"] == "quorum"
    assert spec.arguments["x-delivery-limit"] == Topology().work("x").arguments["x-delivery-limit"]


def test_a_long_requirement_set_is_named_by_a_digest_that_fits_the_broker() -> None:
    tags = [f"capability-{i:02d}-" + "x" * 50 for i in range(16)]
    key = requirement_key("a" * 64, tags)
    assert key.startswith("a" * 64 + ".req.sha-")
    assert key == requirement_key("a" * 64, list(reversed(tags)))
    assert key != requirement_key("a" * 64, tags[:-1])
    assert len(Topology("n" * 40).requirement("a" * 64, tags).name) <= 255
    short = ["t" * (MAX_REQUIREMENT_TEXT // 2 - 1), "u" * (MAX_REQUIREMENT_TEXT // 2 - 1)]
    assert "+" in requirement_key("p", short)


def _view(worker_id: str, caps: tuple[str, ...], state: WorkerState, pool: str = "default"):
    record = WorkerRecord(
        id=worker_id,
        host="h",
        pid=1,
        pool=pool,
        concurrency=1,
        kinds=("echo",),
        capabilities=caps,
        version="1",
        started_at=AT,
        last_seen=AT,
    )
    return WorkerView(record, worker_id, state, WorkerCounters())


def test_a_task_waits_until_a_live_worker_of_its_pool_has_every_tag() -> None:
    workers = [
        _view("dead-gpu", ("gpu", "tpu"), WorkerState.DEAD),
        _view("gpu", ("gpu",), WorkerState.ALIVE),
        _view("other-pool", ("gpu", "tpu"), WorkerState.ALIVE, pool="batch"),
    ]
    reason = unmet_requirements("default", ["gpu", "tpu"], workers)
    assert reason is not None and "gpu, tpu" in reason and "'default'" in reason
    assert unmet_requirements("default", ["gpu"], workers) is None
    assert unmet_requirements("default", [], []) is None
    workers.append(_view("both", ("tpu", "gpu", "ssd"), WorkerState.ALIVE))
    assert unmet_requirements("default", ["gpu", "tpu"], workers) is None


def test_the_tracker_keeps_what_a_task_requires() -> None:
    item = AcceptedTask(id="t", kind="echo", pool="default", submitted_at=AT, requires=["gpu"])
    record = apply_accepted(None, item)
    assert record.requires == ("gpu",)
    bare = TaskRecord(id="t", status=record.status)
    assert apply_accepted(bare, item).requires == ("gpu",)
    assert apply_accepted(record, item) is record
