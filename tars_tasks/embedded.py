"""The embedded fleet: the real Celery worker and task code, in-process, with no services.

Broker ``memory://`` (kombu's in-process transport), a thread pool worker consuming every
tier's queue, and SQLite migrated by Alembic. It is the README's first command and a way to
try TARS on a laptop; it is not a production topology (one process, no redelivery).
"""

from __future__ import annotations

import threading

from celery.worker import WorkController
from celery.worker import state as worker_state

from config.keys import TIERS, queue_for_tier
from config.settings import Settings, get_settings

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
