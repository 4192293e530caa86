"""Schema migrations, run programmatically (no alembic.ini on disk needed)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from services.common.errors import FailedPrecondition

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    """The alembic configuration of the auth schema."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest migration shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def check_schema(engine: Engine) -> None:
    """Raise FailedPrecondition unless the database is at the shipped head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise FailedPrecondition(
            f"the auth database schema is out of date (at {current or 'nothing'}, "
            f"needs {head}): run 'tokenyard auth migrate' or start with --migrate"
        )
