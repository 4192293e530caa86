"""Issue 18 §1 on auth: the `response_cache` limit (role and key, off wins, no
escalation) and usage records of cache hits (cached tokens apart, no quota)."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2
from tokenyard.auth.v1 import role_service_pb2 as roles_pb
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb

from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, make_user, md
from tests.integration.auth.test_usage_audit import ts


async def limits_of(svc: Auth, credential: str) -> resources_pb2.Limits:
    reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=credential))
    limits: resources_pb2.Limits = reply.principal.limits
    return limits


async def key_with(svc: Auth, user_id: str, metadata: object, *, response_cache: bool) -> str:
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            user_id=user_id, name="k2", limits=resources_pb2.Limits(response_cache=response_cache)
        ),
        metadata=metadata,
    )
    secret: str = made.secret
    return secret


async def test_role_and_key_combine_and_off_wins(svc: Auth) -> None:
    """The role switches the cache on; a key may switch it off (never back on past a
    role's off); a role without the field leaves it to the key."""
    on = resources_pb2.Limits(response_cache=True)
    user_on, key_on = await make_user(svc, "cache-on", ["generate", "keys.manage_own"], limits=on)
    effective = await limits_of(svc, key_on)
    assert effective.HasField("response_cache") and effective.response_cache
    narrowed = await key_with(svc, user_on, md(key_on), response_cache=False)
    assert not (await limits_of(svc, narrowed)).response_cache

    off = resources_pb2.Limits(response_cache=False)
    user_off, key_off = await make_user(
        svc, "cache-off", ["generate", "keys.manage_own"], limits=off
    )
    assert not (await limits_of(svc, key_off)).response_cache
    # Attack: the user makes a key of their own with the cache on; it stays off, as
    # does an admin's key for them: a key's limits only narrow the role's.
    for maker in (md(key_off), svc.admin):
        own = await key_with(svc, user_off, maker, response_cache=True)
        assert not (await limits_of(svc, own)).response_cache
    # Attack: a roles.admin whose own role has the cache off makes a role with it on.
    _, roles_admin = await make_user(svc, "roles-off", ["roles.admin", "generate"], limits=off)
    for name, limits in (("sneaky", resources_pb2.Limits(response_cache=True)), ("plain", None)):
        call = svc.roles.CreateRole(
            roles_pb.CreateRoleRequest(
                role=resources_pb2.Role(
                    name=name, permissions=["generate"], allowed_models=["*"], limits=limits
                )
            ),
            metadata=md(roles_admin),
        )
        if name == "sneaky":
            await expect(call, grpc.StatusCode.PERMISSION_DENIED, "response_cache")
        else:
            await call  # leaving it unset switches nothing on: allowed

    _, key_unset = await make_user(svc, "cache-unset", ["generate"])
    assert not (await limits_of(svc, key_unset)).HasField("response_cache")


async def test_a_hit_is_recorded_with_its_cached_tokens_apart(svc: Auth) -> None:
    """A hit's record has 0 prompt and completion tokens (no quota used) and its
    replayed tokens in cached_completion_tokens, summed by GetUsage."""
    quota = resources_pb2.Limits(token_quota=1000, response_cache=True)
    user_id, key = await make_user(svc, "cache-usage", ["generate"], limits=quota)
    principal = (await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))).principal
    now = ts(datetime.now(UTC))
    common = {
        "credential_id": principal.credential_id,
        "user_id": user_id,
        "model": "m",
        "start_time": now,
        "end_time": now,
        "status": "OK",
    }
    batch = [
        usage_pb.UsageRecord(request_id="miss", prompt_tokens=4, completion_tokens=6, **common),
        usage_pb.UsageRecord(request_id="hit", cached_completion_tokens=6, **common),
    ]
    await svc.usage.RecordUsage(usage_pb.RecordUsageRequest(records=batch))
    mine = await svc.usage.GetUsage(usage_pb.GetUsageRequest(), metadata=md(key))
    assert (mine.total_requests, mine.total_completion_tokens) == (2, 6)
    assert mine.total_cached_completion_tokens == 6
    assert mine.rows[0].cached_completion_tokens == 6
    again = (await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=key))).principal
    assert again.quota_used_tokens == 10  # the hit used none of the quota
