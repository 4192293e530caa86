"""AuditService's domain: reading the append-only log, newest first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.auth.db.models import AuditRow
from services.auth.domain import pages, validation
from services.auth.domain.principal import Caller

if TYPE_CHECKING:
    from services.auth.core import AuthCore


@dataclass(frozen=True)
class AuditQuery:
    """Filters and paging of ListAuditEvents."""

    page_size: int = 0
    page_token: str = ""
    actor_user_id: str = ""
    action: str = ""
    object_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


class AuditLog:
    """Paginated, filtered reads of the audit log."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def list_page(self, caller: Caller, q: AuditQuery) -> tuple[list[AuditRow], str]:
        """A page of events matching `q`."""
        await self.core.require(caller, "audit.read", "ListAuditEvents")
        limit = pages.page_size(q.page_size)
        validation.text(q.actor_user_id, "actor_user_id", 36)
        validation.text(q.action, "action", 64)
        validation.text(q.object_id, "object_id", 128)
        filters = [
            "audit",
            q.actor_user_id,
            q.action,
            q.object_id,
            q.start_time.isoformat() if q.start_time else "",
            q.end_time.isoformat() if q.end_time else "",
        ]
        after = pages.decode(q.page_token, filters)
        if after is not None and not isinstance(after[0], int):
            from services.common.errors import InvalidArgument

            raise InvalidArgument("page_token", "malformed page token")

        def query(session: Session) -> list[AuditRow]:
            stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit + 1)
            if q.actor_user_id:
                stmt = stmt.where(AuditRow.actor_user_id == q.actor_user_id)
            if q.action:
                stmt = stmt.where(AuditRow.action == q.action)
            if q.object_id:
                stmt = stmt.where(AuditRow.object_id == q.object_id)
            if q.start_time:
                stmt = stmt.where(AuditRow.event_time >= q.start_time)
            if q.end_time:
                stmt = stmt.where(AuditRow.event_time < q.end_time)
            if after is not None:
                stmt = stmt.where(AuditRow.id < int(after[0]))
            return list(session.scalars(stmt))

        rows = await self.core.db.read(query)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, pages.encode([rows[-1].id], filters) if more else ""
