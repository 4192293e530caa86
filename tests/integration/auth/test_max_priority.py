"""The `max_priority` limit: default 0, the stricter of role and key wins, no escalation.

Each test tries to get around the cap the way an attacker would: a key asking more
than its own cap, a key minted above its owner's roles, a role admin granting a cap
they do not hold, an admin with a weaker role raising a stronger user.
"""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import user_service_pb2 as users_pb

from services.common.errors import PermissionDenied
from services.router.admission import check_priority, max_priority_of
from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, field_of, make_role, make_user, md

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def principal(svc: Auth, key: str) -> resources_pb2.Principal:
    reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))
    out: resources_pb2.Principal = reply.principal
    return out


async def test_unset_everywhere_caps_priority_at_zero(svc: Auth) -> None:
    _, key = await make_user(svc, "plain", ["generate", "keys.manage_own"])
    limits = (await principal(svc, key)).limits
    assert max_priority_of(limits) == 0
    check_priority(0, limits)
    check_priority(-5, limits)  # sheddable is always allowed
    with pytest.raises(PermissionDenied) as refused:
        check_priority(1, limits)
    assert refused.value.field == "priority"
    # A key the owner mints with a cap of 5 cannot lift the roles' default of 0.
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="lifted", limits=resources_pb2.Limits(max_priority=5)),
        metadata=md(key),
    )
    assert max_priority_of((await principal(svc, made.secret)).limits) == 0


async def test_key_cap_narrows_the_role_and_only_for_that_key(svc: Auth) -> None:
    user_id, key = await make_user(
        svc, "vip", ["generate", "keys.manage_own"], limits=resources_pb2.Limits(max_priority=5)
    )
    capped = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="capped", limits=resources_pb2.Limits(max_priority=1)),
        metadata=md(key),
    )
    capped_limits = (await principal(svc, capped.secret)).limits
    assert max_priority_of(capped_limits) == 1
    with pytest.raises(PermissionDenied):
        check_priority(3, capped_limits)  # the role allows 5; this key does not
    # A second key of the same user keeps the role's cap.
    second = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=user_id, name="second"), metadata=svc.admin
    )
    second_limits = (await principal(svc, second.secret)).limits
    assert max_priority_of(second_limits) == 5
    check_priority(3, second_limits)
    with pytest.raises(PermissionDenied):
        check_priority(6, second_limits)


async def test_role_admin_cannot_grant_a_cap_they_do_not_hold(svc: Auth) -> None:
    _, key = await make_user(svc, "rad", ["roles.admin", "generate"])  # cap 0 by default
    role = resources_pb2.Role(
        name="loud", permissions=["generate"], limits=resources_pb2.Limits(max_priority=3)
    )
    refused = await expect(
        svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=md(key)),
        DENIED,
        "max_priority",
    )
    assert field_of(refused) == "role.limits"
    # At or below their own default cap is fine.
    ok = resources_pb2.Role(
        name="quiet", permissions=["generate"], limits=resources_pb2.Limits(max_priority=-1)
    )
    made = await svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=ok), metadata=md(key))
    assert made.role.limits.max_priority == -1


async def test_admin_with_a_weaker_cap_cannot_raise_or_touch_a_stronger_user(svc: Auth) -> None:
    await make_role(
        svc, "ua", ["users.admin", "generate"], limits=resources_pb2.Limits(max_priority=1)
    )
    ua = await svc.users.CreateUser(
        users_pb.CreateUserRequest(username="uadmin", password="password-123", roles=["ua"]),
        metadata=svc.admin,
    )
    ua_key = (
        await svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=ua.user.user_id, name="k"), metadata=svc.admin
        )
    ).secret
    await make_role(svc, "strong", ["generate"], limits=resources_pb2.Limits(max_priority=5))
    await make_role(svc, "weak", ["generate"], limits=resources_pb2.Limits(max_priority=0))
    target = await svc.users.CreateUser(
        users_pb.CreateUserRequest(username="target", password="password-123", roles=["weak"]),
        metadata=svc.admin,
    )
    # Raising someone to a role above one's own cap is refused...
    await expect(
        svc.users.UpdateUser(
            users_pb.UpdateUserRequest(
                user=resources_pb2.User(user_id=target.user.user_id, roles=["strong"]),
                update_mask={"paths": ["roles"]},
            ),
            metadata=md(ua_key),
        ),
        DENIED,
    )
    # ... and a user who already holds more cannot be acted on at all.
    strong = await svc.users.CreateUser(
        users_pb.CreateUserRequest(username="strong", password="password-123", roles=["strong"]),
        metadata=svc.admin,
    )
    await expect(
        svc.users.UpdateUser(
            users_pb.UpdateUserRequest(
                user=resources_pb2.User(user_id=strong.user.user_id, roles=["weak"]),
                update_mask={"paths": ["roles"]},
            ),
            metadata=md(ua_key),
        ),
        DENIED,
    )
    await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=strong.user.user_id, name="x"),
            metadata=md(ua_key),
        ),
        DENIED,
    )


async def test_max_priority_out_of_range_is_invalid(svc: Auth) -> None:
    role = resources_pb2.Role(
        name="huge", permissions=["generate"], limits=resources_pb2.Limits(max_priority=10**6)
    )
    refused = await expect(
        svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=svc.admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_priority",
    )
    assert field_of(refused) == "limits.max_priority"
