"""The one module that owns aio-pika details: connecting (named, robust, retried),
publishing with confirms in batches, and translating aio-pika/aiormq errors into
:mod:`leveret.errors`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    DeliveryMode,
)
from loguru import logger
from pamqp.common import FieldTable
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from leveret.errors import BrokerError, PublishError
from leveret.tls import AmqpTls

#: Exceptions that mean "the broker or the link to it is in trouble".
BROKER_EXCEPTIONS: tuple[type[Exception], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

#: Why a publish may not be confirmed: nacked, unroutable, or the link is in trouble.
UNCONFIRMED: tuple[type[Exception], ...] = (PublishError, *BROKER_EXCEPTIONS)

JSON = "application/json"


@contextmanager
def map_broker_errors() -> Iterator[None]:
    """The broker boundary: aio-pika/aiormq and socket errors raised inside become
    :class:`BrokerError` (leveret's errors pass through unchanged)."""
    try:
        yield
    except BROKER_EXCEPTIONS as exc:
        raise BrokerError(f"broker unavailable: {type(exc).__name__}: {exc}") from exc


T = TypeVar("T")


async def connect(
    url: str,
    name: str,
    *,
    connect_timeout_s: float = 120.0,
    heartbeat_s: int = 10,
    robust: bool = True,
    tls: AmqpTls | None = None,
) -> AbstractRobustConnection:
    """Open a connection named `name` (shown as `connection_name` by the broker).

    The first connect is retried with exponential backoff for up to
    `connect_timeout_s`, so services may start before the broker does. A robust
    connection heals later drops by itself; a plain one (``robust=False``) is for
    callers that rebuild their whole session after a drop, as workers do. An
    ``amqps://`` URL verifies the broker against `tls`'s CA file (else the system's)
    and presents its client certificate, if any.
    """
    context = (tls or AmqpTls()).context(url)
    props: FieldTable = {"connection_name": name, "product": "leveret", "pid": str(os.getpid())}
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(connect_timeout_s),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            retry=retry_if_exception_type(BROKER_EXCEPTIONS),
            before_sleep=before_sleep_log(logger, "WARNING"),  # type: ignore[arg-type]
            reraise=True,
        ):
            with attempt:
                if not robust:
                    plain = await aio_pika.connect(
                        url, client_properties=props, heartbeat=heartbeat_s, ssl_context=context
                    )
                    return plain  # type: ignore[return-value]  # same API minus reconnects
                return await aio_pika.connect_robust(
                    url,
                    client_properties=props,
                    heartbeat=heartbeat_s,
                    reconnect_interval=1.0,
                    ssl_context=context,
                )
    except BROKER_EXCEPTIONS as exc:
        raise BrokerError(f"cannot connect to {redact(url)}: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


async def open_channel(
    connection: AbstractRobustConnection, *, prefetch: int | None = None
) -> AbstractChannel:
    """A channel with publisher confirms on; unroutable mandatory publishes raise."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


def json_message(
    model: BaseModel | bytes,
    *,
    persistent: bool = True,
    correlation_id: str | None = None,
    message_id: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, Any] | None = None,
    type_: str | None = None,
) -> aio_pika.Message:
    """A JSON message from a model (or raw bytes), persistent unless told otherwise."""
    body = model if isinstance(model, bytes) else model.model_dump_json().encode()
    return aio_pika.Message(
        body,
        content_type=JSON,
        content_encoding="utf-8",
        delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
        correlation_id=correlation_id,
        message_id=message_id,
        reply_to=reply_to,
        headers=dict(headers) if headers else None,
        type=type_,
    )


def annotated_copy(
    message: AbstractIncomingMessage, extra_headers: Mapping[str, Any]
) -> aio_pika.Message:
    """The original bytes and properties of a delivery, plus headers saying why it was
    set aside (for the `rejected` queue: a person must be able to see what and why)."""
    headers: dict[str, Any] = dict(message.headers or {})
    headers.update(extra_headers)
    copy = json_message(
        message.body,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        reply_to=message.reply_to,
        headers=headers,
    )
    copy.content_type = message.content_type
    copy.content_encoding = message.content_encoding
    return copy


@dataclass
class Outgoing:
    """One message to publish: exchange, routing key, message and whether it must route."""

    exchange: AbstractExchange
    routing_key: str
    message: aio_pika.Message
    mandatory: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def connection_user(exchange: AbstractExchange) -> str | None:
    """The user the connection of an exchange's channel logged in as (None: unknown)."""
    connection = getattr(getattr(exchange, "channel", None), "_connection", None)
    user = getattr(getattr(connection, "url", None), "user", None)
    return user if isinstance(user, str) and user else None


def stamp_sender(exchange: AbstractExchange, message: aio_pika.Message) -> aio_pika.Message:
    """Set the message's ``user_id`` to the connection's user: RabbitMQ refuses a
    mismatch, so consumers can trust it (see :mod:`leveret.roles`)."""
    if message.user_id is None:
        message.user_id = connection_user(exchange)
    return message


async def publish_all(items: Sequence[Outgoing], *, timeout_s: float = 30.0) -> None:
    """Publish every item and wait for all their confirms together (not one by one);
    each carries the connection's user as ``user_id`` (:func:`stamp_sender`).

    Raises :class:`PublishError` if any is nacked, unroutable, or unconfirmed.
    """
    if not items:
        return
    for it in items:
        stamp_sender(it.exchange, it.message)
    results = await asyncio.gather(
        *(
            it.exchange.publish(
                it.message, it.routing_key, mandatory=it.mandatory, timeout=timeout_s
            )
            for it in items
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        first = errors[0]
        raise PublishError(
            f"{len(errors)} of {len(items)} publishes failed: {type(first).__name__}: {first}"
        ) from first


async def send_reply(channel: AbstractChannel, reply_to: str, message: aio_pika.Message) -> None:
    """Send to a `reply_to` address through the default exchange.

    Never mandatory: a reply queue may be gone (the producer stopped waiting), and
    RabbitMQ's direct reply-to refuses mandatory publishes. A failed reply is
    logged, not raised: the result is on the results exchange regardless.
    """
    try:
        await channel.default_exchange.publish(message, reply_to, mandatory=False)
    except BROKER_EXCEPTIONS as exc:
        logger.warning("reply to {} not sent: {}", reply_to, exc)


def channel_gone(delivery: AbstractIncomingMessage) -> bool:
    """True when the channel that delivered this message is closed: it can no longer be
    settled, and the broker has already put it back for redelivery."""
    try:
        return delivery.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return True


async def ack_batch(done: Sequence[AbstractIncomingMessage]) -> None:
    """Ack a processed batch: one ``ack(multiple=True)`` per channel, on its last delivery.

    Deliveries whose channel died since (a broker restart or a reconnect) are skipped:
    their tags mean nothing on any other channel, and the broker redelivers them.
    """
    last: dict[int, AbstractIncomingMessage] = {}
    for delivery in done:
        if not channel_gone(delivery):
            last[id(delivery.channel)] = delivery
    for delivery in last.values():
        try:
            await delivery.ack(multiple=True)
        except BROKER_EXCEPTIONS as exc:
            logger.warning("ack not sent (the broker will redeliver): {}", exc)


async def return_to_queue(delivery: AbstractIncomingMessage) -> None:
    """Give a delivery back to its queue for redelivery (``reject(requeue=True)``); if its
    channel is gone the broker has requeued it already."""
    try:
        await delivery.reject(requeue=True)
    except BROKER_EXCEPTIONS as exc:
        logger.debug("delivery not returned (the broker requeued it): {}", exc)


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times the broker delivered this message before (quorum queues count)."""
    headers = message.headers or {}
    raw = headers.get("x-delivery-count", 0)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def header_str(message: AbstractIncomingMessage, name: str) -> str | None:
    """A header as text, or None."""
    value = (message.headers or {}).get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
