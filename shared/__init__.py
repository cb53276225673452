"""leveret: a distributed task scheduler on RabbitMQ.

Tasks are never lost, hung workers are noticed, and exactly one result is
recorded per task. This package is what every service and every Python producer
imports: the wire contract, the topology, settings, the AMQP helpers, the handler
API and the client.
"""

from __future__ import annotations

from leveret.contracts import SubmitTask, TaskResult, TaskStatus
from leveret.errors import LeveretError, SubmissionError, TaskFailed
from leveret.handlers import Registry, TaskContext, task

__version__ = "0.1.0"

__all__ = [
    "LeveretError",
    "Registry",
    "SubmissionError",
    "SubmitTask",
    "TaskContext",
    "TaskFailed",
    "TaskResult",
    "TaskStatus",
    "__version__",
    "task",
]
