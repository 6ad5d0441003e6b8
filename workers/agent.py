"""The sub-agent: what one task does with one request.

1. A redelivered message is checked first: poison cap (a request whose deliveries keep
   killing workers is failed after ``max_deliveries``) and "already finished" (re-announce,
   do nothing else).
2. Model call with retries. Every attempt is written as an ``in_flight`` row *before* the
   call, and completed after it, so an attempt whose worker died is still visible.
3. The request's final rows go to the group-commit writer; the task returns (and Celery acks)
   only after they are durable.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from config.catalog import Catalog, ModelSpec, load_catalog
from config.keys import deliveries_key
from config.settings import Settings, get_settings
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import STATUS_FAILED, TERMINAL_STATUSES, Request
from tars_tasks.notify import LocalNotifier, Notifier, RedisNotifier
from tars_tasks.redis_client import get_redis
from workers.caller import CallOutcome, ModelCaller
from workers.providers import Provider
from workers.writer import GroupCommitWriter

log = logging.getLogger(__name__)

#: How long a poison counter outlives the last delivery.
DELIVERY_COUNTER_TTL_S = 7 * 24 * 3600


def _now() -> datetime:
    return datetime.now(UTC)


class SubAgent:
    def __init__(self, *, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = get_engine(settings.database_url)
        redis_url = settings.shared_redis_url
        self.redis = get_redis(redis_url) if redis_url else None
        self.notifier: Notifier = RedisNotifier(self.redis) if self.redis is not None else LocalNotifier()
        self.writer = GroupCommitWriter(
            engine=self.engine,
            notifier=self.notifier,
            batch_max=settings.writer_batch_max,
            linger_ms=settings.writer_linger_ms,
        )
        self.caller = ModelCaller(settings=settings, catalog=catalog, writer=self.writer, redis_client=self.redis)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # --- providers -----------------------------------------------------------------------------

    def provider_for(self, spec: ModelSpec) -> Provider:
        return self.caller.provider_for(spec)

    # --- the task ------------------------------------------------------------------------------

    def run(
        self,
        *,
        request_id: str,
        tier: str,
        prompt: str,
        reply_to: str | None = None,
        redelivered: bool = False,
        worker: str | None = None,
        **_ignored: Any,
    ) -> str:
        worker = worker or self.worker_name
        started = _now()
        if redelivered:
            status = self._check_redelivery(request_id=request_id, tier=tier, reply_to=reply_to, worker=worker)
            if status is not None:
                return status
        result = self.call_model(request_id=request_id, tier=tier, prompt=prompt, worker=worker)
        self.writer.finish(
            api_rows=result.api_rows,
            request=self._finish_row(request_id=request_id, status=result.status, result=result.text,
                                     error=result.error, tier_used=result.tier_used, model=result.model,
                                     worker=worker, started_at=started),
            reply_to=reply_to,
        )
        return result.status

    def call_model(self, *, request_id: str, tier: str, prompt: str, worker: str) -> CallOutcome:
        """Breaker → fleet rate limiter → provider, inside the retry loop (see :mod:`workers.caller`)."""
        return self.caller.call(request_id=request_id, tier=tier, prompt=prompt, worker=worker)

    @staticmethod
    def _finish_row(*, request_id: str, status: str, result: str | None, error: str | None, tier_used: str,
                    model: str, worker: str, started_at: datetime) -> dict[str, Any]:
        """Bind parameters of the writer's finishing UPDATE (``workers.writer._finish_stmt``)."""
        return {"b_id": request_id, "b_status": status, "b_result": result, "b_error": error,
                "b_tier_used": tier_used, "b_model": model, "b_worker": worker,
                "b_started_at": started_at, "b_finished_at": _now()}

    # --- redelivery ----------------------------------------------------------------------------

    def _check_redelivery(self, *, request_id: str, tier: str, reply_to: str | None, worker: str) -> str | None:
        """Return a status if the redelivered request needs no model call, else None."""
        with self.engine.connect() as conn:
            status = conn.execute(
                select(Request.__table__.c.status).where(Request.__table__.c.id == request_id)
            ).scalar()
        if status in TERMINAL_STATUSES:
            log.info("request %s redelivered but already %s; not running it again", request_id, status)
            if reply_to:
                self.notifier.publish({reply_to: [(request_id, status)]})
            return status
        if self.redis is not None:
            key = deliveries_key(self.settings.namespace, request_id)
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, DELIVERY_COUNTER_TTL_S)
            redeliveries = pipe.execute()[0]
            if redeliveries + 1 > self.settings.max_deliveries:
                log.error("request %s redelivered %d times; failing it as poison", request_id, redeliveries)
                error = (f"poison: redelivered {redeliveries} times without finishing "
                         f"(max_deliveries={self.settings.max_deliveries})")
                self.writer.finish(
                    api_rows=[],
                    request=self._finish_row(request_id=request_id, status=STATUS_FAILED, result=None,
                                             error=error, tier_used=tier, model=self.catalog.spec(tier).model,
                                             worker=worker, started_at=_now()),
                    reply_to=reply_to,
                )
                return STATUS_FAILED
        return None

    def close(self) -> None:
        self.writer.close()


_agent: SubAgent | None = None
_agent_pid: int | None = None
_agent_lock = threading.Lock()


def get_agent() -> SubAgent:
    """The sub-agent of this process (made on first use; made anew after a fork)."""
    global _agent, _agent_pid
    with _agent_lock:
        if _agent is None or _agent_pid != os.getpid():
            settings = get_settings()
            _agent = SubAgent(settings=settings, catalog=load_catalog(settings.catalog_path))
            _agent_pid = os.getpid()
        return _agent


def close_agent() -> None:
    global _agent
    with _agent_lock:
        if _agent is not None and _agent_pid == os.getpid():
            _agent.close()
        _agent = None
