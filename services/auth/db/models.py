"""SQLAlchemy models: users, roles, keys, sessions, usage, audit, revocations.

Secrets are never stored: API keys and session tokens as HMAC-SHA256 digests,
passwords as argon2id hashes. Times are UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# SQLite autoincrements only INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the auth schema."""


class UserRow(Base):
    """A person or service account."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    service_account: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    roles: Mapped[list[RoleRow]] = relationship(
        secondary="user_roles", lazy="selectin", order_by="RoleRow.name"
    )


class RoleRow(Base):
    """A named set of permissions, model patterns and limits."""

    __tablename__ = "roles"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)


class UserRoleRow(Base):
    """Grant of a role to a user."""

    __tablename__ = "user_roles"
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role_name: Mapped[str] = mapped_column(
        ForeignKey("roles.name", ondelete="RESTRICT"), primary_key=True
    )


class ApiKeyRow(Base):
    """An API key, stored as its digest only."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("user_id", "request_id", name="uq_api_keys_request"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    hint: Mapped[str] = mapped_column(String(32))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    hash_version: Mapped[int] = mapped_column(Integer)
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    rotated_from_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Who made the key when it was not its owner (a keys.admin holder), for the audit log.
    created_by: Mapped[str | None] = mapped_column(String(36), nullable=True)


class SessionRow(Base):
    """A login session, stored as its token's digest only."""

    __tablename__ = "login_sessions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    hash_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    peer: Mapped[str] = mapped_column(String(200), default="")


class UsageRow(Base):
    """Usage of one request; request_id makes recording idempotent."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_user_day", "user_id", "day"),)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    credential_id: Mapped[str] = mapped_column(String(36))
    user_id: Mapped[str] = mapped_column(String(36))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    start_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    end_time: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(32))
    day: Mapped[str] = mapped_column(String(10))
    # The caller's id for its end user (OpenAI's `user`); "" when not given.
    end_user: Mapped[str] = mapped_column(String(256), default="", server_default="")
    # Completion tokens the router's response cache replayed (a hit: 0 prompt/completion).
    cached_completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageDailyRow(Base):
    """Usage summed per day, user, credential and model (for quotas)."""

    __tablename__ = "usage_daily"
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    credential_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class AuditRow(Base):
    """An append-only security event (triggers refuse UPDATE and DELETE)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_action", "action"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor_user_id: Mapped[str] = mapped_column(String(36), default="", index=True)
    actor_credential_id: Mapped[str] = mapped_column(String(36), default="")
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32), default="")
    object_id: Mapped[str] = mapped_column(String(128), default="", index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    peer: Mapped[str] = mapped_column(String(200), default="")
    details: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)


class AuditTallyRow(Base):
    """How many events of a throttled kind one peer or one user caused in one minute.

    Failed logins and permission denials are counted here, every one; only the
    first few per peer and per user each minute also become audit rows.
    """

    __tablename__ = "audit_tallies"
    window_start: Mapped[datetime] = mapped_column(UtcDateTime, primary_key=True)
    action: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject: Mapped[str] = mapped_column(String(200), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    last_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RevocationRow(Base):
    """A credential or user whose cached principals must be dropped (read by replicas)."""

    __tablename__ = "revocations"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    credential_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


__all__ = [
    "ApiKeyRow",
    "AuditRow",
    "AuditTallyRow",
    "Base",
    "RevocationRow",
    "RoleRow",
    "SessionRow",
    "UsageDailyRow",
    "UsageRow",
    "UserRoleRow",
    "UserRow",
]
