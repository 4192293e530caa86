"""Audit flood control: unauthenticated failures and denials are counted, not all written.

Anyone can send failed logins, and any key holder permission denials, as fast as
the network allows; one audit row each would let them fill the disk and bury the
events that matter. Each such event instead bumps two counters for the current
minute (one for its peer, one for its user) in `audit_tallies`, atomically
(INSERT ... ON CONFLICT DO UPDATE on SQLite and PostgreSQL), so no event goes
uncounted; it also becomes an audit row only while both counters are within
`rows_per_minute`. The clock is the caller's, so tests need no sleeps.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.auth.db.models import AuditTallyRow
from services.auth.domain import audit
from services.auth.domain.principal import Caller

PEER, USER = "peer", "user"


def peer_host(peer: str) -> str:
    """The calling address without its (ephemeral) port: `ipv4:10.0.0.7:53211` → `ipv4:10.0.0.7`."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host, colon, port = rest.rpartition(":")
    return f"{kind}:{host}" if colon and port.isdigit() else peer


def window_of(now: datetime) -> datetime:
    """The start of the minute holding `now`."""
    return now.replace(second=0, microsecond=0)


def bump(session: Session, action: str, scope: str, subject: str, now: datetime) -> int:
    """Count one event for (`scope`, `subject`) this minute; the count so far."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(AuditTallyRow).values(
        window_start=window_of(now),
        action=action,
        scope=scope,
        subject=audit.printable(subject, 200),
        count=1,
        last_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["window_start", "action", "scope", "subject"],
        set_={"count": AuditTallyRow.count + 1, "last_at": now},
    )
    count = session.scalar(stmt.returning(AuditTallyRow.count))
    return int(count or 0)


def record_throttled(
    session: Session,
    action: str,
    *,
    user: str,
    peer: str,
    now: datetime,
    rows_per_minute: int,
    caller: Caller | None = None,
    object_type: str = "",
    object_id: str = "",
    actor_user_id: str = "",
    details: dict[str, str] | None = None,
) -> bool:
    """Count the event per peer and per user; write its row while both are within the cap."""
    from_peer = bump(session, action, PEER, peer_host(peer), now)
    from_user = bump(session, action, USER, user, now)
    if max(from_peer, from_user) > rows_per_minute:
        return False
    audit.record(
        session,
        action,
        caller=caller,
        object_type=object_type,
        object_id=object_id,
        outcome="failure",
        peer=peer,
        actor_user_id=actor_user_id,
        details=details,
        when=now,
    )
    return True
