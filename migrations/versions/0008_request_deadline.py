"""Request deadline: how long the producer accepted to wait for the answer, in seconds.

Revision ID: 0008_request_deadline
Revises: 0007_semantic_similarity
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_request_deadline"
down_revision = "0007_semantic_similarity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("deadline_s", sa.Integer))


def downgrade() -> None:
    op.drop_column("requests", "deadline_s")
