"""Secrets in logs: a failing SQL statement never shows its bound parameters."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from services.auth.db.engine import Database
from services.auth.db.models import ApiKeyRow, UserRow
from tests.integration.auth.conftest import migrate_db

DIGEST = "d1ge5t" + "7" * 58  # stands for a key digest: it must not appear anywhere


def insert_twice(session: Session) -> None:
    """Two keys with one digest: the unique index refuses the second (IntegrityError)."""
    now = datetime.now(UTC)
    session.add(UserRow(id="u1", username="owner", created_at=now, updated_at=now))
    session.flush()
    for kid in ("k1", "k2"):
        session.add(
            ApiKeyRow(
                id=kid,
                user_id="u1",
                name=kid,
                hint="h",
                digest=DIGEST,
                hash_version=1,
                created_at=now,
            )
        )
        session.flush()


def test_statement_error_hides_digests(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Attack: a StatementError (here a duplicate digest) carried the bound parameters
    into its message, and the error log printed a key digest next to the SQL."""
    migrate_db(database_url)
    db = Database(database_url)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    try:
        with pytest.raises(StatementError) as raised:
            db.write_sync(insert_twice)
        logging.getLogger("tokenyard.auth").error("write failed", exc_info=raised.value)
    finally:
        db.close()
    assert "digest" in str(raised.value)  # the statement failed where we forced it
    assert DIGEST not in str(raised.value)
    assert DIGEST not in caplog.text
    assert "parameters hidden" in str(raised.value) or "[parameters" not in str(raised.value)
