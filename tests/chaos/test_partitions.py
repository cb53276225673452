"""A worker partitioned from the broker is fenced, and once the partition heals it
comes back under a registration the tracker watches.

w0 reaches the broker only through a TCP proxy; w1 directly. The proxy blackholes
w0 for 20 s (sockets open, nothing forwarded: a partition, not a crash). The tracker
hears no heartbeat, fences w0 through the management API and writes its attempts
off; the broker requeues its tasks and w1 finishes them. The broker waits about
10 s for w0 to confirm the close, then drops the connection with a reset (linger 0),
which discards the close frame naming the fence (see tcp_proxy): on the heal, w0
sees a bare reset. A heal before that reset would bring the close frame instead.

Either way w0 cannot prove its old registration was not fenced, so it must come back
under a new id (same process), and the tracker must watch that one: frozen with
tasks in hand, it is fenced again and its tasks start elsewhere after about a
heartbeat timeout, not after the broker's own AMQP heartbeat (~30 s).

The tracker's half on its own: a process that starts under an id the tracker fenced
(a supervisor restarting a worker with a fixed id) is watched too, whether the
tracker refuses that id or revives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import TrackerApi, eventually, report
from tcp_proxy import TcpProxy

from leveret.cli.procs import Cluster, Service

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

HEARTBEAT_TIMEOUT_S = 3.0
PARTITION_S = 20.0
#: Fenced within a heartbeat timeout and a watchdog round or two: "a few seconds".
FENCED_WITHIN_S = 10.0
#: Heartbeat timeout plus fencing, with room for a busy machine; the broker's own
#: AMQP heartbeat (10 s, three missed) would take about 30 s.
REASSIGNED_WITHIN_S = 12.0
TASK_S = 3.0


def _at(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


async def _submit(http: httpx.AsyncClient, n: int, seconds: float) -> list[str]:
    tasks = [{"kind": "sleep", "payload": seconds} for _ in range(n)]
    r = await http.post("/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 202, r.text
    return [t["id"] for t in r.json()["tasks"]]


async def _running_on(api: TrackerApi, ids: list[str], worker: str) -> list[str]:
    states = await api.tasks_in_full(ids)
    return [s["id"] for s in states if s.get("status") == "running" and s["worker"] == worker]


async def _worker(api: TrackerApi, worker_id: str) -> dict[str, Any]:
    return next((w for w in await api.workers() if w["id"] == worker_id), {})


def _completed_once(state: dict[str, Any]) -> bool:
    ends = [a["outcome"] for a in state["attempts"]]
    return state.get("status") == "completed" and ends.count("completed") == 1


async def test_partitioned_worker_returns_under_a_watched_registration(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_TIMEOUT_S)
    parts = urlsplit(cluster.amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.serve()
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    # The proxy runs on this loop: every process is started off it.
    await asyncio.to_thread(cluster.start_tracker)
    await asyncio.to_thread(cluster.start_scheduler)
    w0 = await asyncio.to_thread(
        cluster.start_worker,
        "w0",
        "--concurrency",
        "2",
        env={"LEVERET_AMQP_URL": via_proxy.geturl()},
    )
    await asyncio.to_thread(cluster.start_worker, "w1", "--concurrency", "6")
    api = TrackerApi(cluster.tracker_url)
    http = httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=30)
    try:
        await _partition_and_return(proxy, api, http, w0)
    finally:
        w0.send(signal.SIGCONT)
        await asyncio.to_thread(w0.stop, 15)  # while the proxy still forwards
        await http.aclose()
        await api.close()
        await proxy.close()


async def _partition_and_return(
    proxy: TcpProxy, api: TrackerApi, http: httpx.AsyncClient, w0: Service
) -> None:
    """Blackhole w0 while it holds tasks, heal, then freeze its new registration."""
    submitted = await _submit(http, 8, TASK_S)
    fenced_s = await _partition(proxy, api, submitted)
    healed_clock = time.monotonic()
    fresh = await _registered_anew(api, w0)
    returned_s = time.monotonic() - healed_clock
    more = await _submit(http, 4, 2 * TASK_S)
    moved = await _freeze(api, w0, fresh, more)
    slowest = max(moved.values(), default=float("inf"))
    report(
        f"partition {PARTITION_S:.0f} s (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s): w0 fenced "
        f"after {fenced_s:.2f} s, back as {fresh} {returned_s:.2f} s after the heal; "
        f"frozen there, its tasks started elsewhere after {slowest:.2f} s"
    )
    assert slowest < REASSIGNED_WITHIN_S, moved
    w = await _worker(api, fresh)
    assert (w["state"], w["death"]) == ("dead", "fenced"), w

    async def all_done() -> bool:
        states = await api.tasks_in_full(submitted + more)
        return all(s.get("status") == "completed" for s in states)

    await eventually(all_done, 30, "every task to complete")
    states = await api.tasks_in_full(submitted + more)
    assert all(_completed_once(s) for s in states), states
    assert sorted(t["id"] for t in await api.all_tasks()) == sorted(submitted + more)


async def _partition(proxy: TcpProxy, api: TrackerApi, submitted: list[str]) -> float:
    """Blackhole w0 once it runs two tasks; check the fence and that w1 finishes
    everything, each task recorded once; heal after PARTITION_S. Seconds to the fence."""
    held: list[str] = []

    async def w0_busy() -> bool:
        held[:] = await _running_on(api, submitted, "w0")
        return len(held) == 2

    await eventually(w0_busy, 30, "w0 to run two tasks")
    proxy.blackhole()
    cut_at, cut_clock = datetime.now(UTC), time.monotonic()

    async def w0_fenced() -> bool:
        w = await _worker(api, "w0")
        return (w.get("state"), w.get("death")) == ("dead", "fenced")

    await eventually(w0_fenced, FENCED_WITHIN_S, "w0 to be declared dead, fenced")
    fenced_s = (_at((await _worker(api, "w0"))["dead_at"]) - cut_at).total_seconds()

    async def all_completed() -> bool:
        states = await api.tasks_in_full(submitted)
        return all(s.get("status") == "completed" for s in states)

    left = PARTITION_S - (time.monotonic() - cut_clock)
    await eventually(all_completed, left, "every task to complete during the partition")
    states = {s["id"]: s for s in await api.tasks_in_full(submitted)}
    for task_id in held:  # w0's tasks finished on w1, w0's attempt written off
        state = states[task_id]
        assert state["worker"] == "w1", state
        assert state["attempts"][0]["worker"] == "w0", state
        assert state["attempts"][0]["outcome"] in ("lost", "fenced"), state
    assert all(_completed_once(s) for s in states.values()), states
    listed = [t["id"] for t in await api.all_tasks()]
    assert sorted(listed) == sorted(submitted)  # each recorded once, none lost
    # The partition lasts PARTITION_S: a fault's duration, not a wait for a condition.
    await asyncio.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut_clock)))
    proxy.heal()
    return fenced_s


async def _registered_anew(api: TrackerApi, w0: Service) -> str:
    """The id w0's process registered under after the heal; its old id stays dead."""
    old = await _worker(api, "w0")
    fresh = await _registration_of(api, w0, "to register anew after the heal", not_id="w0")
    assert fresh["host"] == old["host"], (fresh, old)
    again = await _worker(api, "w0")
    assert (again["state"], again["death"]) == ("dead", "fenced"), again
    return str(fresh["id"])


async def _registration_of(
    api: TrackerApi, service: Service, what: str, not_id: str | None = None
) -> dict[str, Any]:
    """The alive registration of `service`'s process (by pid), other than `not_id`."""
    found: dict[str, Any] = {}

    async def registered() -> bool:
        for w in await api.workers():
            if w["pid"] == service.pid and w["id"] != not_id and w["state"] == "alive":
                found.update(w)
                return True
        return False

    try:
        await eventually(registered, 30, f"{service.name} {what}")
    except TimeoutError as exc:
        seen = [(w["id"], w["pid"], w["state"], w["death"]) for w in await api.workers()]
        said = [
            line for line in service.log().splitlines() if "connection" in line or "ready" in line
        ]
        raise AssertionError(f"{exc}; workers {seen}; it said: {said[-4:]}") from None
    return found


async def _freeze(
    api: TrackerApi, service: Service, registration: str, tasks: list[str]
) -> dict[str, float]:
    """SIGSTOP `service` (registered as `registration`) once it runs one of `tasks`;
    seconds from the freeze until each task it held starts elsewhere."""
    frozen: list[str] = []

    async def busy() -> bool:
        frozen[:] = await _running_on(api, tasks, registration)
        return bool(frozen)

    await eventually(busy, 30, f"{registration} to run a task")
    service.send(signal.SIGSTOP)
    frozen_at = datetime.now(UTC)
    moved: dict[str, float] = {}

    async def reassigned() -> bool:
        for state in await api.tasks_in_full(frozen):
            later = [
                _at(a["started_at"])
                for a in state.get("attempts", [])
                if a["worker"] != registration and a["started_at"]
            ]
            if later and min(later) > frozen_at:
                moved[state["id"]] = (min(later) - frozen_at).total_seconds()
        return len(moved) == len(frozen)

    # Waits past the bound so that a failure says how long it really took.
    with contextlib.suppress(TimeoutError):
        await eventually(reassigned, 45, "the frozen worker's tasks to start elsewhere")
    assert len(moved) == len(frozen), f"not reassigned within 45 s: {moved} of {frozen}"
    return moved


async def test_a_worker_started_under_a_fenced_id_is_watched(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_TIMEOUT_S)
    await asyncio.to_thread(cluster.start_tracker)
    await asyncio.to_thread(cluster.start_scheduler)
    first = await asyncio.to_thread(cluster.start_worker, "w0", "--concurrency", "1")
    await asyncio.to_thread(cluster.start_worker, "w1", "--concurrency", "4")
    api = TrackerApi(cluster.tracker_url)
    http = httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=30)
    again: Service | None = None
    try:
        await _registration_of(api, first, "to register")
        first.send(signal.SIGSTOP)

        async def fenced() -> bool:
            w = await _worker(api, "w0")
            return (w.get("state"), w.get("death")) == ("dead", "fenced")

        await eventually(fenced, FENCED_WITHIN_S, "w0 to be declared dead, fenced")
        first.send(signal.SIGKILL)
        await asyncio.to_thread(first.proc.wait, 10)
        # Restarted with the same id, as a supervisor with fixed ids does. Not
        # start_worker: its log would be w0's, which already says "ready".
        again = cluster.spawn("w0-again", "worker", "--worker-id", "w0", "--concurrency", "1")
        started = time.monotonic()
        reg = await _registration_of(api, again, "(started as w0) to be registered")
        registered_s = time.monotonic() - started
        tasks = await _submit(http, 3, 2 * TASK_S)
        moved = await _freeze(api, again, str(reg["id"]), tasks)
        slowest = max(moved.values())
        report(
            f"worker restarted under its fenced id: registered as {reg['id']} after "
            f"{registered_s:.2f} s; frozen there, its task started elsewhere after {slowest:.2f} s"
        )
        assert slowest < REASSIGNED_WITHIN_S, moved
        await eventually(lambda: _all_completed(api, tasks), 30, "the tasks to complete")
    finally:
        if again is not None:
            again.send(signal.SIGCONT)
        await http.aclose()
        await api.close()


async def _all_completed(api: TrackerApi, ids: list[str]) -> bool:
    states = await api.tasks_in_full(ids)
    return all(s.get("status") == "completed" and _completed_once(s) for s in states)
