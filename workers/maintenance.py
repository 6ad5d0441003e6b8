"""Repairs the fleet runs on a timer inside every worker process.

:class:`UnackedRestorer` repairs lost messages of dead workers. With ``acks_late`` on Redis a
message a worker holds sits in kombu's ``unacked`` hash until it is acked; if the worker is
SIGKILLed, kombu puts it back once it is older than the visibility timeout — but only from
the idle path of its poller, and Celery's gevent/eventlet event loop ("synloop") never takes
that path: the BRPOP's own timeout reply counts as an event, so "no events" never happens.
Measured here: messages held by a SIGKILLed gevent worker stayed in ``unacked`` indefinitely
while another worker sat idle. This loop calls the same restore on a timer; kombu's Redis
mutex keeps concurrent restores by several workers from duplicating anything.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class UnackedRestorer:
    def __init__(self, *, celery_app, interval_s: float) -> None:
        self.app = celery_app
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0

    def start(self) -> UnackedRestorer:
        if not str(self.app.conf.broker_url).startswith(("redis://", "rediss://", "unix://")):
            return self
        self._thread = threading.Thread(target=self._run, name="tars-unacked-restorer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.interval_s):
            try:
                if conn is None:
                    conn = self.app.connection_for_write()
                    conn.ensure_connection(max_retries=1)
                conn.default_channel.qos.restore_visible(num=None, interval=1)
                self.sweeps += 1
            except Exception as exc:
                log.warning("unacked-message sweep failed (%s); retrying in %.0fs", exc, self.interval_s)
                if conn is not None:
                    try:
                        conn.release()
                    except Exception:
                        pass
                conn = None
                time.sleep(0)
        if conn is not None:
            conn.release()

    def stop(self) -> None:
        self._stop.set()
