"""Semantic cache: the cosine similarity of a semantic hit to the prompt whose answer it took.

Revision ID: 0007_semantic_similarity
Revises: 0006_batch_lane
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_semantic_similarity"
down_revision = "0006_batch_lane"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("cache_similarity", sa.Float))


def downgrade() -> None:
    op.drop_column("requests", "cache_similarity")
