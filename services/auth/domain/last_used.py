"""`last_used_at` of API keys, batched in memory and flushed every few seconds,
so authenticating a key never writes to the database on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from services.auth.db.engine import Database
from services.auth.db.models import ApiKeyRow
from services.auth.domain.principal import utcnow

log = logging.getLogger("tokenyard.auth.last_used")


class LastUsedBatcher:
    """Collects key ids seen; one write per key per flush interval."""

    def __init__(self, db: Database, flush_seconds: float) -> None:
        self.db = db
        self.flush_seconds = flush_seconds
        self._seen: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def touch(self, key_id: str) -> None:
        """Note a use of `key_id` now (no I/O)."""
        self._seen[key_id] = utcnow()

    async def flush(self) -> None:
        """Write the collected times."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        await self.db.write(self._write, seen)

    @staticmethod
    def _write(session: Session, seen: dict[str, datetime]) -> None:
        for key_id, when in seen.items():
            session.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when)
            )

    def start(self) -> None:
        """Start the periodic flush."""
        self._task = asyncio.create_task(self._run(), name="last-used-flush")

    async def stop(self) -> None:
        """Stop and write what is pending."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.flush_seconds)
                return
            try:
                await self.flush()
            except Exception:
                log.warning("last-used flush failed", exc_info=True)
