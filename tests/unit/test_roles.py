"""Who may send what: the role check and whose connections a fence may close."""

from __future__ import annotations

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
