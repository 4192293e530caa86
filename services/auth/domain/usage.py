"""UsageService's domain: idempotent recording and daily sums."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.auth.db.models import UsageDailyRow, UsageRow
from services.auth.domain import validation
from services.auth.domain.principal import Caller, utcnow
from services.common.errors import InvalidArgument
from services.common.requests import MAX_END_USER

if TYPE_CHECKING:
    from services.auth.core import AuthCore

MAX_RECORDS = 1000
MAX_TOKENS = 2**31


@dataclass(frozen=True)
class Record:
    """One request's usage as the router reports it."""

    request_id: str
    credential_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    start_time: datetime | None
    end_time: datetime | None
    status: str
    end_user: str = ""  # the caller's id for its end user, or ""
    cached_completion_tokens: int = 0  # replayed by the router's response cache


@dataclass(frozen=True)
class UsageQuery:
    """Filters of GetUsage."""

    user_id: str = ""
    credential_id: str = ""
    model: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    end_user: str = ""


@dataclass(frozen=True)
class UsageSum:
    """Usage summed for one day, user, credential and model."""

    day: str
    user_id: str
    credential_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_completion_tokens: int = 0


def _check(i: int, r: Record) -> None:
    f = f"records[{i}]"
    if not r.request_id:
        raise InvalidArgument(f"{f}.request_id", "must not be empty")
    validation.text(r.request_id, f"{f}.request_id", 128)
    validation.text(r.credential_id, f"{f}.credential_id", 36, required=True)
    validation.text(r.user_id, f"{f}.user_id", 36, required=True)
    validation.text(r.model, f"{f}.model", 200, required=True)
    validation.text(r.status, f"{f}.status", 32)
    validation.text(r.end_user, f"{f}.end_user", MAX_END_USER)
    if max(r.prompt_tokens, r.completion_tokens, r.cached_completion_tokens) >= MAX_TOKENS:
        raise InvalidArgument(f"{f}.prompt_tokens", "too large")


def _insert(dialect: str) -> Any:
    return (postgresql if dialect == "postgresql" else sqlite).insert


class Usage:
    """Usage recording and reporting over an AuthCore."""

    def __init__(self, core: AuthCore) -> None:
        self.core = core

    async def record(self, records: list[Record]) -> tuple[int, int]:
        """Store a batch; returns (accepted, duplicates). A retry never counts twice."""
        if len(records) > MAX_RECORDS:
            raise InvalidArgument("records", f"at most {MAX_RECORDS} per batch")
        for i, r in enumerate(records):
            _check(i, r)
        if not records:
            return 0, 0
        accepted = await self.core.db.write(self._record, records)
        return accepted, len(records) - accepted

    def _record(self, session: Session, records: list[Record]) -> int:
        now = utcnow()
        rows: dict[str, dict[str, Any]] = {}
        for r in records:
            start = r.start_time or now
            rows.setdefault(
                r.request_id,
                {
                    "request_id": r.request_id,
                    "credential_id": r.credential_id,
                    "user_id": r.user_id,
                    "model": r.model,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "start_time": start,
                    "end_time": r.end_time or start,
                    "status": r.status or "OK",
                    "end_user": r.end_user,
                    "cached_completion_tokens": r.cached_completion_tokens,
                    "day": start.strftime("%Y-%m-%d"),
                },
            )
        insert = _insert(self.core.db.dialect)
        stmt = (
            insert(UsageRow)
            .values(list(rows.values()))
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(UsageRow.request_id)
        )
        inserted = set(session.scalars(stmt))
        sums: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for rid in inserted:
            row = rows[rid]
            k = (row["day"], row["user_id"], row["credential_id"], row["model"])
            sums[k][0] += 1
            sums[k][1] += row["prompt_tokens"]
            sums[k][2] += row["completion_tokens"]
        for (day, uid, cid, model), (n, p, c) in sorted(sums.items()):
            up = insert(UsageDailyRow).values(
                day=day,
                user_id=uid,
                credential_id=cid,
                model=model,
                requests=n,
                prompt_tokens=p,
                completion_tokens=c,
            )
            session.execute(
                up.on_conflict_do_update(
                    index_elements=["day", "user_id", "credential_id", "model"],
                    set_={
                        "requests": UsageDailyRow.requests + up.excluded.requests,
                        "prompt_tokens": UsageDailyRow.prompt_tokens + up.excluded.prompt_tokens,
                        "completion_tokens": UsageDailyRow.completion_tokens
                        + up.excluded.completion_tokens,
                    },
                )
            )
        return len(inserted)

    async def get(self, caller: Caller, q: UsageQuery) -> list[UsageSum]:
        """Sums by day, user, credential and model; others' usage needs usage.read."""
        p = caller.principal
        user_id = q.user_id
        if not p.has("usage.read"):
            if user_id and user_id != p.user_id:
                raise await self.core.deny(caller, "usage.read", "GetUsage", "user", user_id[:64])
            user_id = p.user_id
        validation.text(q.credential_id, "credential_id", 36)
        validation.text(q.model, "model", 200)
        validation.text(q.end_user, "end_user", MAX_END_USER)
        validation.text(user_id, "user_id", 36)
        end = q.end_time or utcnow()
        start = q.start_time or end - timedelta(days=30)
        if start >= end:
            raise InvalidArgument("start_time", "must be before end_time")

        def query(session: Session) -> list[UsageSum]:
            cols = (UsageRow.day, UsageRow.user_id, UsageRow.credential_id, UsageRow.model)
            stmt = (
                select(
                    *cols,
                    func.count(),
                    func.sum(UsageRow.prompt_tokens),
                    func.sum(UsageRow.completion_tokens),
                    func.sum(UsageRow.cached_completion_tokens),
                )
                .where(UsageRow.start_time >= start, UsageRow.start_time < end)
                .group_by(*cols)
                .order_by(*cols)
            )
            if user_id:
                stmt = stmt.where(UsageRow.user_id == user_id)
            if q.credential_id:
                stmt = stmt.where(UsageRow.credential_id == q.credential_id)
            if q.model:
                stmt = stmt.where(UsageRow.model == q.model)
            if q.end_user:
                stmt = stmt.where(UsageRow.end_user == q.end_user)
            return [
                UsageSum(r[0], r[1], r[2], r[3], int(r[4]), *(int(v or 0) for v in r[5:8]))
                for r in session.execute(stmt)
            ]

        return await self.core.db.read(query)
