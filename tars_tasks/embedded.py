"""The embedded fleet: the real Celery worker and task code, in-process, with no services.

Broker ``memory://`` (kombu's in-process transport), a thread pool worker consuming every
tier's queue, and SQLite migrated by Alembic, in the user's data directory
(``$XDG_DATA_HOME/tars/embedded.db``, by default ``~/.local/share/tars/embedded.db``). It is
the README's first command and a way to try TARS on a laptop; it is not a production topology
(one process, no redelivery).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.worker import WorkController
from celery.worker import state as worker_state

from config.keys import TIERS, queue_for_tier
from config.settings import Settings, get_settings
from tars_tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from tars_tasks.client import RequestHandle, RequestResult

EMBEDDED_CONCURRENCY = 200
STARTUP_TIMEOUT_S = 30.0


class _ReadyWorker(WorkController):
    def on_consumer_ready(self, consumer) -> None:
        super().on_consumer_ready(consumer)
        self.ready.set()


class EmbeddedFleet:
    """``with EmbeddedFleet(): ...`` runs a worker for every tier inside this process."""

    def __init__(self, *, settings: Settings | None = None, concurrency: int = EMBEDDED_CONCURRENCY) -> None:
        self.settings = settings or get_settings()
        if not self.settings.embedded:
            raise ValueError("EmbeddedFleet needs the memory:// broker (unset TARS_BROKER_URL)")
        self.concurrency = concurrency
        self._worker: _ReadyWorker | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedFleet:
        import migrations
        from tars_tasks.celery_app import app

        prepare_sqlite_directory(self.settings.database_url)
        migrations.upgrade(self.settings.database_url)
        app.finalize()
        app.set_current()
        worker = _ReadyWorker(
            app=app,
            concurrency=self.concurrency,
            pool="threads",
            hostname="embedded@localhost",
            queues=[queue_for_tier(t) for t in TIERS],
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        worker.ready = threading.Event()
        self._worker = worker
        self._thread = threading.Thread(target=worker.start, name="tars-embedded-worker", daemon=True)
        self._thread.start()
        if not worker.ready.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError("embedded worker did not start")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        worker_state.should_terminate = 0  # warm shutdown: running tasks finish
        self._thread.join(timeout)
        worker_state.should_terminate = None
        from workers.agent import close_agent

        close_agent()
        self._thread = None

    def __enter__(self) -> EmbeddedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- first contact: the schema, and work that something will run ---------------------------------

#: The one explanation for commands that would hand work to workers that cannot exist here.
NO_BROKER = ("the embedded default has no broker (TARS_BROKER_URL is unset), so no separate worker can ever see "
             "its queue: `tars submit` and `tars loadgen` run requests in-process there; for a real fleet set "
             "TARS_BROKER_URL and TARS_DATABASE_URL")


def prepare_sqlite_directory(database_url: str) -> None:
    """Create the directory of a SQLite file (the user's data directory on first use)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def database_path(settings: Settings) -> str:
    """What a person should be told the database is: the SQLite file's path, or the URL without password."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return str(Path(url.database).resolve())
    return url.render_as_string(hide_password=True)


def ensure_schema(settings: Settings) -> None:
    """Make the database usable by a command, or say exactly what to do.

    The embedded default's SQLite file is created and migrated on first use (it is the user's
    own, in their data directory). Any other database is never changed behind the operator's
    back: without the TARS schema, or at an older revision than this code, this raises
    :class:`ConfigurationError` saying to run ``tars db upgrade``.
    """
    from sqlalchemy.engine import make_url

    import migrations
    from tars_tasks.db.engine import get_engine

    if settings.embedded:
        url = make_url(settings.database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        migrations.upgrade(settings.database_url)
        return
    current, head = migrations.current(get_engine(settings.database_url, settings=settings)), migrations.head()
    if current is None:
        raise ConfigurationError(f"database {database_path(settings)} has no TARS schema: run `tars db upgrade`")
    if current != head:
        raise ConfigurationError(f"database {database_path(settings)} is at schema revision {current}, this code "
                                 f"needs {head}: run `tars db upgrade`")


def run_in_process(requests: Sequence[dict[str, Any]], *, timeout_s: float, settings: Settings | None = None,
                   concurrency: int = 50) -> tuple[list[RequestHandle], list[RequestResult]]:
    """Submit ``requests`` on the embedded default and run them to the end in this process.

    What ``tars submit`` does without a broker: start the embedded fleet, submit, wait for every
    request that was created (an idempotent duplicate is returned as it stands), stop.
    """
    from tars_tasks.client import TarsClient

    settings = settings or get_settings()
    with EmbeddedFleet(settings=settings, concurrency=concurrency), TarsClient() as client:
        handles = client.submit_many(requests)
        created = [h.id for h in handles if h.created]
        done = {r.id: r for r in client.wait_many(created, timeout=timeout_s)} if created else {}
        results = [done.get(h.id) or client.get(h.id) for h in handles]
    return handles, results
