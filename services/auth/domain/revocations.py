"""Revocations: recorded in the database, pushed to local watchers at once, and
polled so revocations made by other auth replicas sharing the database reach
this replica's watchers (and cache) within a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from services.auth.db.engine import Database
from services.auth.db.models import RevocationRow
from services.auth.domain.principal import utcnow

log = logging.getLogger("tokenyard.auth.revocations")
ALL_USERS = "*"  # a user_ids entry meaning "every user" (a role changed)
KEEP = timedelta(days=1)  # rows older than this are pruned: every replica has read them
PRUNE_EVERY = 600  # polls
WINDOW = timedelta(seconds=30)  # how late a revocation may commit and still be pushed
Row = tuple[int, str | None, str | None, datetime]


@dataclass
class Revoked:
    """A batch of credentials and users whose cached principals are stale."""

    credential_ids: set[str] = field(default_factory=set)
    user_ids: set[str] = field(default_factory=set)
    reset: bool = False

    def __bool__(self) -> bool:
        return bool(self.credential_ids or self.user_ids or self.reset)


class Revocations:
    """Revocations of one transaction: rows for other replicas, a batch for this one."""

    def __init__(self) -> None:
        self.revoked = Revoked()

    def add(
        self, session: Session, credential_ids: Iterable[str] = (), user_ids: Iterable[str] = ()
    ) -> None:
        """Record revocations in the transaction; pushed locally once it commits."""
        now = utcnow()
        for cid in credential_ids:
            session.add(RevocationRow(credential_id=cid, created_at=now))
            self.revoked.credential_ids.add(cid)
        for uid in user_ids:
            session.add(RevocationRow(user_id=uid, created_at=now))
            self.revoked.user_ids.add(uid)


class RevocationHub:
    """Fans revocations out to WatchRevocations streams; polls for other replicas'."""

    def __init__(
        self, db: Database, on_revoked: Callable[[Revoked], None], poll_seconds: float
    ) -> None:
        self.db = db
        self.on_revoked = on_revoked
        self.poll_seconds = poll_seconds
        self._watchers: set[asyncio.Queue[Revoked]] = set()
        self._last_id = 0
        self._seen: dict[int, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Remember where the table ends and start polling."""
        self._last_id = await self.db.read(
            lambda s: int(s.scalar(select(func.coalesce(func.max(RevocationRow.id), 0))) or 0)
        )
        self._task = asyncio.create_task(self._poll_forever(), name="revocation-poll")

    async def stop(self) -> None:
        """Stop polling and end every watcher's stream."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        for queue in list(self._watchers):
            queue.put_nowait(Revoked(reset=True, user_ids={"__stop__"}))

    def publish(self, revoked: Revoked) -> None:
        """Push a batch to the cache and to every watcher (same event loop)."""
        if not revoked:
            return
        self.on_revoked(revoked)
        for queue in self._watchers:
            queue.put_nowait(revoked)

    async def poll_once(self) -> None:
        """Read revocations not seen yet and publish them.

        Ids come from a sequence but commit out of order across replicas, so rows
        from the last WINDOW are re-read too and filtered by id: a late commit with
        a lower id is still found.
        """
        since = utcnow() - WINDOW
        rows = await self.db.read(self._read_new, self._last_id, since)
        batch = Revoked()
        for row_id, cid, uid, created in rows:
            self._last_id = max(self._last_id, row_id)
            if row_id in self._seen:
                continue
            self._seen[row_id] = created
            if cid:
                batch.credential_ids.add(cid)
            if uid:
                batch.user_ids.add(uid)
        self._seen = {i: t for i, t in self._seen.items() if t >= since - WINDOW}
        self.publish(batch)

    @staticmethod
    def _read_new(session: Session, after: int, since: datetime) -> list[Row]:
        stmt = (
            select(
                RevocationRow.id,
                RevocationRow.credential_id,
                RevocationRow.user_id,
                RevocationRow.created_at,
            )
            .where(or_(RevocationRow.id > after, RevocationRow.created_at >= since))
            .order_by(RevocationRow.id)
            .limit(10_000)
        )
        return [(r[0], r[1], r[2], r[3]) for r in session.execute(stmt)]

    @staticmethod
    def _prune(session: Session) -> None:
        session.execute(delete(RevocationRow).where(RevocationRow.created_at < utcnow() - KEEP))

    async def _poll_forever(self) -> None:
        polls = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.poll_seconds)
                return
            polls += 1
            try:
                await self.poll_once()
                if polls % PRUNE_EVERY == 0:
                    await self.db.write(self._prune)
            except Exception:  # a database blip must not end the poller
                log.warning("revocation poll failed", exc_info=True)

    async def watch(self) -> AsyncIterator[Revoked]:
        """A stream of batches, starting with reset=True."""
        queue: asyncio.Queue[Revoked] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield Revoked(reset=True)
            while True:
                batch = await queue.get()
                if "__stop__" in batch.user_ids:
                    return
                yield batch
        finally:
            self._watchers.discard(queue)
