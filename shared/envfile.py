"""The role env file written by ``leveret broker-setup``: one ``NAME=value`` per line.

A line ``LEVERET_<ROLE>_<NAME>=value`` (ROLE one of PRODUCER, SCHEDULER, WORKER,
TRACKER) is the setting ``LEVERET_<NAME>`` for that role's processes only (it also
reaches them as written): another role's lines never enter a process's environment,
so a worker does not hold the tracker's password. Lines without a role prefix, and
the role lists ``LEVERET_<ROLE>_USERS``, reach every process as written. A setting
whose name starts with a role's (``LEVERET_WORKER_RETENTION``, a tracker setting)
goes in with its role's prefix (``LEVERET_TRACKER_WORKER_RETENTION``).
Values from the file win over the process environment: the file is what the
operator pointed the process at. Blank lines and ``#`` comments are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from leveret.roles import Role

#: The environment variable naming an env file, for processes started without the flag.
ENV_FILE_VAR = "LEVERET_ENV_FILE"


def read_env_file(path: Path) -> dict[str, str]:
    """The file's ``NAME=value`` lines (values taken as written, no quoting)."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        values[name.strip()] = value.strip()
    return values


def role_of(name: str) -> Role | None:
    """The role a line belongs to (``LEVERET_<ROLE>_…``), None for a line for everyone
    (no role prefix, or a role list ``LEVERET_<ROLE>_USERS``)."""
    for role in Role:
        prefix = f"LEVERET_{role.upper()}_"
        if name.startswith(prefix) and name != prefix + "USERS":
            return role
    return None


def for_role(values: Mapping[str, str], role: Role) -> dict[str, str]:
    """The environment a process of `role` gets from the file's `values`: the lines for
    everyone, and its own role's lines both as written and as ``LEVERET_<NAME>``."""
    prefix = f"LEVERET_{role.upper()}_"
    env: dict[str, str] = {}
    for name, value in values.items():
        owner = role_of(name)
        if owner is None or owner is role:
            env[name] = value
    for name, value in values.items():
        if role_of(name) is role:
            env["LEVERET_" + name[len(prefix) :]] = value
    return env


def apply_env_file(path: Path | None, role: Role) -> None:
    """Apply the file (`path`, else ``$LEVERET_ENV_FILE``, else nothing) to this
    process's environment for `role`."""
    chosen = path or (Path(os.environ[ENV_FILE_VAR]) if os.environ.get(ENV_FILE_VAR) else None)
    if chosen is not None:
        os.environ.update(for_role(read_env_file(chosen), role))


__all__ = ["ENV_FILE_VAR", "apply_env_file", "for_role", "read_env_file", "role_of"]
