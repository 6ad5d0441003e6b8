"""Alembic's environment. It imports nothing of the application (see :mod:`migrations`):
migrations are written by hand, and tests/unit/test_schema_matches_models.py checks that the
migrated schema is the one ``tars_tasks/db/models.py`` describes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from config.urls import normalise_url

config = context.config
target_metadata = None


def run_migrations_offline() -> None:
    context.configure(
        url=normalise_url(config.get_main_option("sqlalchemy.url")),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    from sqlalchemy import create_engine

    engine = create_engine(normalise_url(config.get_main_option("sqlalchemy.url")), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
