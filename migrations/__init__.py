"""Alembic environment and versions. The schema is only ever changed here."""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).parent


def alembic_config(database_url: str):
    """An Alembic ``Config`` pointing at this package, for ``tars db upgrade`` and tests."""
    from alembic.config import Config

    from tars_tasks.db.engine import normalise_url

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


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from tars_tasks.db.engine import get_engine

    with get_engine(database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
