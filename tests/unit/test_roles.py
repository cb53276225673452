"""Who may send what: the role check and whose connections a fence may close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leveret.roles import RoleUsers, amqp_user


def test_a_role_is_enforced_only_once_its_users_are_listed() -> None:
    anyone = RoleUsers.of()
    assert anyone.may_send("task.cancel", None)
    roles = RoleUsers.of(scheduler=["s"], worker=["w"], tracker=[])
    assert roles.may_send("task.cancel", "s")
    assert not roles.may_send("task.cancel", "w")
    assert not roles.may_send("worker.heartbeat", None)
    assert roles.may_send("result", "p")  # the tracker role is open: anyone may send results
    strict = RoleUsers.of(scheduler=["s"], worker=["w"], tracker=["t"])
    assert not strict.may_send("result", "p")
    assert strict.may_send("result", "w")


def test_a_fence_closes_only_connections_of_the_workers_verified_senders() -> None:
    roles = RoleUsers.of(worker=["w"])
    assert roles.fence_users({"w", "mallory"}, "guest") == {"w"}
    assert roles.fence_users({""}, "guest") == set()
    assert roles.fence_users(None, "guest") == {"w"}
    assert RoleUsers.of().fence_users(None, "t") == {"t"}
    assert amqp_user("amqp://a%40b:x@h/") == "a@b"
    assert amqp_user("amqp://h/") == "guest"


def test_a_role_line_of_the_env_file_is_that_roles_setting() -> None:
    from leveret.envfile import for_role
    from leveret.roles import Role

    lines = {"LEVERET_WORKER_AMQP_URL": "amqp://w", "LEVERET_WORKER_USERS": "w"}
    env = for_role(lines, Role.WORKER)
    assert env["LEVERET_AMQP_URL"] == "amqp://w"
    assert env["LEVERET_WORKER_USERS"] == "w"  # applies as written to every role
    assert "LEVERET_AMQP_URL" not in for_role(lines, Role.TRACKER)


def test_a_worker_started_with_the_env_file_holds_no_other_roles_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leveret.envfile import apply_env_file
    from leveret.roles import Role

    roles_env = tmp_path / "roles.env"
    roles_env.write_text(
        "LEVERET_WORKER_AMQP_URL=amqp://leveret-worker:w@h/v\n"
        "LEVERET_TRACKER_AMQP_URL=amqp://leveret-tracker:t@h/v\n"
        "LEVERET_TRACKER_MANAGEMENT_URL=http://leveret-fencer:f@h:15672\n"
        "LEVERET_SCHEDULER_AMQP_URL=amqp://leveret-scheduler:s@h/v\n"
        "LEVERET_PRODUCER_AMQP_URL=amqp://leveret-producer:p@h/v\n"
        "LEVERET_WORKER_USERS=leveret-worker\n"
        "LEVERET_TRACKER_USERS=leveret-tracker\n"
        "LEVERET_NAMESPACE=ns\n"
    )
    for name in list(os.environ):
        if name.startswith("LEVERET_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # restored after the test
    apply_env_file(roles_env, Role.WORKER)
    env = {k: v for k, v in os.environ.items() if k.startswith("LEVERET_")}
    assert env["LEVERET_AMQP_URL"] == "amqp://leveret-worker:w@h/v"
    assert env["LEVERET_NAMESPACE"] == "ns"
    assert env["LEVERET_TRACKER_USERS"] == "leveret-tracker"  # role lists reach everyone
    secrets = ":t@", ":f@", ":s@", ":p@"
    assert not [k for k, v in env.items() if any(s in v for s in secrets)], env


def test_the_tracker_may_not_touch_a_producers_reply_queue() -> None:
    import re

    from leveret.roles import Role, broker_permissions

    perms = broker_permissions("ns")
    tracker, worker = perms[Role.TRACKER], perms[Role.WORKER]
    for regex in (tracker.configure, tracker.write, tracker.read):
        assert not re.fullmatch(regex, "amq.gen-abc")
    assert re.fullmatch(tracker.configure, "ns.tracker")
    assert not re.fullmatch(tracker.write, "ns.submit")
    assert re.fullmatch(worker.read, "amq.gen-abc")  # its scheduler.started listener
