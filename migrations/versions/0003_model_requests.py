"""Real model requests and exact costs: the request beyond its prompt, stop reason, tokens by class.

requests: system, messages, max_tokens, temperature, stop, response_format, metadata (what a
request asks of the model), stop_reason (why the model stopped), and the totals of its attempts'
cache writes (5-minute, 1-hour) and cache reads; prompt becomes optional (a request may be given
as ``messages`` only). api_calls: each attempt's cache writes and reads (``input_tokens`` stays
the input billed at the input price).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_CLASSES = ("cache_write_tokens", "cache_write_1h_tokens", "cache_read_tokens")


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("prompt", existing_type=sa.Text, nullable=True)
        batch.add_column(sa.Column("system", sa.Text))
        batch.add_column(sa.Column("messages", sa.JSON))
        batch.add_column(sa.Column("max_tokens", sa.Integer))
        batch.add_column(sa.Column("temperature", sa.Float))
        batch.add_column(sa.Column("stop", sa.JSON))
        batch.add_column(sa.Column("response_format", sa.String(20)))
        batch.add_column(sa.Column("metadata", sa.JSON))
        batch.add_column(sa.Column("stop_reason", sa.String(50)))
        for name in _CLASSES:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("api_calls") as batch:
        for name in _CLASSES:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("api_calls") as batch:
        for name in reversed(_CLASSES):
            batch.drop_column(name)
    # A request given only as messages has no prompt; it keeps its last user turn's place empty.
    op.execute("UPDATE requests SET prompt = '' WHERE prompt IS NULL")
    with op.batch_alter_table("requests") as batch:
        for name in reversed(_CLASSES):
            batch.drop_column(name)
        for name in ("stop_reason", "metadata", "response_format", "stop", "temperature", "max_tokens",
                     "messages", "system"):
            batch.drop_column(name)
        batch.alter_column("prompt", existing_type=sa.Text, nullable=False)
