"""Limits gain `max_priority`: the highest generation priority a role or key may ask for.

Limits are stored as JSON (roles.limits, api_keys.limits), so the new field needs
no column: a row without it caps priority at 0, the default, which is what every
existing role and key should get. This revision records the change in the
schema's history (and orders later revisions after it); it checks that the
limits columns it relies on are there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table in ("roles", "api_keys"):
        columns = {column["name"] for column in inspector.get_columns(table)}
        if "limits" not in columns:
            raise RuntimeError(f"{table}.limits is missing: max_priority has nowhere to live")


def downgrade() -> None:
    # A max_priority left in a row's JSON is ignored by older code (unknown keys
    # are dropped when limits are read), so there is nothing to undo.
    pass
