"""leveret's exceptions. Lower-layer errors are translated at one boundary each with
``raise … from exc``: aio-pika/aiormq by :func:`leveret.amqp.map_broker_errors`,
SQLAlchemy and the database drivers by :func:`leveret.db.map_db_errors`.

::

    LeveretError
    ├── ConfigError            settings that cannot work
    ├── UnavailableError       transient: the broker or the store cannot serve now; retry
    │   ├── BrokerError        the broker refused or could not be reached
    │   │   └── PublishError   a message was not confirmed (nack, unroutable, lost)
    │   └── StoreUnavailable   the database is unreachable, locked or refusing sessions
    ├── StoreError             the database refused a statement (retrying will not help)
    ├── SubmissionError        a submission is invalid; carries an HTTP status and a code
    └── TaskFailed             raised by a handler to fail its task with a chosen type
        └── BlockedEventLoop   raised inside an async handler that blocks the worker's loop
"""

from __future__ import annotations


class LeveretError(Exception):
    """Base class of every error leveret raises on purpose."""


class ConfigError(LeveretError):
    """Settings that cannot work (bad URL, unknown handler module, …)."""


class UnavailableError(LeveretError):
    """A dependency (broker or database) cannot serve now; the same call may succeed later."""


class StoreUnavailable(UnavailableError):
    """The database is unreachable, locked, or refusing new sessions for now."""


class StoreError(LeveretError):
    """The database refused a statement for good (a constraint, a value it cannot hold)."""


class BrokerError(UnavailableError):
    """The broker refused an operation or could not be reached."""


class PublishError(BrokerError):
    """A publish was not confirmed: nacked, returned as unroutable, or the channel died."""


class SubmissionError(LeveretError):
    """A submission is invalid. `code` is machine-readable; `status` is the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class TaskFailed(LeveretError):
    """Raise from a handler to fail the task with an explicit error `type` and message."""

    def __init__(self, message: str, type: str = "task_failed") -> None:
        super().__init__(message)
        self.type = type


class BlockedEventLoop(TaskFailed):
    """Raised *inside* an async handler that blocked the worker's event loop (a blocking
    call in ``async def``), by the worker's loop monitor (``leveret.worker.loopwatch``):
    its attempt fails with type ``blocked_event_loop`` instead of the worker being fenced."""

    TYPE = "blocked_event_loop"

    def __init__(self, message: str) -> None:
        super().__init__(message, type=self.TYPE)


__all__ = [
    "BlockedEventLoop",
    "BrokerError",
    "ConfigError",
    "LeveretError",
    "PublishError",
    "StoreError",
    "StoreUnavailable",
    "SubmissionError",
    "TaskFailed",
    "UnavailableError",
]
