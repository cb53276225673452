"""The tracker's HTTP API: task status and results, workers, statistics, health.

An id the tracker never heard of is a 404 ("unknown task"), never `pending`. A task
that retention purged (finished more than ``LEVERET_RETENTION`` ago) is a 410 Gone
while its id is remembered (one more retention period), then a 404 whose message
names retention. While the database cannot be reached (or stays locked), every read
answers 503 with ``Retry-After``; a statement the database refuses for good answers
500 with a message (both JSON, never a traceback). With API tokens configured
(:mod:`leveret.auth`) every route but ``/healthz`` needs the `read` scope: 401
without a valid token, 403 without the scope.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from loguru import logger
from pydantic import BaseModel, JsonValue
from sqlalchemy.exc import SQLAlchemyError

from leveret.auth import Access, Scope, open_access
from leveret.contracts import TaskStatus, utcnow
from leveret.db import map_db_errors
from leveret.errors import LeveretError, StoreError, StoreUnavailable
from leveret.settings import TrackerSettings
from leveret.tracker.purge import PurgedTask
from leveret.tracker.retention import format_duration
from leveret.tracker.state import AttemptOutcome, TaskRecord
from leveret.tracker.store import MAX_PAGE, InvalidCursor, TrackerStore
from leveret.tracker.workers import Death, WorkerState, WorkerView, unmet_requirements

#: Seconds a client is asked to wait when the database is unavailable.
RETRY_AFTER_S = 1


class ErrorView(BaseModel):
    """Why a task failed or was rejected."""

    type: str
    message: str


class AttemptView(BaseModel):
    """One run of a task."""

    attempt: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    outcome: AttemptOutcome | None


class TaskSummary(BaseModel):
    """A task in a list: status, error, who ran it and when (no result, no history)."""

    id: str
    kind: str | None
    pool: str | None
    status: TaskStatus
    error: ErrorView | None
    attempt: int
    worker: str | None
    correlation_id: str | None
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_at: datetime | None = None


class TaskView(TaskSummary):
    """One task in full: its result and every attempt."""

    result: JsonValue = None
    attempts: list[AttemptView]
    run_at: datetime | None = None
    depends_on: list[str] = []
    requires: list[str] = []
    waiting_for: str | None = None
    progress: ProgressView | None = None


class ProgressView(BaseModel):
    """The latest progress report of the running attempt."""

    fraction: float | None
    message: str | None
    at: datetime


class TaskPageView(BaseModel):
    """A page of `GET /tasks`; pass `next_cursor` back as `cursor` for the next one."""

    tasks: list[TaskSummary]
    next_cursor: str | None


class WorkerStatsView(BaseModel):
    """A worker's recorded results."""

    id: str
    state: WorkerState
    completed: int
    failed: int
    busy_s: float


class WorkerInfoView(WorkerStatsView):
    """A registered worker."""

    host: str
    pid: int
    pool: str
    concurrency: int
    kinds: list[str]
    capabilities: list[str]
    version: str
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None
    dead_at: datetime | None
    death: Death | None
    in_flight: list[str]


class WorkersView(BaseModel):
    """Body of `GET /workers`."""

    workers: list[WorkerInfoView]


class ThroughputView(BaseModel):
    """Completed + failed tasks per second."""

    last_60s: float
    overall: float


class LatencyView(BaseModel):
    """Submitted → finished seconds over recent terminal tasks (nearest rank)."""

    p50: float | None
    p95: float | None
    p99: float | None
    sample: int


class StatsView(BaseModel):
    """Body of `GET /stats`: `counts` and `total` include the tasks retention purged."""

    counts: dict[TaskStatus, int]
    total: int
    purged: int = 0
    throughput: ThroughputView
    latency_s: LatencyView
    workers: list[WorkerStatsView]


def _summary_fields(t: TaskRecord) -> dict[str, object]:
    error = None
    if t.error_type is not None:
        error = ErrorView(type=t.error_type, message=t.error_message or "")
    return {
        "id": t.id,
        "kind": t.kind,
        "pool": t.pool,
        "status": t.status,
        "error": error,
        "attempt": t.attempt,
        "worker": t.worker,
        "correlation_id": t.correlation_id,
        "submitted_at": t.submitted_at,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        "retry_at": t.retry_at,
    }


def task_view(t: TaskRecord, waiting_for: str | None = None) -> TaskView:
    """The full view of a record; `waiting_for` says why a queued task cannot start."""
    history = [
        AttemptView(
            attempt=a.attempt,
            worker=a.worker,
            started_at=a.started_at,
            finished_at=a.finished_at,
            outcome=a.outcome,
        )
        for a in t.attempts
    ]
    return TaskView.model_validate(
        {
            **_summary_fields(t),
            "result": t.result,
            "attempts": history,
            "run_at": t.run_at,
            "depends_on": list(t.depends_on),
            "requires": list(t.requires),
            "waiting_for": waiting_for,
            "progress": None
            if t.progress is None
            else {
                "fraction": t.progress.fraction,
                "message": t.progress.message,
                "at": t.progress.at,
            },
        }
    )


def _worker_stats(w: WorkerView) -> WorkerStatsView:
    c = w.counters
    return WorkerStatsView(
        id=w.id, state=w.state, completed=c.completed, failed=c.failed, busy_s=round(c.busy_s, 3)
    )


def _worker_info(w: WorkerView) -> WorkerInfoView:
    r = w.record
    assert r is not None  # only registered workers are listed
    return WorkerInfoView(
        **_worker_stats(w).model_dump(),
        host=r.host,
        pid=r.pid,
        pool=r.pool,
        concurrency=r.concurrency,
        kinds=list(r.kinds),
        capabilities=list(r.capabilities),
        version=r.version,
        started_at=r.started_at,
        last_seen=r.last_seen,
        stopped_at=r.stopped_at,
        dead_at=r.dead_at,
        death=r.death,
        in_flight=list(r.in_flight),
    )


async def _store_failed(_request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After while the database is unavailable; 500 with a message when it
    refused a statement for good. A database error that escaped the store's own
    mapping is mapped here, at the API's boundary."""
    if not isinstance(exc, LeveretError):
        try:
            with map_db_errors():
                raise exc
        except LeveretError as mapped:
            exc = mapped
    if isinstance(exc, StoreUnavailable):
        logger.warning("tracker API: {}", exc)
        return JSONResponse(
            {"detail": {"error": "unavailable", "message": str(exc)}},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    logger.opt(exception=exc).error("tracker API: {}", exc)
    return JSONResponse({"detail": {"error": "store_error", "message": str(exc)}}, status_code=500)


async def _find(store: TrackerStore, task_id: str, retention_s: float) -> TaskRecord:
    """The task, or the 404/410 that says why there is none."""
    if "\x00" in task_id:  # no store can hold it (PostgreSQL refuses it in text)
        raise _not_found(task_id, None, retention_s)
    record = await store.get_task(task_id)
    if record is None:
        purged = await store.purged_task(task_id) if retention_s > 0 else None
        raise _not_found(task_id, purged, retention_s)
    return record


def _not_found(task_id: str, purged: PurgedTask | None, retention_s: float) -> HTTPException:
    """410 for a purged task still remembered, else 404 (naming retention when it is on)."""
    kept = format_duration(retention_s)
    if purged is not None:
        finished = purged.finished_at.isoformat() if purged.finished_at else "unknown"
        return HTTPException(
            410,
            f"task {task_id!r} ended {purged.status} (finished {finished}) more than {kept} "
            "ago and was purged (LEVERET_RETENTION)",
        )
    if retention_s > 0:
        return HTTPException(
            404,
            f"unknown task {task_id!r} (never heard of, or finished more than {kept} ago "
            "and purged: LEVERET_RETENTION)",
        )
    return HTTPException(404, f"unknown task {task_id!r}")


def _handle_store_errors(app: FastAPI) -> None:
    """Store failures answer JSON (503 or 500 with a message), never a traceback."""
    for error in (StoreError, StoreUnavailable, SQLAlchemyError, OSError):
        app.add_exception_handler(error, _store_failed)


def create_app(
    store: TrackerStore,
    settings: TrackerSettings,
    *,
    consuming: Callable[[], bool] = lambda: False,
    clock: Callable[[], datetime] = utcnow,
    access: Access | None = None,
) -> FastAPI:
    """The tracker API over `store`; `consuming` tells `/healthz` whether the consumer runs;
    `access`: who may call it (default: anyone)."""
    access = access or open_access()
    read = [Depends(access.guard.require(Scope.READ))]
    app = FastAPI(
        title="leveret tracker",
        version="1",
        summary=f"Task status, results and workers of namespace {settings.namespace!r}.",
    )
    access.protect(app)

    _handle_store_errors(app)

    @app.get(
        "/tasks/{task_id}",
        response_model=TaskView,
        responses={404: {"description": "Unknown task"}, 410: {"description": "Purged"}},
        dependencies=read,
    )
    async def get_task(task_id: str) -> TaskView:
        """A task's status, result or error, attempts and timestamps. 410 Gone for a task
        retention purged (finished more than `LEVERET_RETENTION` ago)."""
        record = await _find(store, task_id, settings.retention)
        waiting_for = None
        if record.requires and record.status in (TaskStatus.PENDING, TaskStatus.RETRYING):
            workers = await store.list_workers(clock())
            waiting_for = unmet_requirements(record.pool, record.requires, workers)
        return task_view(record, waiting_for)

    @app.get("/tasks", response_model=TaskPageView, dependencies=read)
    async def list_tasks(
        status: TaskStatus | None = None,
        kind: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: str | None = None,
    ) -> TaskPageView:
        """Tasks newest first, filtered by status and kind, one page at a time."""
        if kind is not None and "\x00" in kind:  # no task has it (PostgreSQL refuses it)
            return TaskPageView(tasks=[], next_cursor=None)
        try:
            page = await store.list_tasks(status=status, kind=kind, limit=limit, cursor=cursor)
        except InvalidCursor as exc:
            raise HTTPException(422, str(exc)) from exc
        return TaskPageView(
            tasks=[TaskSummary.model_validate(_summary_fields(t)) for t in page.tasks],
            next_cursor=page.next_cursor,
        )

    @app.get("/workers", response_model=WorkersView, dependencies=read)
    async def list_workers() -> WorkersView:
        """Every registered worker: state, last heartbeat, tasks in flight, recorded results."""
        views = await store.list_workers(clock())
        return WorkersView(workers=[_worker_info(w) for w in views])

    @app.get("/stats", response_model=StatsView, dependencies=read)
    async def stats() -> StatsView:
        """Counts by status, throughput, latency percentiles and per-worker totals."""
        s = await store.stats(clock())
        return StatsView(
            counts=s.counts,
            total=s.total,
            purged=s.purged,
            throughput=ThroughputView(last_60s=s.throughput_60s, overall=s.throughput_overall),
            latency_s=LatencyView(
                p50=s.latency_s["p50"],
                p95=s.latency_s["p95"],
                p99=s.latency_s["p99"],
                sample=s.latency_sample,
            ),
            workers=[_worker_stats(w) for w in s.workers],
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 when the database answers and the consumer runs; 503 otherwise."""
        problems: list[str] = []
        try:
            await store.ping()
        except LeveretError as exc:
            logger.warning("health check: database unreachable: {}", exc)
            problems.append("database unreachable")
        if not consuming():
            problems.append("not consuming")
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
