"""The Dramatiq broker and actor the peer comparison runs, configured from the environment.

``peers.py`` starts ``dramatiq peer_dramatiq`` with this directory on the path and imports
the same module in the producer. Dramatiq's RabbitMQ broker declares durable classic
queues (it has no option for quorum queues), publishes persistent messages, here with
publisher confirms, and acknowledges a message after the actor ran. Results are stored in
Redis through the Results middleware, which the producer waits on.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

QUEUE = "peers.dramatiq"

backend = RedisBackend(
    url=os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/15"),
    namespace=os.environ.get("PEERS_REDIS_PREFIX", "peers-") + "dramatiq",
)
broker = RabbitmqBroker(
    url=os.environ.get("PEERS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    confirm_delivery=True,
)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="echo", queue_name=QUEUE, store_results=True, max_retries=0)
def echo(value: object) -> object:
    """Return the argument: the task every peer runs."""
    return value
