"""desk: who asked and why, claim, desk message, resolution fields, follow-up pings, severity

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Plain ALTER TABLE, not batch mode: batch mode copies the table on SQLite, which the foreign keys
# pointing at escalations' neighbours refuse. No new foreign keys: SQLite cannot add one to a table.
COLUMNS = [
    sa.Column("requested_by_id", sa.Integer(), nullable=True),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("severity", sa.String(length=20), nullable=True),
    sa.Column("severity_reason", sa.Text(), nullable=True),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("desk_message_ref", sa.String(length=128), nullable=True),
    sa.Column("resolution_hours", sa.Float(), nullable=True),
    sa.Column("resolution_machine", sa.Text(), nullable=True),
    sa.Column("reopened_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_ping_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("escalations", column)
    op.create_index("ix_escalations_status", "escalations", ["status"])
    op.create_index("ix_escalations_conversation", "escalations", ["conversation_id"])


def downgrade() -> None:
    op.drop_index("ix_escalations_conversation", table_name="escalations")
    op.drop_index("ix_escalations_status", table_name="escalations")
    for column in reversed(COLUMNS):
        op.drop_column("escalations", column.name)
