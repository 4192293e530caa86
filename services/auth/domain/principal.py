"""Who a credential belongs to and what it may do, resolved from the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.auth.db.models import ApiKeyRow, SessionRow, UsageDailyRow, UserRow
from services.auth.domain.permissions import (
    Limits,
    expand,
    key_limits,
    min_limits,
    narrow_models,
)

USER_KEY, SERVICE_KEY, SESSION = "user_key", "service_key", "session"


@dataclass(frozen=True)
class Principal:
    """The answer to Authenticate: identity, effective permissions, models, limits."""

    user_id: str
    username: str
    credential_id: str
    credential_type: str
    permissions: frozenset[str]
    allowed_models: tuple[str, ...]
    limits: Limits
    expire_time: datetime | None
    quota_used_tokens: int = 0
    roles: tuple[str, ...] = ()
    # The user's own (role) limits, counted across all the user's credentials;
    # `limits` are the credential's effective ones (role narrowed by the key).
    user_limits: Limits = Limits()
    # The user who made this key for its owner (a keys.admin holder), or "".
    minted_by: str = ""

    def has(self, permission: str) -> bool:
        """Whether the principal holds `permission` ("admin" holds every one)."""
        return permission in self.permissions


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of an RPC and where the call came from."""

    principal: Principal
    peer: str = ""
    details: dict[str, str] = field(default_factory=dict)


def owner_grants(user: UserRow) -> tuple[frozenset[str], list[str], Limits]:
    """The permissions, model patterns and limits a user holds through roles."""
    perms: set[str] = set()
    models: set[str] = set()
    for role in user.roles:
        perms.update(role.permissions)
        models.update(role.allowed_models)
    limits = min_limits(Limits.from_json(role.limits) for role in user.roles)
    return expand(perms), sorted(models), limits


def period_start(period: str, now: datetime) -> str:
    """First day (YYYY-MM-DD) of the quota period containing `now`."""
    return now.strftime("%Y-%m-01" if period == "month" else "%Y-%m-%d")


def quota_used(session: Session, user_id: str, period: str, now: datetime) -> int:
    """Tokens the user used in the current quota period (from the daily roll-up)."""
    total = session.scalar(
        select(
            func.coalesce(
                func.sum(UsageDailyRow.prompt_tokens + UsageDailyRow.completion_tokens), 0
            )
        ).where(UsageDailyRow.user_id == user_id, UsageDailyRow.day >= period_start(period, now))
    )
    return int(total or 0)


def key_principal(session: Session, key: ApiKeyRow, user: UserRow, now: datetime) -> Principal:
    """Effective principal of an API key: the key narrowed by its owner's roles."""
    perms, models, limits = owner_grants(user)
    if key.permissions:
        perms = perms & expand(key.permissions)
    eff_limits = key_limits(limits, Limits.from_json(key.limits))
    return Principal(
        user_id=user.id,
        username=user.username,
        credential_id=key.id,
        credential_type=SERVICE_KEY if user.service_account else USER_KEY,
        permissions=perms,
        allowed_models=tuple(narrow_models(list(key.allowed_models), models)),
        limits=eff_limits,
        expire_time=key.expires_at,
        quota_used_tokens=quota_used(session, user.id, eff_limits.quota_period, now),
        roles=tuple(r.name for r in user.roles),
        user_limits=limits,
        minted_by=key.created_by or "",
    )


def session_principal(session: Session, row: SessionRow, user: UserRow, now: datetime) -> Principal:
    """Principal of a login session: everything the user holds."""
    perms, models, limits = owner_grants(user)
    return Principal(
        user_id=user.id,
        username=user.username,
        credential_id=row.id,
        credential_type=SESSION,
        permissions=perms,
        allowed_models=tuple(models),
        limits=limits,
        expire_time=row.expires_at,
        quota_used_tokens=quota_used(session, user.id, limits.quota_period, now),
        roles=tuple(r.name for r in user.roles),
        user_limits=limits,
    )


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)
