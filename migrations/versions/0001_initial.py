"""Initial schema: runs, requests, api_calls, dead_letters.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

USD = sa.Numeric(18, 9)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scenario", sa.String(100)),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("summary", sa.JSON),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("role", sa.String(50), nullable=False),
        sa.Column("tier_requested", sa.String(20), nullable=False),
        sa.Column("tier_used", sa.String(20)),
        sa.Column("model", sa.String(100)),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost_usd", USD, nullable=False, server_default="0"),
        sa.Column("worker", sa.String(200)),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.id", ondelete="SET NULL")),
        sa.Column("submitted_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_requests_tenant_idempotency_key"),
    )
    op.create_index("ix_requests_status", "requests", ["status"])
    op.create_index("ix_requests_run_id", "requests", ["run_id"])
    op.create_table(
        "api_calls",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "request_id", sa.String(36), sa.ForeignKey("requests.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("tier", sa.String(20), nullable=False),
        sa.Column("provider", sa.String(50), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(30), nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost_usd", USD, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Numeric(12, 3)),
        sa.Column("ratelimit_wait_ms", sa.Numeric(12, 3), nullable=False, server_default="0"),
        sa.Column("worker", sa.String(200)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_api_calls_request_id", "api_calls", ["request_id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("queue", sa.String(100)),
        sa.Column("received_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_index("ix_api_calls_request_id", table_name="api_calls")
    op.drop_table("api_calls")
    op.drop_index("ix_requests_run_id", table_name="requests")
    op.drop_index("ix_requests_status", table_name="requests")
    op.drop_table("requests")
    op.drop_table("runs")
