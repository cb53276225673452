"""The scheduler's in-memory state stays bounded whatever clients and announcements
send, and its error boundary is leveret's (pure logic, no broker)."""

from __future__ import annotations

import inspect
import pkgutil

import pytest

import leveret.scheduler
from leveret.contracts import TaskMessage, utcnow
from leveret.errors import SubmissionError
from leveret.scheduler.admission import MAX_ANNOUNCED_KINDS, KindCatalog
from leveret.scheduler.catalog import MAX_ANNOUNCED_POOLS, PoolCatalog, RequirementSets
from leveret.scheduler.ratelimit import RateLimiter
from leveret.scheduler.store import Submission


def sub(pool: str = "default", requires: tuple[str, ...] = ()) -> Submission:
    return Submission(
        TaskMessage(id="t", kind="echo", pool=pool, submitted_at=utcnow(), requires=requires)
    )


def test_rate_limit_buckets_stay_bounded_when_no_bucket_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(1, 10, clock=lambda: now[0], max_clients=100)
    for i in range(1000):  # each new client drains its bucket; none refills
        limiter.take(f"client-{i}", 10)
        now[0] += 0.001
    assert len(limiter._buckets) == 100
    # The most recently seen clients are the ones kept: still empty, still limited.
    assert limiter.take("client-999") > 0


def test_announced_kinds_and_pools_are_bounded() -> None:
    kinds = KindCatalog(["configured"])
    learned = kinds.add(f"k{i}" for i in range(MAX_ANNOUNCED_KINDS + 500))
    assert len(learned) == MAX_ANNOUNCED_KINDS
    assert kinds.add(["one-more"]) == set()
    assert "configured" in kinds and "echo" in kinds
    kinds.limit(["one-more", "k1"])
    assert kinds.limited == {"k1"}  # only known kinds are marked limited

    pools = PoolCatalog(["default"])
    assert len(pools.add(f"p{i}" for i in range(MAX_ANNOUNCED_POOLS + 10))) == MAX_ANNOUNCED_POOLS
    assert pools.add(["late"]) == set() and "late" not in pools
    assert len(pools) == MAX_ANNOUNCED_POOLS + 1


def test_an_unknown_pool_is_refused_naming_the_allowed_ones() -> None:
    pools = PoolCatalog(["default", "batch"])
    pools.check([sub("batch")])
    with pytest.raises(SubmissionError) as info:
        pools.check([sub("default"), sub("gpu")])
    assert (info.value.code, info.value.status) == ("unknown_pool", 422)
    assert "'gpu'" in info.value.message and "batch, default" in info.value.message


def test_requirement_sets_are_capped_per_pool_and_known_sets_still_work() -> None:
    sets = RequirementSets(2)
    first = sets.new_keys([sub(requires=("gpu",)), sub(requires=("gpu",)), sub()])
    assert first == {"default.req.gpu"}
    second = sets.new_keys([sub("batch", ("gpu",))], pending=first)  # another pool, another queue
    sets.add(first | second)
    with pytest.raises(SubmissionError) as info:
        sets.new_keys([sub(requires=("tpu",))])
    assert info.value.code == "too_many_requirement_sets" and "2" in info.value.message
    assert sets.new_keys([sub(requires=("gpu",)), sub()]) == set()
    # Sets pending in the same flush count towards the cap.
    with pytest.raises(SubmissionError):
        RequirementSets(1).new_keys([sub(requires=("b",))], pending={"default.req.a"})


def test_the_scheduler_has_no_transient_check_of_its_own() -> None:
    """Database and broker errors are classified at one boundary each (map_db_errors,
    map_broker_errors); no scheduler module decides what is transient itself."""
    for module in pkgutil.iter_modules(leveret.scheduler.__path__, "leveret.scheduler."):
        source = inspect.getsource(__import__(module.name, fromlist=["_"]))
        assert "is_transient" not in source, module.name
        assert "OperationalError" not in source, module.name
