"""Proto ↔ domain conversions for the auth servicers (no grpc, no SQL)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2
from tokenyard.auth.v1 import audit_service_pb2, resources_pb2, usage_service_pb2

from services.auth.db.models import ApiKeyRow, AuditRow, RoleRow, UserRow
from services.auth.domain.permissions import LIMIT_FIELDS, SWITCH_FIELDS, Limits
from services.auth.domain.principal import SERVICE_KEY, SESSION, USER_KEY, Principal
from services.auth.domain.usage import UsageSum
from services.common.errors import InvalidArgument

_CRED_TYPES = {
    USER_KEY: resources_pb2.CREDENTIAL_TYPE_USER_KEY,
    SERVICE_KEY: resources_pb2.CREDENTIAL_TYPE_SERVICE_KEY,
    SESSION: resources_pb2.CREDENTIAL_TYPE_SESSION,
}
_PERIODS = {"day": resources_pb2.QUOTA_PERIOD_DAY, "month": resources_pb2.QUOTA_PERIOD_MONTH}
MAX_TIMESTAMP = datetime(9999, 12, 31, tzinfo=UTC)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None for unset."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def from_ts(msg: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A UTC datetime from a Timestamp, refusing out-of-range values."""
    try:
        value = msg.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "timestamp out of range") from None
    if value > MAX_TIMESTAMP:
        raise InvalidArgument(field, "timestamp out of range")
    return value


def opt_ts(parent: object, name: str, field: str) -> datetime | None:
    """The datetime of an optional Timestamp field of `parent`, or None."""
    if not parent.HasField(name):  # type: ignore[attr-defined]
        return None
    return from_ts(getattr(parent, name), field)


def limits_to_proto(limits: Limits) -> resources_pb2.Limits:
    """Proto Limits; unset fields stay unset."""
    out = resources_pb2.Limits()
    for name in LIMIT_FIELDS:
        value = limits.get(name)
        if value is not None:
            setattr(out, name, bool(value) if name in SWITCH_FIELDS else value)
    if limits.get("token_quota") is not None:
        out.quota_period = _PERIODS.get(limits.quota_period, resources_pb2.QUOTA_PERIOD_DAY)
    return out


def limits_from_proto(msg: resources_pb2.Limits) -> Limits:
    """Domain Limits from a request."""
    values = {name: int(getattr(msg, name)) for name in LIMIT_FIELDS if msg.HasField(name)}
    period = "month" if msg.quota_period == resources_pb2.QUOTA_PERIOD_MONTH else "day"
    return Limits(values, period)


def principal_to_proto(p: Principal) -> resources_pb2.Principal:
    """The Principal message routers read."""
    return resources_pb2.Principal(
        user_id=p.user_id,
        username=p.username,
        credential_id=p.credential_id,
        credential_type=_CRED_TYPES[p.credential_type],
        permissions=sorted(p.permissions),
        allowed_models=list(p.allowed_models),
        limits=limits_to_proto(p.limits),
        user_limits=limits_to_proto(p.user_limits),
        expire_time=ts(p.expire_time),
        quota_used_tokens=p.quota_used_tokens,
        roles=list(p.roles),
    )


def user_to_proto(u: UserRow) -> resources_pb2.User:
    """A User message (never the password hash)."""
    return resources_pb2.User(
        user_id=u.id,
        username=u.username,
        display_name=u.display_name,
        roles=[r.name for r in u.roles],
        disabled=u.disabled,
        service_account=u.service_account,
        create_time=ts(u.created_at),
        update_time=ts(u.updated_at),
        locked_until=ts(u.locked_until),
    )


def role_to_proto(r: RoleRow) -> resources_pb2.Role:
    """A Role message."""
    return resources_pb2.Role(
        name=r.name,
        description=r.description,
        permissions=list(r.permissions),
        allowed_models=list(r.allowed_models),
        limits=limits_to_proto(Limits.from_json(r.limits)),
        create_time=ts(r.created_at),
        update_time=ts(r.updated_at),
    )


def key_to_proto(k: ApiKeyRow) -> resources_pb2.ApiKey:
    """An ApiKey message: hint only, never the secret or its digest."""
    return resources_pb2.ApiKey(
        key_id=k.id,
        user_id=k.user_id,
        name=k.name,
        hint=k.hint,
        permissions=list(k.permissions),
        allowed_models=list(k.allowed_models),
        limits=limits_to_proto(Limits.from_json(k.limits)),
        expire_time=ts(k.expires_at),
        revoke_time=ts(k.revoked_at),
        create_time=ts(k.created_at),
        last_used_time=ts(k.last_used_at),
        rotated_from_key_id=k.rotated_from_id or "",
    )


def audit_to_proto(a: AuditRow) -> audit_service_pb2.AuditEvent:
    """An AuditEvent message."""
    return audit_service_pb2.AuditEvent(
        event_id=str(a.id),
        event_time=ts(a.event_time),
        actor_user_id=a.actor_user_id,
        actor_credential_id=a.actor_credential_id,
        action=a.action,
        object_type=a.object_type,
        object_id=a.object_id,
        outcome=a.outcome,
        peer=a.peer,
        details={str(k): str(v) for k, v in (a.details or {}).items()},
    )


def usage_to_proto(u: UsageSum) -> usage_service_pb2.UsageRow:
    """A UsageRow message."""
    return usage_service_pb2.UsageRow(
        day=u.day,
        user_id=u.user_id,
        credential_id=u.credential_id,
        model=u.model,
        requests=u.requests,
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_completion_tokens=u.cached_completion_tokens,
    )


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of `seconds`."""
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out
