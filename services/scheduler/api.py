"""The scheduler's HTTP API: ``POST /tasks`` and ``POST /tasks/batch``.

A 202 means the task is durably on its work queue (publisher confirm received).
Bad input gets a 4xx whose ``detail`` says what is wrong:
400 (not UTF-8, not JSON, not an object), 413 (too large, by ``Content-Length``
before the body is read, or as soon as a chunked body passes the limit; too many
dependency edges), 422 (schema, out of bounds, unknown kind, unknown pool, one
requirement set too many, unsupported field, unknown parent, dependency cycle,
unprocessable); 408 (``body_timeout``: the body did not arrive whole within
``LEVERET_HTTP_BODY_TIMEOUT_S``); 503 + Retry-After when the broker or store cannot
take it now (any :class:`UnavailableError`), or when the bodies the API holds at once
would pass their budget (`busy`). Never a 500. A 202 for a held task
(status `delayed` or `blocked`) means it is durably in the scheduler's store.
With API tokens configured (:mod:`leveret.auth`): 401 without a valid token, 403
without the route's scope (`submit`, `cancel`) or for cancelling another token's
task; a body that is not ``application/json`` is a 415.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from loguru import logger
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from leveret import __version__
from leveret.auth import Access, Principal, Scope, may_cancel, open_access
from leveret.contracts import Accepted, CancelTask, SubmitBatch, SubmitTask
from leveret.db import map_db_errors
from leveret.errors import SubmissionError, UnavailableError
from leveret.scheduler.admission import (
    Admission,
    KindCatalog,
    check_graph,
    check_json_bounds,
    check_payload_size,
    check_supported,
    decode_json,
    describe,
    envelope,
    parse_body,
    submission,
    unprocessable,
)
from leveret.scheduler.cancel import CancelAnswer, request_cancel
from leveret.scheduler.ratelimit import RateLimiter
from leveret.scheduler.store import Submission

#: A batch body may hold many tasks; each one's payload is still held to the task limit.
BATCH_BODY_FACTOR = 64
#: What one request takes of the body budget at least: handling it costs memory too.
MIN_RESERVATION = 64 * 1024


class BodyBudget:
    """The bytes of request bodies the API holds at once, all requests together, at most
    `limit`. A request with a ``Content-Length`` reserves it before a byte is read; one
    without (chunked) reserves as its bytes arrive, so a slow client holds only what it
    sent. A request that does not fit, at first or while its body grows, is answered
    503 ``busy`` with ``Retry-After``. A request alone always fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def hold(self, request: Request, most: int) -> Iterator[Reservation]:
        """Reserve room for `request`'s body for the time of the block."""
        declared = request.headers.get("content-length", "")
        reservation = Reservation(self)
        # A declared length over `most` is refused unread: it needs no more than the least.
        reservation.grow(int(declared) if declared.isdigit() and int(declared) <= most else 0)
        try:
            yield reservation
        finally:
            self.used -= reservation.held


class Reservation:
    """One request's share of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, size: int) -> None:
        """Hold room for `size` bytes (at least `MIN_RESERVATION`, at most the whole
        budget); 503 ``busy`` when the other requests leave too little."""
        budget = self.budget
        need = min(max(size, MIN_RESERVATION), budget.limit)
        if need <= self.held:
            return
        others = budget.used - self.held
        if others and others + need > budget.limit:
            raise SubmissionError(
                "busy",
                f"the scheduler holds {budget.used} bytes of submissions (the limit is "
                f"{budget.limit}); retry shortly",
                503,
            )
        budget.used += need - self.held
        self.held = need


def _error(err: SubmissionError, index: int | None = None) -> JSONResponse:
    detail: dict[str, Any] = {"error": err.code, "message": err.message}
    if index is not None:
        detail["index"] = index
    headers = {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse({"detail": detail}, status_code=err.status, headers=headers)


def _unknown(task_id: str) -> JSONResponse:
    return _error(SubmissionError("unknown_task", f"no task {task_id!r} was accepted", 404))


def _unavailable(exc: BaseException) -> JSONResponse:
    logger.warning("submission not accepted now: {}", exc)
    return JSONResponse(
        {"detail": {"error": "unavailable", "message": f"cannot accept tasks now: {exc}"}},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _unavailable_handler(_request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After while the scheduler's database or broker is unavailable."""
    return _unavailable(exc)


async def read_body(
    request: Request,
    limit: int,
    reservation: Reservation,
    timeout_s: float,
    what: str = "submission",
) -> bytes:
    """The request body, refused (413) by its ``Content-Length`` before any of it is
    read, or, without one (chunked), as soon as what has arrived passes `limit`.
    `reservation` grows with what arrives; a body not whole within `timeout_s` is a 408."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise SubmissionError(
            "payload_too_large", f"{what} is {declared} bytes; the limit is {limit}", 413
        )
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise SubmissionError(
                        "payload_too_large", f"{what} is over {limit} bytes, the limit", 413
                    )
                reservation.grow(len(body))
    except ClientDisconnect as exc:
        raise SubmissionError(
            "incomplete_body", "the client left before its body ended", 400
        ) from exc
    except TimeoutError as exc:
        raise SubmissionError(
            "body_timeout", f"the {what} body did not arrive whole within {timeout_s:g} s", 408
        ) from exc
    return bytes(body)


def _decode(body: bytes, max_bytes: int) -> SubmitTask:
    """:func:`parse_body`, with anything unexpected also answered as a refusal."""
    try:
        return parse_body(body, max_bytes)
    except SubmissionError:
        raise
    except Exception as exc:  # the decoder is meant to be total; a 4xx, never a 500
        logger.opt(exception=exc).error("submission not decodable")
        raise unprocessable(exc) from exc


def _body_schema(model: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


class _Routes:
    """The route handlers, bound to one admission pipeline."""

    def __init__(
        self,
        admission: Admission,
        kinds: KindCatalog,
        max_bytes: int,
        limiter: RateLimiter,
        budget: BodyBudget,
        body_timeout_s: float,
    ) -> None:
        self.admission = admission
        self.kinds = kinds
        self.max_bytes = max_bytes
        self.limiter = limiter
        self.budget = budget
        self.body_timeout_s = body_timeout_s

    def _throttle(self, request: Request, tasks: int) -> JSONResponse | None:
        """429 with Retry-After when this client is over its submission rate."""
        client = _client_of(request)
        wait = self.limiter.take(client, tasks)
        if not wait:
            return None
        if math.isinf(wait):
            burst = int(self.limiter.burst)
            err = SubmissionError(
                "rate_limited", f"{tasks} tasks at once exceed this client's burst of {burst}", 413
            )
            return _error(err)
        retry = max(1, math.ceil(wait))
        message = f"client {client!r} is over {self.limiter.rate:g} tasks/s; retry in {retry} s"
        return JSONResponse(
            {"detail": {"error": "rate_limited", "message": message}},
            status_code=429,
            headers={"Retry-After": str(retry)},
        )

    async def submit(self, request: Request) -> JSONResponse:
        """Submit one task. 202 when accepted; 200 with status `duplicate` for a known id."""
        try:
            with self.budget.hold(request, self.max_bytes) as reservation:
                return await self._submit(request, reservation)
        except SubmissionError as err:
            return _error(err)

    async def _submit(self, request: Request, reservation: Reservation) -> JSONResponse:
        try:
            body = await read_body(request, self.max_bytes, reservation, self.body_timeout_s)
            task = _decode(body, self.max_bytes)
            check_supported(task, self.kinds)
            work = _owned(submission(task, envelope(task)), request)
            check_graph([work])
            if (limited := self._throttle(request, 1)) is not None:
                return limited
            [answer] = await self.admission.submit([work])
        except SubmissionError as err:
            return _error(err)
        except UnavailableError as exc:
            return _unavailable(exc)
        code = 200 if answer.status == "duplicate" else 202
        return JSONResponse(answer.model_dump(), status_code=code)

    async def submit_batch(self, request: Request) -> JSONResponse:
        """Submit many tasks at once (all or none are accepted): ``{"tasks": [...]}``."""
        try:
            with self.budget.hold(request, self.max_bytes * BATCH_BODY_FACTOR) as reservation:
                return await self._submit_batch(request, reservation)
        except SubmissionError as err:
            return _error(err)

    async def _submit_batch(self, request: Request, reservation: Reservation) -> JSONResponse:
        most = self.max_bytes * BATCH_BODY_FACTOR
        try:
            body = await read_body(request, most, reservation, self.body_timeout_s, "batch")
            works = [_owned(work, request) for work in self._batch(body)]
        except SubmissionError as err:
            return _error(err, getattr(err, "index", None))
        except Exception as exc:  # the decoder is meant to be total; a 4xx, never a 500
            logger.opt(exception=exc).error("batch not decodable")
            return _error(unprocessable(exc))
        if (limited := self._throttle(request, len(works))) is not None:
            return limited
        try:
            check_graph(works)
            answers = await self.admission.submit(works)
        except SubmissionError as err:
            return _error(err)
        except UnavailableError as exc:
            return _unavailable(exc)
        return JSONResponse({"tasks": [a.model_dump() for a in answers]}, status_code=202)

    def _batch(self, body: bytes) -> list[Submission]:
        works: list[Submission] = []
        for index, task in enumerate(_parse_batch(body).tasks):
            try:
                check_json_bounds(task.payload, f"tasks[{index}].payload")
                check_payload_size(task, self.max_bytes)
                check_supported(task, self.kinds)
                works.append(submission(task, envelope(task)))
            except SubmissionError as err:
                err.index = index  # type: ignore[attr-defined]
                raise
        return works

    async def cancel(self, task_id: str, request: Request) -> JSONResponse:
        """Cancel a task: 202 while it is being cancelled, 404 unknown, 409 finished,
        403 when another token submitted it."""
        try:
            command = CancelTask(id=task_id)
        except ValidationError:
            return _error(SubmissionError("invalid_id", f"invalid task id {task_id!r}", 404))
        try:
            if (refused := await self._not_yours(task_id, request)) is not None:
                return refused
            answer = await request_cancel(self.admission.store, self.admission.dispatcher, command)
        except UnavailableError as exc:
            return _unavailable(exc)
        except Exception as exc:  # the store refused for good (StoreError), or a bug: no 500
            logger.opt(exception=exc).error("cancellation of {} failed", task_id)
            err = unprocessable(exc)
            err.message = f"cannot cancel task {task_id!r}: {err.message}"
            return _error(err)
        if answer is CancelAnswer.UNKNOWN:
            return _unknown(task_id)
        if answer is CancelAnswer.FINISHED:
            return _error(SubmissionError("finished", f"task {task_id!r} already ended", 409))
        return JSONResponse({"id": task_id, "status": answer.value}, status_code=202)

    async def _not_yours(self, task_id: str, request: Request) -> JSONResponse | None:
        """403 when the caller may not cancel this task (not its submitter, not admin);
        404 when there is no such task, whoever asks."""
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            return None
        store = self.admission.store
        if may_cancel(principal, await store.owner_of(task_id)):
            return None
        # owner_of is None for an unknown id too: tell it from a task without an owner.
        with map_db_errors():
            known = await store.lookup([task_id])
        if task_id not in known:
            return _unknown(task_id)
        message = f"task {task_id!r} was submitted with another token"
        return _error(SubmissionError("forbidden", message, 403))

    async def healthz(self) -> dict[str, Any]:
        """Liveness and a few counters."""
        return {
            "status": "ok",
            "accepted": self.admission.accepted,
            "duplicates": self.admission.duplicates,
            "kinds": self.kinds.names(),
            "pools": self.admission.pools.names() if self.admission.pools else None,
        }


def create_app(
    admission: Admission,
    kinds: KindCatalog,
    *,
    max_bytes: int,
    limiter: RateLimiter | None = None,
    body_budget_bytes: int = 256 * 1024 * 1024,
    body_timeout_s: float = 30.0,
    access: Access | None = None,
) -> FastAPI:
    """The scheduler's FastAPI app (no module-level app object); `access`: who may call
    it (default: anyone)."""
    access = access or open_access()
    submit, cancel = (
        [Depends(access.guard.require(Scope.SUBMIT, json_body=True))],
        [Depends(access.guard.require(Scope.CANCEL))],
    )
    app = FastAPI(
        title="leveret scheduler",
        version=__version__,
        description="Submit tasks. Results: the tracker API or the leveret.results exchange.",
    )
    limiter = limiter or RateLimiter(0, 1)
    routes = _Routes(
        admission, kinds, max_bytes, limiter, BodyBudget(body_budget_bytes), body_timeout_s
    )
    app.post(
        "/tasks",
        status_code=202,
        response_model=Accepted,
        openapi_extra=_body_schema("SubmitTask"),
        responses={200: {"model": Accepted, "description": "Duplicate id: the existing task"}},
        dependencies=submit,
    )(routes.submit)
    app.post(
        "/tasks/batch",
        status_code=202,
        openapi_extra=_body_schema("SubmitBatch"),
        dependencies=submit,
    )(routes.submit_batch)
    app.delete("/tasks/{task_id}", status_code=202, dependencies=cancel)(routes.cancel)
    app.add_exception_handler(UnavailableError, _unavailable_handler)
    app.get("/healthz")(routes.healthz)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    access.protect(app)
    return app


def _client_of(request: Request) -> str:
    """Whom the rate limit counts: the calling token's id with tokens configured, else
    the peer address. Never a header the caller chooses (``X-Client-Id`` is ignored)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None:
        return f"token {principal.id}"
    return request.client.host if request.client else "unknown"


def _owned(work: Submission, request: Request) -> Submission:
    """`work` marked as the calling token's (when tokens are configured)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return work if principal is None else dataclasses.replace(work, owner=principal.id)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated OpenAPI document plus the submission models' schemas."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (SubmitTask, SubmitBatch):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in model_schema.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


def _parse_batch(body: bytes) -> SubmitBatch:
    """Parse a batch body; like :func:`parse_body` but for ``{"tasks": [...]}``."""
    data = decode_json(body)
    if not isinstance(data, dict):
        raise SubmissionError("not_an_object", "body must be a JSON object", 400)
    try:
        return SubmitBatch.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError("invalid_task", describe(exc), 422) from exc
