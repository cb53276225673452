"""The Celery application the peer comparison runs, configured from the environment.

``peers.py`` starts ``celery -A peer_celery worker`` with this directory on the path and
imports the same module in the producer, so both sides agree on the set-up. The set-up is
chosen by ``PEERS_CELERY_MODE``:

- ``fast``: Celery at its fastest. A non-durable classic queue and transient task
  messages, results through the ``rpc://`` backend (transient replies to the producer's
  own queue), tasks acknowledged on receipt (``task_acks_late=False``) and a large
  prefetch.
- ``safe``: Celery with the guarantees leveret gives. A durable quorum queue, persistent
  task messages published with confirms, tasks acknowledged only after they ran and
  rejected back to the queue if the worker process dies, results stored in Redis.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

MODE = os.environ.get("PEERS_CELERY_MODE", "fast")
QUEUE = f"peers.celery.{MODE}"
#: Messages each pool process may hold unacknowledged (times the concurrency of 2).
PREFETCH_MULTIPLIER = 64

app = Celery("peer_celery", broker=os.environ.get("PEERS_AMQP_URL", "amqp://"))

_common = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": False,
    "worker_prefetch_multiplier": PREFETCH_MULTIPLIER,
    "worker_disable_rate_limits": True,
    "worker_hijack_root_logger": False,
    "broker_connection_retry_on_startup": True,
    "task_default_queue": QUEUE,
    "task_default_exchange": QUEUE,
    "task_default_routing_key": QUEUE,
}

if MODE == "fast":
    app.conf.update(
        _common,
        result_backend="rpc://",
        result_persistent=False,
        task_acks_late=False,
        task_default_delivery_mode="transient",
        task_queues=[Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE, durable=False)],
    )
elif MODE == "safe":
    app.conf.update(
        _common,
        result_backend=os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/15"),
        result_backend_transport_options={
            "global_keyprefix": os.environ.get("PEERS_REDIS_PREFIX", "peers-")
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_delivery_mode="persistent",
        broker_transport_options={"confirm_publish": True},
        task_queues=[
            Queue(
                QUEUE,
                Exchange(QUEUE, durable=True),
                routing_key=QUEUE,
                durable=True,
                queue_arguments={"x-queue-type": "quorum"},
            )
        ],
    )
else:
    raise SystemExit(f"PEERS_CELERY_MODE must be fast or safe, not {MODE!r}")


@app.task(name="echo")
def echo(value: object) -> object:
    """Return the argument: the task every peer runs."""
    return value
