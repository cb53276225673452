"""Task handlers: how users write them, how workers find them, and the built-ins.

A handler is a plain function ``(ctx, payload) -> result``, ``async def`` or not::

    from leveret import TaskContext, task

    @task("resize")
    async def resize(ctx: TaskContext, payload: dict) -> dict:
        ...

    @task("checksum", blocking=True)      # sync: runs in a child process, off the event loop
    def checksum(ctx: TaskContext, payload: str) -> str:
        ...

``leveret worker --handlers myapp.tasks`` imports the module and registers every
function marked with :func:`task` (and every entry of a module-level
``HANDLERS`` dict). Nothing is registered globally: a registry belongs to a worker.

Handlers run at least once: they get ``ctx.attempt`` and ``ctx.idempotency_key``
(stable across attempts) to make their side effects idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from loguru import logger
from pydantic import JsonValue

from leveret import builtin_http, builtin_shell
from leveret.builtin_http import HttpPolicy
from leveret.errors import ConfigError, TaskFailed

HandlerFunc = Callable[["TaskContext", Any], Awaitable[Any] | Any]

_MARK = "__leveret_task__"

#: How a context hands progress to the worker: ``(fraction, message)``.
ProgressReporter = Callable[[float | None, str | None], None]

#: Kinds every worker has. `shell` is left out: a worker offers it only when enabled.
BUILTIN_KINDS = ("echo", "sleep", "fail", "http")

#: A progress message holds at most this many characters (`TaskProgress.message`).
MAX_PROGRESS_MESSAGE_CHARS = 1000

#: What `http` may reach on a worker given no settings: nothing local or private.
DEFAULT_HTTP_POLICY = HttpPolicy()


def clip(text: str, limit: int) -> str:
    """`text` held to `limit` characters, a cut marked with the length it had. Lone
    surrogates (JSON cannot carry them; an exception's text may hold some) are escaped."""
    total = len(text)
    head = text[:limit]
    try:
        head.encode()
    except UnicodeEncodeError:
        head = head.encode("utf-8", "backslashreplace").decode()
    if total <= limit and len(head) <= limit:
        return head
    marker = f"… [truncated, {total} characters in all]"
    return head[: max(limit - len(marker), 0)] + marker


@dataclass(frozen=True)
class TaskContext:
    """What a handler knows about the attempt it runs."""

    task_id: str
    kind: str
    pool: str
    attempt: int
    worker_id: str
    submitted_at: datetime
    timeout_s: float | None = None
    reporter: ProgressReporter | None = field(default=None, compare=False, repr=False)

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of the same task: use it to dedupe side effects."""
        return self.task_id

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Report how far the attempt got (`fraction` in 0..1) and/or what it is doing.

        Cheap to call often: the worker forwards at most a few updates per second
        (always the latest) to `leveret.events` and the producer's `reply_to`.
        Works the same in async handlers and in sync ones running in a child process.
        A message longer than 1000 characters is cut, the cut marked.
        """
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be within 0..1, got {fraction}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"progress message must be a string, got {type(message).__name__}")
        if self.reporter is not None:
            text = clip(message, MAX_PROGRESS_MESSAGE_CHARS) if message else message
            self.reporter(fraction, text)

    def __getstate__(self) -> dict[str, Any]:
        # The reporter talks to this process's broker connection: a child process
        # gets its own (see leveret.worker.isolation), so it is not pickled.
        state = {f: getattr(self, f) for f in self.__dataclass_fields__}
        state["reporter"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class Handler:
    """A registered handler: its kind, function and whether it blocks."""

    kind: str
    func: HandlerFunc
    blocking: bool
    advertised: bool = True  # announced to the scheduler as a kind this worker runs
    timeout_s: float | None = None  # for tasks of this kind that set no timeout_s
    max_retries: int = 0  # for tasks of this kind that set no max_retries
    max_running: int | None = None  # cluster-wide: attempts of this kind at once
    max_starts_per_s: float | None = None  # cluster-wide: starts of this kind per second


def task(
    kind: str,
    *,
    blocking: bool | None = None,
    timeout_s: float | None = None,
    max_retries: int = 0,
    max_running: int | None = None,
    max_starts_per_s: float | None = None,
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Mark a function as the handler of `kind` (found by ``--handlers module``).

    `blocking` defaults to "not a coroutine function": sync handlers run in a
    child process so they can neither starve the worker's heartbeats nor outlive
    their timeout. `timeout_s` and `max_retries` are this kind's defaults for
    tasks that do not set their own. `max_running` and `max_starts_per_s` limit the
    kind across all workers together (see ``leveret.worker.limits``).
    """

    def mark(func: HandlerFunc) -> HandlerFunc:
        setattr(
            func,
            _MARK,
            {
                "blocking": blocking,
                "kind": kind,
                "timeout_s": timeout_s,
                "max_retries": max_retries,
                "max_running": max_running,
                "max_starts_per_s": max_starts_per_s,
            },
        )
        return func

    return mark


@dataclass
class Registry:
    """The handlers one worker offers, by kind."""

    handlers: dict[str, Handler] = field(default_factory=dict)

    def register(
        self,
        kind: str,
        func: HandlerFunc,
        *,
        blocking: bool | None = None,
        advertised: bool = True,
        timeout_s: float | None = None,
        max_retries: int = 0,
        max_running: int | None = None,
        max_starts_per_s: float | None = None,
    ) -> None:
        """Register `func` as the handler of `kind` (replacing any earlier one)."""
        if blocking is None:
            blocking = not inspect.iscoroutinefunction(func)
        self.handlers[kind] = Handler(
            kind,
            func,
            blocking,
            advertised,
            timeout_s,
            max_retries,
            max_running,
            max_starts_per_s,
        )

    def get(self, kind: str) -> Handler | None:
        """The handler of `kind`, or None."""
        return self.handlers.get(kind)

    def kinds(self) -> list[str]:
        """Every kind this worker offers (announces), sorted."""
        return sorted(k for k, h in self.handlers.items() if h.advertised)

    def load_module(self, path: str) -> int:
        """Import `path` and register its marked functions and its ``HANDLERS`` dict."""
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise ConfigError(f"cannot import handler module {path!r}: {exc}") from exc
        found = 0
        for func, options in _marked(module):
            self.register(func=func, **options)
            found += 1
        table = getattr(module, "HANDLERS", None)
        if isinstance(table, dict):
            for kind, func in table.items():
                self.register(str(kind), func)
                found += 1
        if not found:
            raise ConfigError(f"handler module {path!r} defines no @task functions or HANDLERS")
        return found

    @classmethod
    def with_builtins(
        cls,
        *,
        shell_enabled: bool = False,
        http: HttpPolicy = DEFAULT_HTTP_POLICY,
        shell_env: Sequence[str] = (),
    ) -> Registry:
        """A registry holding the built-in kinds (plus `shell` when enabled): `http`
        reaches what `http` allows, `shell` commands get the variables `shell_env` names."""
        registry = cls()
        registry.register("echo", echo)
        registry.register("sleep", sleep)
        registry.register("fail", fail)
        registry.register("http", functools.partial(http_get, policy=http), blocking=False)
        if shell_enabled:
            env = tuple(shell_env)
            registry.register("shell", functools.partial(shell, env_names=env), blocking=False)
        else:  # still registered, so a stray shell task fails with a clear reason
            registry.register("shell", shell_disabled, advertised=False)
        return registry


def _marked(module: object) -> Iterator[tuple[HandlerFunc, dict[str, Any]]]:
    for value in vars(module).values():
        mark = getattr(value, _MARK, None)
        if isinstance(mark, dict):
            yield cast(HandlerFunc, value), mark


# --- built-ins -------------------------------------------------------------------------------


async def echo(ctx: TaskContext, payload: JsonValue) -> JsonValue:
    """Return the payload unchanged."""
    return payload


async def sleep(ctx: TaskContext, payload: JsonValue) -> float:
    """Sleep `payload` seconds (a number, or a string holding one); return it."""
    try:
        seconds = float(payload)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TaskFailed(
            f"sleep wants a number of seconds, got {payload!r}", "bad_payload"
        ) from exc
    if not 0 <= seconds <= 24 * 3600:
        raise TaskFailed(f"sleep seconds out of range: {seconds}", "bad_payload")
    await asyncio.sleep(seconds)
    return seconds


async def fail(ctx: TaskContext, payload: JsonValue) -> None:
    """Always fail (for demos and tests); the payload, if a string, is the message."""
    message = payload if isinstance(payload, str) and payload else "failed on purpose"
    raise TaskFailed(message, "requested_failure")


async def http_get(
    ctx: TaskContext, payload: JsonValue, policy: HttpPolicy = DEFAULT_HTTP_POLICY
) -> dict[str, JsonValue]:
    """GET the URL in `payload` (a string, or ``{"url": ..., "timeout_s": ...}``): its
    status, body size, final URL and the time taken. Loopback, private and link-local
    hosts are refused unless the worker allows them (see :mod:`leveret.builtin_http`)."""
    url, asked = builtin_http.parse_payload(payload)
    return await builtin_http.fetch(url, policy, builtin_http.deadline_s(asked, ctx.timeout_s))


async def shell(
    ctx: TaskContext, payload: JsonValue, env_names: Sequence[str] = ()
) -> dict[str, JsonValue]:
    """Run `payload` with /bin/sh; fail on a non-zero exit. A clean environment (PATH and
    what `env_names` passes through), its own process group, output capped at 64 KiB
    each (see :mod:`leveret.builtin_shell`)."""
    if not isinstance(payload, str) or not payload.strip():
        raise TaskFailed("shell wants a command string", "bad_payload")
    ran = await builtin_shell.run(payload, builtin_shell.environment(env_names))
    if ran.exit_code != 0:
        raise TaskFailed(f"exit status {ran.exit_code}: {ran.stderr.strip()[-500:]}", "exit_status")
    return {"exit_code": ran.exit_code, "stdout": ran.stdout, "stderr": ran.stderr}


async def shell_disabled(ctx: TaskContext, payload: JsonValue) -> None:
    """Stand-in for `shell` on workers started without ``--shell``."""
    logger.warning("shell task refused: this worker runs without --shell")
    raise TaskFailed(
        "shell tasks are disabled on this worker (start it with --shell)", "shell_disabled"
    )
