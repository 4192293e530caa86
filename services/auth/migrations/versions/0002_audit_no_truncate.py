"""The audit log refuses TRUNCATE too (PostgreSQL; SQLite has no TRUNCATE).

Row triggers (0001) refuse UPDATE and DELETE, but TRUNCATE fires no row trigger:
a statement-level BEFORE TRUNCATE trigger closes that gap for the owner role. The
service role never holds UPDATE, DELETE or TRUNCATE on the table (db/service_role.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 14:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_no_truncate ON audit_events")
