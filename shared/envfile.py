"""The role env file written by ``leveret broker-setup``: one ``NAME=value`` per line.

A line ``LEVERET_<ROLE>_<NAME>=value`` (ROLE one of PRODUCER, SCHEDULER, WORKER,
TRACKER) is the setting ``LEVERET_<NAME>`` for that role's processes; every line also
applies as written to every process (so ``LEVERET_WORKER_USERS`` reaches them all).
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


def for_role(values: Mapping[str, str], role: Role) -> dict[str, str]:
    """The environment a process of `role` gets from the file's `values`."""
    prefix = f"LEVERET_{role.upper()}_"
    env = dict(values)
    for name, value in values.items():
        if name.startswith(prefix):
            env["LEVERET_" + name[len(prefix) :]] = value
    return env


def apply_env_file(path: Path | None, role: Role) -> None:
    """Apply the file (`path`, else ``$LEVERET_ENV_FILE``, else nothing) to this
    process's environment for `role`."""
    chosen = path or (Path(os.environ[ENV_FILE_VAR]) if os.environ.get(ENV_FILE_VAR) else None)
    if chosen is not None:
        os.environ.update(for_role(read_env_file(chosen), role))


__all__ = ["ENV_FILE_VAR", "apply_env_file", "for_role", "read_env_file"]
