"""The migrated schema is the one the models describe.

``migrations/`` imports nothing of the application (its versions are written by hand and must
mean the same thing forever), so Alembic's autogenerate no longer sees the models; this test is
what keeps the two from drifting apart: a column, index or constraint added to one and not the
other fails here, on real Postgres.
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, create_engine, pool

import tars_tasks.jobs.tables  # noqa: F401  (the job tables join Base.metadata)
from config.urls import normalise_url
from tars_tasks.db.models import Base


def _diff(pg_url: str, metadata: MetaData) -> list:
    engine = create_engine(normalise_url(pg_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()


def test_the_migrated_postgres_schema_is_the_models_schema(pg_url):
    diff = _diff(pg_url, Base.metadata)
    assert diff == [], "\n".join(map(str, diff))


def test_a_column_the_migrations_lack_is_seen(pg_url):
    md = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(md)
    md.tables["requests"].append_column(Column("surplus", Integer))
    assert [d[0] for d in _diff(pg_url, md)] == ["add_column"]
