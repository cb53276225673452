"""``leveret broker-setup``: one RabbitMQ user per role, with least-privilege
permissions, through the management API (idempotent).

Users are named ``<prefix>-<role>`` (prefix: ``leveret`` for the default namespace,
else the namespace). Passwords are generated (``secrets.token_urlsafe``). A run
keeps the password of a user that exists when the env file already holds it, so
running it twice changes nothing; ``--rotate`` sets new passwords for every user.
A user that exists with no password on record gets a new one (the old one cannot
be read back).

Fencing a hung worker means closing another user's connection, which RabbitMQ's
management API allows only to the ``administrator`` tag; no narrower tag does. So
a fifth user, ``<prefix>-fencer``, gets that tag and no permission in any vhost
(it cannot open an AMQP connection), and only the tracker is given its
credentials (``LEVERET_TRACKER_MANAGEMENT_URL``). It is as powerful as any
administrator on the HTTP API: keep it to the tracker, or pass ``--no-fencer``
and do without fencing (the tracker then warns at start).

The env file holds every role's password. With ``--role-files`` it also writes, for
each role, ``<dir>/<role>/<name>`` next to it (``/secrets/roles.env`` gives
``/secrets/worker/roles.env``…) with only the lines that role's processes use: the
lines for everyone, the role lists and that role's own lines. Give each service
only its role's file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from leveret.envfile import read_env_file, role_of
from leveret.roles import Role, broker_permissions
from leveret.topology import DEFAULT_NAMESPACE

FENCER = "fencer"


@dataclass(frozen=True)
class Plan:
    """What to set up: where, under which names."""

    admin_url: str
    vhost: str
    namespace: str
    amqp_url: str  # scheme, host and port the services connect to
    env_file: Path | None
    rotate: bool = False
    fencer: bool = True
    role_files: bool = False

    @property
    def prefix(self) -> str:
        return "leveret" if self.namespace == DEFAULT_NAMESPACE else self.namespace


class Admin:
    """The management API with an administrator's credentials (sync: a one-shot tool)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        self.base = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], "", "", ""))
        self.http = httpx.Client(base_url=self.base, auth=(user, password), timeout=10)

    def put(self, path: str, body: dict[str, str]) -> None:
        self.http.put(f"/api/{path}", json=body).raise_for_status()

    def exists(self, path: str) -> bool:
        r = self.http.get(f"/api/{path}")
        if r.status_code == 404:
            return False
        r.raise_for_status()
        return True


def _known_passwords(plan: Plan) -> dict[str, str]:
    """User -> password, from the role URLs an existing env file holds."""
    if plan.env_file is None or not plan.env_file.exists():
        return {}
    known: dict[str, str] = {}
    for value in read_env_file(plan.env_file).values():
        parts = urlsplit(value)
        if parts.username and parts.password:
            known[unquote(parts.username)] = unquote(parts.password)
    return known


def _user(admin: Admin, name: str, tags: str, known: dict[str, str], rotate: bool) -> str:
    """Create or update one user; its password."""
    kept = known.get(name)
    exists = admin.exists(f"users/{quote(name, safe='')}")
    password = kept if exists and kept and not rotate else secrets.token_urlsafe(24)
    if exists and password != kept:
        print(f"{name}: exists; password {'rotated' if rotate else 'reset (none on record)'}")
    admin.put(f"users/{quote(name, safe='')}", {"password": password, "tags": tags})
    return password


def set_up(plan: Plan) -> dict[str, str]:
    """Make the vhost, the users and their permissions; the env file's lines."""
    admin = Admin(plan.admin_url)
    vhost = quote(plan.vhost, safe="")
    admin.put(f"vhosts/{vhost}", {})
    known = _known_passwords(plan)
    amqp = urlsplit(plan.amqp_url)
    lines: dict[str, str] = {}
    for role, perms in broker_permissions(plan.namespace).items():
        name = f"{plan.prefix}-{role}"
        password = _user(admin, name, "", known, plan.rotate)
        admin.put(
            f"permissions/{vhost}/{quote(name, safe='')}",
            {"configure": perms.configure, "write": perms.write, "read": perms.read},
        )
        netloc = (
            f"{quote(name, safe='')}:{quote(password, safe='')}@{amqp.netloc.rsplit('@', 1)[-1]}"
        )
        lines[f"LEVERET_{role.upper()}_AMQP_URL"] = urlunsplit(
            (amqp.scheme, netloc, "/" + vhost, "", "")
        )
        lines[f"LEVERET_{role.upper()}_USERS"] = name
    if plan.fencer:
        name = f"{plan.prefix}-{FENCER}"
        password = _user(admin, name, "administrator", known, plan.rotate)
        netloc = f"{quote(name, safe='')}:{quote(password, safe='')}@{urlsplit(admin.base).netloc}"
        lines["LEVERET_TRACKER_MANAGEMENT_URL"] = urlunsplit(
            (urlsplit(admin.base).scheme, netloc, "", "", "")
        )
    lines["LEVERET_NAMESPACE"] = plan.namespace
    return lines


def write_env_file(path: Path, lines: dict[str, str]) -> None:
    """Write the lines, readable by the owner only."""
    text = "# written by `leveret broker-setup`; every line LEVERET_<ROLE>_<NAME> is\n"
    text += "# LEVERET_<NAME> for that role's processes (see docs/security.md)\n"
    text += "".join(f"{k}={v}\n" for k, v in lines.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def role_file(env_file: Path, role: Role) -> Path:
    """Where ``--role-files`` writes `role`'s own env file."""
    return env_file.parent / str(role) / env_file.name


def write_role_files(env_file: Path, lines: dict[str, str]) -> list[Path]:
    """One env file per role, with only the lines its processes use; their paths."""
    written = []
    for role in Role:
        path = role_file(env_file, role)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        own = {k: v for k, v in lines.items() if role_of(k) in (None, role)}
        write_env_file(path, own)
        written.append(path)
    return written


def broker_setup(plan: Plan) -> int:
    """Run the set-up; print what it made (never a password) and return an exit code."""
    try:
        lines = set_up(plan)
    except httpx.HTTPError as exc:
        print(f"broker-setup failed: {exc}")
        return 1
    users = [v for k, v in lines.items() if k.endswith("_USERS")]
    print(f"vhost {plan.vhost!r}: users {', '.join(users)} set up with their permissions")
    if plan.env_file is not None:
        write_env_file(plan.env_file, lines)
        print(f"wrote {plan.env_file} (mode 600)")
        if plan.role_files:
            paths = write_role_files(plan.env_file, lines)
            print(f"wrote {', '.join(map(str, paths))} (mode 600), one per role")
    return 0


__all__ = [
    "Plan",
    "Role",
    "broker_setup",
    "role_file",
    "set_up",
    "write_env_file",
    "write_role_files",
]
