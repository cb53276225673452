"""The worker's one in-flight registry (pure logic, with real asyncio tasks as jobs)."""

from __future__ import annotations

import asyncio

from leveret.worker.inflight import InFlight, Phase


async def _idle() -> None:
    await asyncio.Event().wait()


async def test_phases_decide_what_each_reader_sees() -> None:
    registry = InFlight()
    jobs = [asyncio.create_task(_idle()) for _ in range(3)]
    waiting, running, settling = (registry.hold(job, f"t{i}") for i, job in enumerate(jobs))
    running.phase = Phase.RUNNING
    settling.phase = Phase.SETTLING
    try:
        assert len(registry) == 3
        assert registry.running_ids() == ["t1"]
        assert registry.waiting() == [jobs[0]]
        assert registry.jobs() == jobs
        # The loop monitor names an attempt only while it runs, and never another job.
        assert registry.attempt_of(jobs[1]) == "t1"
        assert registry.attempt_of(jobs[0]) is None
        assert registry.attempt_of(jobs[2]) is None
        assert registry.attempt_of(None) is None

        # A cancel stops the running attempt only, and says why.
        for i in range(3):
            registry.cancel_attempt(f"t{i}", "no longer needed")
        await asyncio.wait([jobs[1]], timeout=5)
        assert [job.done() for job in jobs] == [False, True, False]
        assert jobs[1].cancelled()
        assert running.cancel_reason == "no longer needed"
        assert waiting.cancel_reason is None and settling.cancel_reason is None

        registry.release(running)
        registry.release(running)  # releasing twice is harmless
        assert len(registry) == 2 and registry.attempt_of(jobs[1]) is None

        registry.cancel_all()
        await asyncio.gather(*jobs, return_exceptions=True)
        assert all(job.cancelled() for job in jobs)
    finally:
        for job in jobs:
            job.cancel()
