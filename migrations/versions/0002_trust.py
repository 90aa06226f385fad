"""trust: quarantined tickets, fallback and flagged answers

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantined_tickets",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("machine", sa.Text(), nullable=False),
        sa.Column("condition", sa.Text(), nullable=False),
        sa.Column("work_performed", sa.Text(), nullable=False),
        sa.Column("hours", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=50), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Plain ALTER TABLE, not batch mode: batch mode copies the table on SQLite, which the foreign keys
    # pointing at messages refuse. SQLite has ADD and DROP COLUMN natively since 3.35.
    op.add_column("messages", sa.Column("fallback", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("messages", sa.Column("flagged", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("messages", "flagged")
    op.drop_column("messages", "fallback")
    op.drop_table("quarantined_tickets")
