"""Login and Logout: passwords checked behind the lockout reservation, sessions opened.

An attempt on an account is counted before its password is verified
(lockout.py); failures are counted per peer and per user (audit_flood.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.auth.db.models import SessionRow, UserRow
from services.auth.domain import audit, audit_flood, credentials, lockout, validation
from services.auth.domain.lockout import Attempt
from services.auth.domain.passwords import MAX_PASSWORD_BYTES
from services.auth.domain.principal import Caller, utcnow
from services.auth.domain.revocations import Revocations
from services.common.errors import FailedPrecondition, InvalidArgument, Unauthenticated

if TYPE_CHECKING:
    from services.auth.core import AuthCore

AUTH_FAILURES = Counter(
    "tokenyard_auth_failures_total", "Refused credentials and logins, by reason.", ["reason"]
)
LOGIN_FAILED = "invalid username or password"


@dataclass(frozen=True)
class LoginResult:
    """A new session: its token (shown once), expiry and user."""

    token: str
    expire_time: datetime
    user: UserRow


async def login(core: AuthCore, username: str, password: str, peer: str) -> LoginResult:
    """Check a password; lock out after repeated failures; open a session."""
    if not username:
        raise InvalidArgument("username", "must not be empty")
    if len(username) > 64:
        raise InvalidArgument("username", "must be at most 64 characters")
    if not password:
        raise InvalidArgument("password", "must not be empty")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise InvalidArgument("password", f"must be at most {MAX_PASSWORD_BYTES} bytes")
    user = None
    if validation.USERNAME_RE.fullmatch(username):  # else it cannot exist
        user = await core.db.read(
            lambda s: s.scalar(select(UserRow).where(UserRow.username == username))
        )
    now = core.clock()
    # Counted before the password is checked (lockout.py); for an unknown user the
    # same write matches no row, so both answers take as long.
    uid = user.id if user is not None else ""
    attempt = await core.db.write(lockout.reserve, uid, core.lockout, now)
    stored = user.password_hash if user is not None and attempt.allowed else None
    ok = await asyncio.to_thread(core.passwords.verify, stored, password)
    if user is None or not ok or user.disabled or not attempt.allowed:
        reason = (
            "unknown_user"
            if user is None
            else "locked"
            if not attempt.allowed
            else "disabled"
            if user.disabled
            else "bad_password"
        )
        await core.db.write(
            _login_failed, core, user.id if user else None, username, peer, reason, attempt, now
        )
        AUTH_FAILURES.labels("LOGIN_FAILED").inc()
        raise Unauthenticated(LOGIN_FAILED, reason="LOGIN_FAILED")
    assert user.password_hash is not None
    new_hash = None
    if core.passwords.needs_rehash(user.password_hash):
        new_hash = await asyncio.to_thread(core.passwords.hash, password)
    token = credentials.generate(credentials.SESSION_PREFIX)
    expires = now + timedelta(seconds=core.settings.session_ttl)
    await core.db.write(_login_ok, core, user.id, core.digest(token), expires, peer, new_hash)
    return LoginResult(token, expires, user)


def _login_failed(  # noqa: PLR0917 - one transaction, called positionally via db.write
    session: Session,
    core: AuthCore,
    user_id: str | None,
    username: str,
    peer: str,
    reason: str,
    attempt: Attempt,
    now: datetime,
) -> None:
    audit_flood.record_throttled(
        session,
        "login.failure",
        user=user_id or f"name:{username}",
        peer=peer,
        now=now,
        rows_per_minute=core.settings.audit_rows_per_minute,
        object_type="user",
        object_id=user_id or username,
        actor_user_id=user_id or "",
        details={"reason": reason},
    )
    if user_id is not None and attempt.locked_seconds:
        lockout.record_lockout(session, user_id, peer, attempt)


def _login_ok(  # noqa: PLR0917 - one transaction, called positionally via db.write
    session: Session,
    core: AuthCore,
    user_id: str,
    digest: str,
    expires: datetime,
    peer: str,
    new_hash: str | None,
) -> None:
    values: dict[str, Any] = {"failed_logins": 0, "locked_until": None}
    if new_hash is not None:
        values["password_hash"] = new_hash
    session.execute(update(UserRow).where(UserRow.id == user_id).values(**values))
    sid = validation.new_id()
    session.add(
        SessionRow(
            id=sid,
            user_id=user_id,
            digest=digest,
            hash_version=core.version,
            created_at=utcnow(),
            expires_at=expires,
            peer=peer[:200],
        )
    )
    audit.record(
        session,
        "login.success",
        object_type="session",
        object_id=sid,
        peer=peer,
        actor_user_id=user_id,
        details={"rehashed": str(new_hash is not None).lower()},
    )


async def logout(core: AuthCore, caller: Caller) -> None:
    """End the caller's session."""
    if caller.principal.credential_type != "session":
        raise FailedPrecondition(
            "Logout ends a session; revoke API keys with RevokeApiKey", reason="NOT_A_SESSION"
        )
    await core.mutate(_logout, caller)


def _logout(session: Session, pending: Revocations, caller: Caller) -> None:
    sid = caller.principal.credential_id
    session.execute(update(SessionRow).where(SessionRow.id == sid).values(revoked_at=utcnow()))
    pending.add(session, credential_ids=[sid])
    audit.record(session, "logout", caller=caller, object_type="session", object_id=sid)
