"""The providers' batch lane: a request's lane (``interactive`` or ``batch``) and, for a batch-lane
request, the completion channel its producer listens on; ``provider_batches`` (one row per batch
sent to a provider's batch API, recorded before it is submitted) and ``batch_items`` (which
request is in which batch: one batch per request at most, so nothing is sent or billed twice).

Revision ID: 0006_batch_lane
Revises: 0005_cost_controls
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_batch_lane"
down_revision = "0005_cost_controls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("lane", sa.String(20), nullable=False, server_default="interactive"))
    op.add_column("requests", sa.Column("reply_to", sa.String(200)))
    op.create_index("ix_requests_batch_lane_queued", "requests", ["tier_queued", "submitted_at"],
                    postgresql_where=sa.text("lane = 'batch' AND status = 'queued'"))
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tier", sa.String(20), nullable=False),
        sa.Column("provider", sa.String(50), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("provider_batch_id", sa.String(200), unique=True),
        sa.Column("input_file_id", sa.String(200)),
        sa.Column("request_count", sa.Integer, nullable=False),
        sa.Column("submit_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("provider_status", sa.String(50)),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submit_started_at", sa.DateTime(timezone=True)),
        sa.Column("submitted_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("done_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_provider_batches_state", "provider_batches", ["state"])
    op.create_table(
        "batch_items",
        sa.Column("request_id", sa.String(36), sa.ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("batch_id", sa.String(36), sa.ForeignKey("provider_batches.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("outcome", sa.String(20)),
        sa.Column("retried", sa.Boolean, nullable=False, server_default="false"),
    )
    op.create_index("ix_batch_items_batch_id", "batch_items", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_batch_items_batch_id", table_name="batch_items")
    op.drop_table("batch_items")
    op.drop_index("ix_provider_batches_state", table_name="provider_batches")
    op.drop_table("provider_batches")
    op.drop_index("ix_requests_batch_lane_queued", table_name="requests")
    op.drop_column("requests", "reply_to")
    op.drop_column("requests", "lane")
