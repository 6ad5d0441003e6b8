"""Multi-agent jobs: ``jobs`` and ``job_steps`` (one row per step instance, each an ordinary request).

Revision ID: 0004_jobs
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_jobs"
# The file 0003_model_requests.py has revision id "0003".
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("template", sa.String(100), nullable=False),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("failure_reason", sa.String(50)),
        sa.Column("failed_step", sa.String(100)),
        sa.Column("reply_to", sa.String(200)),
        sa.Column("run_id", sa.String(36)),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_run_id", "jobs", ["run_id"])
    op.create_table(
        "job_steps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("item", sa.Integer, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("item_value", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "step", "item", "revision", name="uq_job_steps_instance"),
        sa.UniqueConstraint("request_id", name="uq_job_steps_request_id"),
    )


def downgrade() -> None:
    op.drop_table("job_steps")
    op.drop_index("ix_jobs_run_id", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
