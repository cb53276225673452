"""The two error boundaries (database, broker) and what admission does with each kind of
failure: transient ones reach the caller as UnavailableError (503 / retry), anything
else refuses only the request that causes it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiormq
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from leveret.amqp import BROKER_EXCEPTIONS, map_broker_errors
from leveret.contracts import SubmitTask
from leveret.db import map_db_errors
from leveret.errors import (
    BrokerError,
    PublishError,
    StoreError,
    StoreUnavailable,
    SubmissionError,
    UnavailableError,
)
from leveret.scheduler.admission import Admission, envelope, submission
from leveret.scheduler.store import Submission


class PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("SELECT 1", {}, Exception("database is locked")),
        DBAPIError(None, None, PgError("55000")),  # while connecting: no statement
        DBAPIError("UPDATE tasks", {}, PgError("57P01")),  # admin shutdown
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_transient_database_errors_become_store_unavailable(exc: Exception) -> None:
    with pytest.raises(StoreUnavailable) as info, map_db_errors():
        raise exc
    assert info.value.__cause__ is exc
    assert isinstance(info.value, UnavailableError)


@pytest.mark.parametrize(
    "exc",
    [
        IntegrityError("INSERT INTO tasks", {}, PgError("23505")),
        DBAPIError("INSERT INTO tasks", {}, PgError("22001")),
    ],
)
def test_other_database_errors_become_store_error(exc: Exception) -> None:
    with pytest.raises(StoreError) as info, map_db_errors():
        raise exc
    assert not isinstance(info.value, UnavailableError)


@pytest.mark.parametrize("kind", BROKER_EXCEPTIONS)
def test_every_broker_exception_becomes_broker_error(kind: type[Exception]) -> None:
    exc = kind() if kind is not aiormq.exceptions.ChannelInvalidStateError else kind("closed")
    with pytest.raises(BrokerError) as info, map_broker_errors():
        raise exc
    assert info.value.__cause__ is exc
    assert isinstance(info.value, UnavailableError)


def test_leveret_and_other_errors_pass_both_boundaries_unchanged() -> None:
    for exc in (PublishError("nack"), SubmissionError("x", "y"), ValueError("bug")):
        with pytest.raises(type(exc)) as info, map_db_errors(), map_broker_errors():
            raise exc
        assert info.value is exc


class FakeStore:
    """A store whose claim fails for good on a poisoned id, or for now while `down`."""

    def __init__(self) -> None:
        self.claimed: list[str] = []
        self.down = False

    async def lookup(self, ids: Any) -> dict[str, Any]:
        return {}

    async def claim(self, items: Sequence[tuple[Submission, str]]) -> dict[str, Any]:
        if self.down:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        if any(s.id == "poison" for s, _ in items):
            raise ValueError("a value the store cannot hold")
        self.claimed += [s.id for s, _ in items]
        return {}

    async def mark_dispatched(self, ids: Any) -> None:
        list(ids)


class FakeDispatcher:
    async def send(self, dispatch: Sequence[Submission], held: Any = ()) -> None:
        return None


def _sub(task_id: str) -> Submission:
    task = SubmitTask(kind="echo", id=task_id)
    return submission(task, envelope(task))


async def test_a_failing_request_is_refused_alone_and_its_batch_mates_admitted() -> None:
    store = FakeStore()
    admission = Admission(store, FakeDispatcher(), batch_wait_ms=50)  # type: ignore[arg-type]
    flusher = asyncio.create_task(admission.run())
    try:
        answers = await asyncio.gather(
            *(admission.submit([_sub(i)]) for i in ("a", "poison", "b")), return_exceptions=True
        )
        assert [a[0].status for a in (answers[0], answers[2])] == ["pending", "pending"]
        refusal = answers[1]
        assert isinstance(refusal, SubmissionError)
        assert (refusal.code, refusal.status) == ("unprocessable", 422)
        assert sorted(store.claimed) == ["a", "b"]
        store.down = True
        with pytest.raises(StoreUnavailable):
            await admission.submit([_sub("c")])
        store.down = False
        assert (await admission.submit([_sub("c")]))[0].status == "pending"
    finally:
        flusher.cancel()
