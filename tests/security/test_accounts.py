"""Account takeover: a `users.admin` holder acts only on users within its own grants."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, field_of, make_user, md

DENIED = grpc.StatusCode.PERMISSION_DENIED
VICTIM_PASSWORD = "victim-password-1"


def change(user_id: str, paths: list[str], **fields: object) -> users_pb.UpdateUserRequest:
    """An UpdateUser request for `paths`."""
    password = str(fields.pop("password", ""))
    return users_pb.UpdateUserRequest(
        user=resources_pb2.User(user_id=user_id, **fields),  # type: ignore[arg-type]
        update_mask={"paths": paths},
        password=password,
    )


async def test_user_admin_cannot_take_over_a_user_holding_more(svc: Auth) -> None:
    """Attack: a helpdesk account holding only `users.admin` resets the password of a
    `keys.admin`/`audit.read` holder, logs in as them, then disables or deletes them."""
    _, helpdesk = await make_user(svc, "helpdesk", ["users.admin"])
    victim, _ = await make_user(
        svc, "victim", ["keys.admin", "audit.read"], password=VICTIM_PASSWORD
    )
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: svc.users.UpdateUser(
            change(victim, ["password"], password="attacker-password-1"), metadata=md(helpdesk)
        ),
        lambda: svc.users.UpdateUser(change(victim, ["roles"], roles=[]), metadata=md(helpdesk)),
        lambda: svc.users.UpdateUser(
            change(victim, ["disabled"], disabled=True), metadata=md(helpdesk)
        ),
        lambda: svc.users.DeleteUser(
            users_pb.DeleteUserRequest(user_id=victim), metadata=md(helpdesk)
        ),
    ]
    for attempt in attempts:  # one after the other: a call starts when it is made
        exc = await expect(attempt(), DENIED, "holds more")
        assert field_of(exc) in ("user.user_id", "user_id")
    denied = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="permission.denied", page_size=100),
        metadata=svc.admin,
    )
    refusals = [e for e in denied.events if e.details["reason"] == "PERMISSION_ESCALATION"]
    assert len(refusals) == len(attempts)  # every attempt is in the audit log
    await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="victim", password="attacker-password-1")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    got = await svc.auth.Login(auth_pb.LoginRequest(username="victim", password=VICTIM_PASSWORD))
    assert got.user.user_id == victim and not got.user.disabled
    assert list(got.user.roles) == ["r-victim"]


async def test_user_admin_cannot_act_on_a_user_with_looser_limits_or_other_models(
    svc: Auth,
) -> None:
    """Attack: a rate-limited, model-restricted `users.admin` takes over a user whose
    permissions are its own but whose limits are looser or whose models are others."""
    capped = resources_pb2.Limits(requests_per_minute=10)
    _, helpdesk = await make_user(
        svc, "helpdesk", ["users.admin", "generate"], models=["smollm2*"], limits=capped
    )
    unlimited, _ = await make_user(svc, "unlimited", ["generate"], models=["smollm2*"])
    other, _ = await make_user(svc, "other", ["generate"], models=["qwen*"], limits=capped)
    for target in (unlimited, other):
        await expect(
            svc.users.UpdateUser(
                change(target, ["password"], password="attacker-password-1"),
                metadata=md(helpdesk),
            ),
            DENIED,
        )
        await expect(
            svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=target), metadata=md(helpdesk)),
            DENIED,
        )


async def test_user_admin_still_manages_users_within_its_own(svc: Auth) -> None:
    """The rule refuses only takeovers: a user within the actor's grants is managed as before."""
    capped = resources_pb2.Limits(requests_per_minute=10)
    _, helpdesk = await make_user(
        svc, "helpdesk", ["users.admin", "generate"], models=["smollm2*"], limits=capped
    )
    tighter = resources_pb2.Limits(requests_per_minute=5)
    target, _ = await make_user(
        svc, "member", ["generate"], models=["smollm2-135m"], limits=tighter
    )
    await svc.users.UpdateUser(
        change(target, ["password", "disabled"], password="fresh-password-1", disabled=True),
        metadata=md(helpdesk),
    )
    await svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=target), metadata=md(helpdesk))


async def test_role_admin_cannot_strip_a_role_carrying_more_than_its_own(svc: Auth) -> None:
    """Attack: a `roles.admin` holder rewrites (or deletes) a role carrying `keys.admin`,
    taking the permission away from everyone who holds it."""
    _, roleadmin = await make_user(svc, "roleadmin", ["roles.admin", "generate"])
    await make_user(svc, "victim", ["keys.admin", "generate"])
    narrowed = resources_pb2.Role(name="r-victim", permissions=["generate"])
    await expect(
        svc.roles.UpdateRole(
            roles_pb.UpdateRoleRequest(role=narrowed, update_mask={"paths": ["permissions"]}),
            metadata=md(roleadmin),
        ),
        DENIED,
    )
    role = await svc.roles.GetRole(roles_pb.GetRoleRequest(name="r-victim"), metadata=svc.admin)
    assert set(role.role.permissions) == {"keys.admin", "generate"}
