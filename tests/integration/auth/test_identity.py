"""Login, sessions, lockout, WhoAmI and Authenticate against a real server."""

from __future__ import annotations

import dataclasses

import grpc
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.auth.core import AuthCore
from services.auth.settings import Argon2Settings
from tests.integration.auth.conftest import ADMIN_PASSWORD, Auth
from tests.integration.auth.helpers import expect, make_user, md

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


async def test_admin_key_authenticates_to_full_principal(svc: Auth) -> None:
    reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=svc.admin_key))
    p = reply.principal
    assert p.username == "admin"
    assert p.credential_type == resources_pb2.CREDENTIAL_TYPE_USER_KEY
    assert {"admin", "users.admin", "generate"} <= set(p.permissions)
    assert list(p.allowed_models) == ["*"]
    assert reply.cache_ttl.seconds == 5
    who = await svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=svc.admin)
    assert who.principal.user_id == p.user_id


async def test_login_gives_a_session_that_logout_ends(svc: Auth) -> None:
    reply = await svc.auth.Login(auth_pb.LoginRequest(username="admin", password=ADMIN_PASSWORD))
    assert reply.session_token.startswith("ty_sess_")
    assert reply.user.username == "admin"
    who = await svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=md(reply.session_token))
    assert who.principal.credential_type == resources_pb2.CREDENTIAL_TYPE_SESSION
    await svc.auth.Logout(auth_pb.LogoutRequest(), metadata=md(reply.session_token))
    await expect(svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=md(reply.session_token)), UNAUTH)
    await expect(
        svc.auth.Logout(auth_pb.LogoutRequest(), metadata=svc.admin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RevokeApiKey",
    )


async def test_unknown_user_and_wrong_password_look_the_same(svc: Auth) -> None:
    a = await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="admin", password="wrong-pass")), UNAUTH
    )
    b = await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="nobody", password="wrong-pass")), UNAUTH
    )
    assert a.details() == b.details() == "invalid username or password"
    events = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="login.failure"), metadata=svc.admin
    )
    assert len(events.events) == 2
    assert {e.details["reason"] for e in events.events} == {"bad_password", "unknown_user"}
    assert all(e.outcome == "failure" and e.peer for e in events.events)


async def test_repeated_failures_lock_the_account_even_for_the_right_password(svc: Auth) -> None:
    user_id, _ = await make_user(svc, "carol", ["generate"], password="carol-password")
    for _ in range(svc.settings.lockout_threshold):
        await expect(
            svc.auth.Login(auth_pb.LoginRequest(username="carol", password="nope-nope")), UNAUTH
        )
    await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="carol", password="carol-password")), UNAUTH
    )
    user = await svc.users.GetUser(users_pb.GetUserRequest(user_id=user_id), metadata=svc.admin)
    assert user.user.HasField("locked_until")
    lockouts = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="login.lockout", object_id=user_id),
        metadata=svc.admin,
    )
    assert len(lockouts.events) == 1
    # An admin setting a new password lifts the lock.
    await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=user_id),
            update_mask={"paths": ["password"]},
            password="carol-new-password",
        ),
        metadata=svc.admin,
    )
    ok = await svc.auth.Login(auth_pb.LoginRequest(username="carol", password="carol-new-password"))
    assert ok.user.user_id == user_id
    # Changing the password again ends the sessions opened with the old one.
    await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=user_id),
            update_mask={"paths": ["password"]},
            password="carol-third-password",
        ),
        metadata=svc.admin,
    )
    await expect(svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=md(ok.session_token)), UNAUTH)


async def test_disabled_user_cannot_log_in_and_keys_stop(svc: Auth) -> None:
    user_id, key = await make_user(svc, "dave", ["generate"], password="dave-password")
    await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=user_id, disabled=True),
            update_mask={"paths": ["disabled"]},
        ),
        metadata=svc.admin,
    )
    await expect(svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key)), UNAUTH)
    await expect(
        svc.auth.Login(auth_pb.LoginRequest(username="dave", password="dave-password")), UNAUTH
    )


async def test_login_rehashes_when_argon2_cost_rises(svc: Auth) -> None:
    stronger = dataclasses.replace(
        svc.settings, argon2=Argon2Settings(time_cost=2, memory_kib=128, parallelism=1)
    )
    core = AuthCore(stronger)
    try:
        before = await core.db.read(_admin_hash)
        assert core.passwords.needs_rehash(before)
        await core.login("admin", ADMIN_PASSWORD, "test")
        after = await core.db.read(_admin_hash)
        assert after != before and "t=2" in after and not core.passwords.needs_rehash(after)
        await core.login("admin", ADMIN_PASSWORD, "test")  # the new hash verifies
    finally:
        await core.close()


def _admin_hash(session: object) -> str:
    from sqlalchemy import select

    from services.auth.db.models import UserRow

    value = session.scalar(select(UserRow.password_hash).where(UserRow.username == "admin"))  # type: ignore[attr-defined]
    assert isinstance(value, str)
    return value
