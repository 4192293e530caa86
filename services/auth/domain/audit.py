"""The append-only audit log: who did what to which object, when, from where."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from services.auth.db.models import AuditRow
from services.auth.domain.principal import Caller, utcnow


def printable(text: str, limit: int) -> str:
    """Printable text only (PostgreSQL refuses NUL; logs stay one line), cut to `limit`."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def record(
    session: Session,
    action: str,
    *,
    caller: Caller | None = None,
    object_type: str = "",
    object_id: str = "",
    outcome: str = "success",
    peer: str = "",
    actor_user_id: str = "",
    details: dict[str, str] | None = None,
    when: datetime | None = None,
) -> None:
    """Append one event in the caller's transaction. `details` must never hold a secret."""
    principal = caller.principal if caller else None
    details = dict(details or {})
    if principal is not None and principal.minted_by:
        details["key_minted_by"] = principal.minted_by  # the real actor behind the key
    session.add(
        AuditRow(
            event_time=when or utcnow(),
            actor_user_id=principal.user_id if principal else actor_user_id,
            actor_credential_id=principal.credential_id if principal else "",
            action=action,
            object_type=object_type,
            object_id=printable(object_id, 128),
            outcome=outcome,
            peer=printable(caller.peer if caller else peer, 200),
            details={k: printable(v, 500) for k, v in details.items()},
        )
    )
