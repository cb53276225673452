"""Who may send what on the broker: roles, the users that hold them, and the message
types each role may publish.

RabbitMQ checks a message's ``user_id`` property against the publishing connection's
user, so a consumer that reads ``user_id`` knows who sent it. Roles map to users
through settings (``LEVERET_WORKER_USERS`` and so on, comma-separated). A role with
no users listed may be held by any user: the quick start (one ``guest`` user for
everything) keeps working, and a deployment enforces roles by listing them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

from loguru import logger


class Role(StrEnum):
    """A part a process plays on the broker."""

    PRODUCER = "producer"  # submits tasks, reads its replies
    SCHEDULER = "scheduler"  # admits tasks, routes them, cancels them
    WORKER = "worker"  # runs tasks, reports results and progress, heartbeats
    TRACKER = "tracker"  # records everything, tells the scheduler what ended


#: Who may publish each message type consumed by the tracker and the scheduler
#: (the `type` of an event; ``result`` for a task result). Types not listed: anyone.
SENDERS: dict[str, frozenset[Role]] = {
    "result": frozenset({Role.WORKER, Role.SCHEDULER, Role.TRACKER}),
    "tasks.started": frozenset({Role.WORKER}),
    "task.retrying": frozenset({Role.WORKER}),
    "task.returned": frozenset({Role.WORKER}),
    "task.progress": frozenset({Role.WORKER}),
    "worker.started": frozenset({Role.WORKER}),
    "worker.heartbeat": frozenset({Role.WORKER}),
    "worker.stopped": frozenset({Role.WORKER}),
    "tasks.accepted": frozenset({Role.SCHEDULER}),
    "tasks.ended": frozenset({Role.TRACKER}),
    "task.cancel": frozenset({Role.SCHEDULER}),
    "scheduler.started": frozenset({Role.SCHEDULER}),
    "requirements.declared": frozenset({Role.SCHEDULER}),
}


def amqp_user(url: str) -> str:
    """The user an AMQP URL logs in as (``guest`` when it names none)."""
    user = urlsplit(url).username
    return unquote(user) if user is not None else "guest"


@dataclass(frozen=True)
class RoleUsers:
    """The users holding each role; a role with none may be held by anyone."""

    users: Mapping[Role, frozenset[str]]

    @classmethod
    def of(cls, **lists: Iterable[str]) -> RoleUsers:
        """From keyword lists named after roles, e.g. ``RoleUsers.of(worker=["w"])``."""
        return cls({Role(k): frozenset(v) for k, v in lists.items()})

    @property
    def enforced(self) -> bool:
        """True when at least one role lists its users."""
        return any(self.users.values())

    def may_send(self, message_type: str, user_id: str | None) -> bool:
        """Whether a message of this type from `user_id` (None: not stamped) is acted on."""
        roles = SENDERS.get(message_type)
        if roles is None:
            return True
        allowed: set[str] = set()
        for role in roles:
            listed = self.users.get(role, frozenset())
            if not listed:
                return True  # this role may be held by anyone
            allowed |= listed
        return user_id is not None and user_id in allowed

    def fence_users(self, recorded: Iterable[str] | None, own_user: str) -> frozenset[str]:
        """Whose connections named after a worker the tracker may close: the verified
        users its news came from (`recorded`; "" for news not stamped, which names
        nobody) that may be workers; when nothing is recorded (the tracker restarted
        since), the worker role's users, else the tracker's own user."""
        workers = self.users.get(Role.WORKER, frozenset())
        if recorded is not None:
            return frozenset(u for u in recorded if u and (not workers or u in workers))
        return workers or frozenset({own_user})


@dataclass(frozen=True)
class Permissions:
    """One user's RabbitMQ permission regexes in the vhost (configure, write, read)."""

    configure: str
    write: str
    read: str


def broker_permissions(namespace: str) -> dict[Role, Permissions]:
    """Each role's least-privilege permissions on a namespace's names (see
    docs/security.md, "Roles on the broker"). Services declare the whole topology at
    start, so every service role may configure, bind and read the namespace's
    names; what sets them apart is where they may publish. A producer may only
    publish to ``<ns>.submit`` and read its own replies (direct reply-to, or a
    server-named ``amq.gen-…`` or client-named ``amq_<hex>`` exclusive queue it
    declares); nobody but the scheduler may publish to ``<ns>.submit``. The tracker
    declares no exclusive queue, so it gets none of those names. Every service role
    writes to ``amq.default``: replies and a worker's hand-backs go through it, and
    RabbitMQ cannot limit which queue a publish there reaches (hence the intake's
    own sender check)."""
    ns = re.escape(namespace)
    own = rf"{ns}\..*"
    replies = r"(?:amq\.gen-.*|amq_[0-9a-f]+)"  # server-named, or named by aio-pika
    service = Permissions(
        configure=rf"^({own}|{replies})$",
        write=rf"^({ns}\.(?!submit$).*|{replies}|amq\.default)$",
        read=rf"^({own}|{replies})$",
    )
    return {
        Role.PRODUCER: Permissions(
            configure=rf"^{replies}$",
            write=rf"^{ns}\.submit$",
            read=rf"^({replies}|amq\.rabbitmq\.reply-to)$",
        ),
        Role.SCHEDULER: Permissions(
            configure=service.configure,
            write=rf"^({own}|{replies}|amq\.default)$",
            read=service.read,
        ),
        Role.WORKER: service,
        Role.TRACKER: Permissions(
            configure=rf"^{own}$",
            write=rf"^({ns}\.(?!submit$).*|amq\.default)$",
            read=rf"^{own}$",
        ),
    }


#: Where a producer may ask for replies: direct reply-to (the broker rewrites
#: ``amq.rabbitmq.reply-to`` into ``amq.rabbitmq.reply-to.<token>``), or an exclusive
#: queue named by the broker (``amq.gen-…``) or by aio-pika (``amq_<hex>``). The
#: scheduler and workers never publish into any other queue on a producer's behalf.
REPLY_TO_PATTERN = re.compile(r"amq\.rabbitmq\.reply-to(\..+)?|amq\.gen-[\w-]+|amq_[0-9a-f]+")


def valid_reply_to(reply_to: str) -> bool:
    """True when a producer may ask for replies at `reply_to` (see REPLY_TO_PATTERN)."""
    return REPLY_TO_PATTERN.fullmatch(reply_to) is not None


def sender_of(delivery: Any) -> str | None:
    """The verified user who published a delivery (its ``user_id``), if stamped."""
    user = getattr(delivery, "user_id", None)
    return user if isinstance(user, str) and user else None


class RefusedSenders:
    """Counts messages refused for their sender's role; one log line per sender."""

    def __init__(self) -> None:
        self.count = 0
        self._seen: set[str] = set()

    def refused(self, kind: str, sender: str | None, message_id: str | None) -> None:
        """Count one refusal (the caller sets the message aside)."""
        self.count += 1
        who = sender or "(not stamped)"
        if who in self._seen:
            return
        self._seen.add(who)
        logger.warning(
            "refused {} from user {!r} (message {}): that user's role may not send it; "
            "set aside, not acted on; further ones from this user are only counted",
            kind,
            who,
            message_id,
        )


__all__ = [
    "REPLY_TO_PATTERN",
    "SENDERS",
    "Permissions",
    "RefusedSenders",
    "Role",
    "RoleUsers",
    "amqp_user",
    "broker_permissions",
    "sender_of",
    "valid_reply_to",
]
