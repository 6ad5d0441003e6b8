"""Delivery repairs: failure reasons, the tier a request was queued on, in-flight attempts by worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("failure_reason", sa.String(50)))
        batch.add_column(sa.Column("tier_queued", sa.String(20)))
    op.execute("UPDATE requests SET failure_reason = 'enqueue failed' "
               "WHERE status = 'failed' AND error LIKE 'enqueue failed%'")
    op.create_index("ix_api_calls_in_flight_worker", "api_calls", ["worker"],
                    postgresql_where=sa.text("outcome = 'in_flight'"),
                    sqlite_where=sa.text("outcome = 'in_flight'"))


def downgrade() -> None:
    op.drop_index("ix_api_calls_in_flight_worker", table_name="api_calls")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("tier_queued")
        batch.drop_column("failure_reason")
