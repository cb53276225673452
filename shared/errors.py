"""leveret's exceptions. Lower-layer errors (aio-pika, aiormq, SQLAlchemy) are
translated at one boundary each (see :mod:`leveret.amqp`) with ``raise … from exc``.

::

    LeveretError
    ├── ConfigError            settings that cannot work
    ├── BrokerError            the broker refused or could not be reached
    │   └── PublishError       a message was not confirmed (nack, unroutable, lost)
    ├── SubmissionError        a submission is invalid; carries an HTTP status and a code
    └── TaskFailed             raised by a handler to fail its task with a chosen type
"""

from __future__ import annotations


class LeveretError(Exception):
    """Base class of every error leveret raises on purpose."""


class ConfigError(LeveretError):
    """Settings that cannot work (bad URL, unknown handler module, …)."""


class BrokerError(LeveretError):
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


__all__ = [
    "BrokerError",
    "ConfigError",
    "LeveretError",
    "PublishError",
    "SubmissionError",
    "TaskFailed",
]
