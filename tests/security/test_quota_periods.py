"""Quota periods: quotas compare in one unit (tokens per day and per month at most)."""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import role_service_pb2 as roles_pb

from services.auth.domain.permissions import Limits, limits_within, min_limits
from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, field_of, make_user, md

DAY, MONTH = res.QUOTA_PERIOD_DAY, res.QUOTA_PERIOD_MONTH


def quota(tokens: int, period: str) -> Limits:
    return Limits({"token_quota": tokens}, period)


@pytest.mark.parametrize(
    ("requested", "holder", "within"),
    [
        (quota(30_000, "day"), quota(30_000, "month"), False),  # 930k a month > 30k
        (quota(30_000, "month"), quota(30_000, "day"), True),
        (quota(1_000, "month"), quota(100, "day"), False),  # all 1,000 on one day > 100
        (quota(900, "day"), quota(30_000, "month"), True),  # 27,900 a month at most
        (quota(1_000, "day"), quota(30_000, "month"), False),  # 31,000 in a long month
    ],
)
def test_quota_comparison_uses_one_unit(requested: Limits, holder: Limits, within: bool) -> None:
    """Attack: a caller limited to 30k tokens a month grants 30k a day (30x its own)."""
    assert (limits_within(requested, holder) is None) is within


def test_combined_quota_is_within_every_level() -> None:
    """Attack: a key's 30k/day combined with its role's 30k/month kept the day quota,
    so the key could spend 30x the role's month."""
    for levels in (
        [quota(30_000, "month"), quota(30_000, "day")],
        [quota(30_000, "day"), quota(30_000, "month")],
    ):
        both = min_limits(levels)
        assert (both.values["token_quota"], both.quota_period) == (30_000, "month")
    mixed = min_limits([quota(1_000, "day"), quota(20_000, "month")])
    assert limits_within(mixed, quota(1_000, "day")) is None
    assert limits_within(mixed, quota(20_000, "month")) is None


async def test_role_admin_cannot_grant_a_day_quota_its_month_quota_does_not_cover(
    svc: Auth,
) -> None:
    """Attack: a role admin with 30,000 tokens a month creates a role with 30,000 a day."""
    mine = res.Limits(token_quota=30_000, quota_period=MONTH)
    _, key = await make_user(svc, "roleadmin", ["roles.admin", "generate"], limits=mine)
    role = res.Role(
        name="daily",
        permissions=["generate"],
        allowed_models=["*"],
        limits=res.Limits(token_quota=30_000, quota_period=DAY),
    )
    exc = await expect(
        svc.roles.CreateRole(roles_pb.CreateRoleRequest(role=role), metadata=md(key)),
        grpc.StatusCode.PERMISSION_DENIED,
        "token_quota",
    )
    assert field_of(exc) == "role.limits"


async def test_key_day_quota_does_not_replace_the_role_month_quota(svc: Auth) -> None:
    """Attack: a key with 29,999 a day on a role with 30,000 a month authenticated with
    the day quota (the smaller number), so the router let it spend 29,999 every day."""
    monthly = res.Limits(token_quota=30_000, quota_period=MONTH)
    user, _ = await make_user(svc, "monthly", ["generate"], limits=monthly)
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            user_id=user, name="daily", limits=res.Limits(token_quota=29_999, quota_period=DAY)
        ),
        metadata=svc.admin,
    )
    got = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=made.secret))
    tokens, monthly = got.principal.limits.token_quota, got.principal.limits.quota_period == MONTH
    # At most 29,999 on any day and 30,000 in any month (31 days), computed here by hand.
    most_a_day, most_a_month = (tokens, tokens) if monthly else (tokens, tokens * 31)
    assert 0 < most_a_day <= 29_999 and most_a_month <= 30_000
