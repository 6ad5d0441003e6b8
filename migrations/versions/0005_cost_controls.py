"""Cost controls: how a request was answered (cache or model), the dollars a cache hit saved,
the fleet mode it was served under, its response-cache digest; ``mode_changes`` (every
transition of the fleet's degradation mode, with the signals that caused it).

Revision ID: 0005_cost_controls
Revises: 0004_jobs
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_cost_controls"
down_revision = "0004_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("answered_by", sa.String(20)))
    op.add_column("requests", sa.Column("saved_usd", sa.Numeric(18, 9), nullable=False, server_default="0"))
    op.add_column("requests", sa.Column("served_mode", sa.String(20)))
    op.add_column("requests", sa.Column("cache_digest", sa.String(64)))
    op.create_table(
        "mode_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_mode", sa.String(20), nullable=False),
        sa.Column("to_mode", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("signals", sa.JSON, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("namespace", sa.String(100), nullable=False),
        sa.UniqueConstraint("namespace", "seq", "at", name="uq_mode_changes_transition"),
    )
    op.create_index("ix_mode_changes_at", "mode_changes", ["at"])


def downgrade() -> None:
    op.drop_index("ix_mode_changes_at", table_name="mode_changes")
    op.drop_table("mode_changes")
    op.drop_column("requests", "cache_digest")
    op.drop_column("requests", "served_mode")
    op.drop_column("requests", "saved_usd")
    op.drop_column("requests", "answered_by")
