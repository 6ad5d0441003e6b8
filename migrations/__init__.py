"""Alembic environment and versions. The schema is only ever changed here.

Migrations import nothing of the application (only :mod:`config`): a migration must mean the
same thing forever, whatever the models say today, and ``tars db upgrade`` needs no app.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from config.urls import normalise_url

if TYPE_CHECKING:
    from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).parent


def alembic_config(database_url: str):
    """An Alembic ``Config`` pointing at this package, for ``tars db upgrade`` and tests."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def head() -> str | None:
    """The revision this code base's schema is at."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current(database: str | Engine) -> str | None:
    """The revision a database is at (None: no schema). Pass the application's own engine
    (``tars_tasks.db.engine.get_engine``) to have its connect and I/O bounds; a URL gets a
    one-off engine with a connect bound only."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool
    from sqlalchemy.engine import make_url

    if not isinstance(database, str):
        with database.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    url = normalise_url(database)
    connect_args = {"connect_timeout": 5} if make_url(url).get_backend_name() == "postgresql" else {}
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
