"""The append-only audit log: who did what to which object, when, from where."""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.auth.db.models import AuditRow
from services.auth.domain.principal import Caller, utcnow


def _clean(text: str, limit: int) -> str:
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
) -> None:
    """Append one event in the caller's transaction. `details` must never hold a secret."""
    principal = caller.principal if caller else None
    session.add(
        AuditRow(
            event_time=utcnow(),
            actor_user_id=principal.user_id if principal else actor_user_id,
            actor_credential_id=principal.credential_id if principal else "",
            action=action,
            object_type=object_type,
            object_id=_clean(object_id, 128),
            outcome=outcome,
            peer=_clean(caller.peer if caller else peer, 200),
            details={k: _clean(v, 500) for k, v in (details or {}).items()},
        )
    )
