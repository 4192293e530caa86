"""Login lockout: each attempt on an account is reserved before its password is checked.

One conditional UPDATE counts the attempt and refuses it while the account is
locked; the attempt that reaches the threshold sets the lock in the same
transaction. Concurrent guesses queue on the row (PostgreSQL's row lock, SQLite's
BEGIN IMMEDIATE), so at most `threshold` passwords are ever verified per lockout
window, however many arrive at once. A success resets the count (login.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from services.auth.db.models import UserRow
from services.auth.domain import audit


@dataclass(frozen=True)
class LockoutPolicy:
    """When an account locks and for how long (doubling per further failure)."""

    threshold: int
    seconds: float
    max_seconds: float

    def duration(self, failures: int) -> float:
        """Seconds of lockout after `failures` consecutive failures (>= threshold)."""
        extra = failures - self.threshold
        return min(self.seconds * 2.0 ** min(extra, 30), self.max_seconds)


@dataclass(frozen=True)
class Attempt:
    """A reserved login attempt: whether it may be verified, and the lock it set."""

    allowed: bool
    failures: int = 0
    locked_seconds: float = 0.0


def reserve(session: Session, user_id: str, policy: LockoutPolicy, now: datetime) -> Attempt:
    """Count one attempt on `user_id` unless it is locked; lock it at the threshold."""
    failures = session.scalar(
        update(UserRow)
        .where(
            UserRow.id == user_id,
            or_(UserRow.locked_until.is_(None), UserRow.locked_until <= now),
        )
        .values(failed_logins=UserRow.failed_logins + 1)
        .returning(UserRow.failed_logins)
        .execution_options(synchronize_session=False)
    )
    if failures is None:
        return Attempt(allowed=False)
    if failures < policy.threshold:
        return Attempt(allowed=True, failures=failures)
    seconds = policy.duration(failures)
    session.execute(
        update(UserRow)
        .where(UserRow.id == user_id)
        .values(locked_until=now + timedelta(seconds=seconds))
        .execution_options(synchronize_session=False)
    )
    return Attempt(allowed=True, failures=failures, locked_seconds=seconds)


def record_lockout(session: Session, user_id: str, peer: str, attempt: Attempt) -> None:
    """The audit row of a lock this attempt set and then failed (always written)."""
    audit.record(
        session,
        "login.lockout",
        object_type="user",
        object_id=user_id,
        outcome="failure",
        peer=peer,
        actor_user_id=user_id,
        details={
            "failures": str(attempt.failures),
            "seconds": str(int(attempt.locked_seconds)),
        },
    )
