"""Usage records count the completion tokens the router's response cache replayed.

The `response_cache` limit itself needs no column: limits are stored as JSON on
roles and keys. A cache hit is recorded with 0 prompt and 0 completion tokens (no
worker ran) and its replayed tokens here, so quotas never count a hit's tokens.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-01 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch_op:
        batch_op.add_column(
            sa.Column(
                "cached_completion_tokens", sa.BigInteger(), nullable=False, server_default="0"
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch_op:
        batch_op.drop_column("cached_completion_tokens")
