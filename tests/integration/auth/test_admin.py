"""Users and roles: CRUD, pagination, no escalation, no existence oracle."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, make_role, make_user, md

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def test_user_lifecycle_and_pagination(svc: Auth) -> None:
    await make_role(svc, "reader", ["models.list"])
    ids = []
    for name in ("usa", "usb", "usc", "usd"):
        reply = await svc.users.CreateUser(
            users_pb.CreateUserRequest(
                username=name, password="password-123", roles=["reader"], display_name=name.upper()
            ),
            metadata=svc.admin,
        )
        ids.append(reply.user.user_id)
    seen: list[str] = []
    token = ""
    while True:
        page = await svc.users.ListUsers(
            users_pb.ListUsersRequest(page_size=2, page_token=token), metadata=svc.admin
        )
        seen += [u.username for u in page.users]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["admin", "usa", "usb", "usc", "usd"]
    updated = await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=ids[0], display_name="Alice"),
            update_mask={"paths": ["display_name"]},
        ),
        metadata=svc.admin,
    )
    assert updated.user.display_name == "Alice" and list(updated.user.roles) == ["reader"]
    key = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=ids[0], name="k"), metadata=svc.admin
    )
    await svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=ids[0]), metadata=svc.admin)
    await expect(
        svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key.secret)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect(
        svc.users.GetUser(users_pb.GetUserRequest(user_id=ids[0]), metadata=svc.admin),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_create_user_is_idempotent_by_request_id_and_names_are_unique(svc: Auth) -> None:
    req = users_pb.CreateUserRequest(username="ivy", password="password-123", request_id="r1")
    first = await svc.users.CreateUser(req, metadata=svc.admin)
    again = await svc.users.CreateUser(req, metadata=svc.admin)
    assert first.user.user_id == again.user.user_id
    await expect(
        svc.users.CreateUser(
            users_pb.CreateUserRequest(username="ivy", password="password-123"),
            metadata=svc.admin,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ivy",
    )


async def test_user_admin_cannot_create_admins_or_grant_beyond_own(svc: Auth) -> None:
    _, key = await make_user(svc, "mgr", ["users.admin", "generate"])
    await make_role(svc, "ops", ["generate", "audit.read"])
    for roles, word in ((["admin"], "admin"), (["ops"], "audit.read")):
        await expect(
            svc.users.CreateUser(
                users_pb.CreateUserRequest(username="evil", password="password-123", roles=roles),
                metadata=md(key),
            ),
            DENIED,
            word,
        )
    await make_role(svc, "gen", ["generate"])
    ok = await svc.users.CreateUser(
        users_pb.CreateUserRequest(username="fine", password="password-123", roles=["gen"]),
        metadata=md(key),
    )
    # ... and cannot promote anyone, themselves included, to admin.
    await expect(
        svc.users.UpdateUser(
            users_pb.UpdateUserRequest(
                user=resources_pb2.User(user_id=ok.user.user_id, roles=["admin"]),
                update_mask={"paths": ["roles"]},
            ),
            metadata=md(key),
        ),
        DENIED,
        "admin",
    )
    admin_id = (
        await svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=svc.admin)
    ).principal.user_id
    await expect(
        svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=admin_id), metadata=md(key)),
        DENIED,
    )


async def test_role_admin_cannot_widen_roles(svc: Auth) -> None:
    _, key = await make_user(
        svc,
        "rad",
        ["roles.admin", "generate"],
        models=["smol-*"],
        limits=resources_pb2.Limits(requests_per_minute=60),
    )
    cases = [
        (resources_pb2.Role(name="x1", permissions=["admin"]), "admin"),
        (resources_pb2.Role(name="x2", permissions=["users.admin"]), "users.admin"),
        (resources_pb2.Role(name="x3", permissions=["generate"], allowed_models=["*"]), "'*'"),
        (
            resources_pb2.Role(name="x4", permissions=["generate"], allowed_models=["smol-1"]),
            "requests_per_minute",
        ),
    ]
    for role, word in cases:
        await expect(
            svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=md(key)),
            DENIED,
            word,
        )
    ok = await svc.roles.CreateRole(
        roles_pb.CreateRoleRequest(
            role=resources_pb2.Role(
                name="x5",
                permissions=["generate"],
                allowed_models=["smol-1"],
                limits=resources_pb2.Limits(requests_per_minute=30),
            )
        ),
        metadata=md(key),
    )
    assert ok.role.limits.requests_per_minute == 30
    await expect(
        svc.roles.UpdateRole(
            roles_pb.UpdateRoleRequest(
                role=resources_pb2.Role(name="admin", permissions=["generate"]),
                update_mask={"paths": ["permissions"]},
            ),
            metadata=md(key),
        ),
        DENIED,
    )


async def test_permission_is_checked_before_existence(svc: Auth) -> None:
    _, key = await make_user(svc, "plain", ["generate"])
    missing = str(uuid.uuid4())
    calls = [
        svc.users.GetUser(users_pb.GetUserRequest(user_id=missing), metadata=md(key)),
        svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=missing), metadata=md(key)),
        svc.roles.GetRole(roles_pb.GetRoleRequest(name="no-such-role"), metadata=md(key)),
        svc.roles.DeleteRole(roles_pb.DeleteRoleRequest(name="admin"), metadata=md(key)),
        svc.keys.GetApiKey(keys_pb.GetApiKeyRequest(key_id=missing), metadata=md(key)),
        svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(user_id=missing), metadata=md(key)),
        svc.audit.ListAuditEvents(audit_pb.ListAuditEventsRequest(), metadata=md(key)),
    ]
    for call in calls:
        await expect(call, DENIED, "permission")
    denied = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="permission.denied", page_size=100),
        metadata=svc.admin,
    )
    assert len(denied.events) == len(calls)
    assert all(e.outcome == "failure" and e.details["permission"] for e in denied.events)


async def test_roles_crud_and_in_use_role_cannot_be_deleted(svc: Auth) -> None:
    user_id, key = await make_user(svc, "rol", ["generate"])
    await expect(
        svc.roles.DeleteRole(roles_pb.DeleteRoleRequest(name="r-rol"), metadata=svc.admin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "held by 1",
    )
    got = await svc.roles.GetRole(roles_pb.GetRoleRequest(name="r-rol"), metadata=svc.admin)
    assert list(got.role.permissions) == ["generate"]
    await svc.roles.UpdateRole(
        roles_pb.UpdateRoleRequest(
            role=resources_pb2.Role(name="r-rol", permissions=["generate", "models.list"]),
            update_mask={"paths": ["permissions"]},
        ),
        metadata=svc.admin,
    )
    p = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))
    assert set(p.principal.permissions) == {"generate", "models.list"}
    names = await svc.roles.ListRoles(roles_pb.ListRolesRequest(), metadata=svc.admin)
    assert [r.name for r in names.roles] == ["admin", "r-rol"]
    await svc.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=resources_pb2.User(user_id=user_id, roles=[]), update_mask={"paths": ["roles"]}
        ),
        metadata=svc.admin,
    )
    await svc.roles.DeleteRole(roles_pb.DeleteRoleRequest(name="r-rol"), metadata=svc.admin)
    await expect(
        svc.roles.GetRole(roles_pb.GetRoleRequest(name="r-rol"), metadata=svc.admin),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_the_last_admin_cannot_be_removed(svc: Auth) -> None:
    admin_id = (
        await svc.auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=svc.admin)
    ).principal.user_id
    await expect(
        svc.users.DeleteUser(users_pb.DeleteUserRequest(user_id=admin_id), metadata=svc.admin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "last admin",
    )


async def test_user_reads_self_without_users_admin(svc: Auth) -> None:
    user_id, key = await make_user(svc, "selfie", ["generate"])
    got = await svc.users.GetUser(users_pb.GetUserRequest(user_id=user_id), metadata=md(key))
    assert got.user.username == "selfie"


async def test_concurrent_creates_of_one_name_never_fail_internally(svc: Auth) -> None:
    request = users_pb.CreateUserRequest(username="racer", password="password-123")
    results = await asyncio.gather(
        *(svc.users.CreateUser(request, metadata=svc.admin) for _ in range(4)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 3
    assert {f.code() for f in failed} == {grpc.StatusCode.ALREADY_EXISTS}
