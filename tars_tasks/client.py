"""The producer API: submit requests, fetch and wait for their results.

    from tars_tasks import TarsClient
    with TarsClient() as tars:
        handle = tars.submit(role="researcher", prompt="...", priority="high", tenant="acme")
        result = handle.wait(timeout=30)

A request is recorded before it is queued, so ``handle.id`` is always a row in ``requests``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import select

from config.catalog import Catalog, load_catalog
from config.settings import Settings, get_settings
from tars_tasks.codes import TERMINAL_STATUSES, RequestStatus
from tars_tasks.coordinator import Coordinator, Submission
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import Request
from tars_tasks.errors import BrokerUnavailable, RequestNotFound, ResultTimeout
from tars_tasks.notify import CompletionListener, LocalListener, RedisListener
from tars_tasks.redis_client import get_redis
from tars_tasks.schemas import REQUIRED, RequestSpec

if TYPE_CHECKING:
    from tars_tasks.jobs.handle import JobHandle
    from tars_tasks.jobs.store import JobStore, JobView


@dataclass(frozen=True, slots=True)
class RequestResult:
    id: str
    status: str
    tenant: str
    role: str
    tier_requested: str
    tier_used: str | None
    model: str | None
    priority: int
    result: str | None
    error: str | None
    attempts: int
    #: Tokens of all the request's attempts by billing class (``input_tokens``: input not cached).
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    #: Why the model stopped: ``end_turn``, ``max_tokens``, ``stop_sequence``, ``refusal``, ...
    stop_reason: str | None = None
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    #: The producer's own labels, as submitted.
    metadata: dict[str, str] | None = None
    #: Why a failed request failed, as a code (``tars_tasks.codes.FailureReason``: ``budget``, ``poison``, ...).
    failure_reason: str | None = None
    #: How it was answered: ``exact`` or ``semantic`` (the response cache, at submit) or ``model``;
    #: None until it succeeded.
    answered_by: str | None = None
    #: A semantic hit's cosine similarity to the prompt whose answer it took (None otherwise).
    cache_similarity: float | None = None
    #: What a cache hit saved (the cost of the call that filled the entry); $0 for a model answer.
    saved_usd: Decimal = Decimal(0)
    #: The fleet's degradation mode when the request was admitted.
    served_mode: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def usage(self) -> dict[str, int]:
        """Tokens by billing class, summed over every attempt (what the cost is made of)."""
        return {"input_tokens": self.input_tokens, "cache_write_tokens": self.cache_write_tokens,
                "cache_write_1h_tokens": self.cache_write_1h_tokens, "cache_read_tokens": self.cache_read_tokens,
                "output_tokens": self.output_tokens}

    @property
    def ok(self) -> bool:
        return self.status == RequestStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class RequestHandle:
    id: str
    tier: str
    priority: int
    #: False when an earlier request with the same idempotency key was returned instead.
    created: bool
    client: TarsClient

    def get(self) -> RequestResult:
        return self.client.get(self.id)

    def wait(self, *, timeout: float | None = None) -> RequestResult:
        return self.client.wait(self.id, timeout=timeout)


class TarsClient:
    """A producer. Thread-safe; create one per process and reuse it."""

    def __init__(self, *, settings: Settings | None = None, catalog: Catalog | None = None) -> None:
        from tars_tasks.celery_app import make_app

        self.settings = settings or get_settings()
        self.catalog = catalog or load_catalog(self.settings.catalog_path)
        self.celery_app = make_app(self.settings, producer=True)
        self.engine = get_engine(self.settings.database_url, settings=self.settings)
        self.coordinator = Coordinator(
            settings=self.settings, catalog=self.catalog, celery_app=self.celery_app, engine=self.engine
        )
        self.producer_id = uuid.uuid4().hex
        self._listener: CompletionListener | None = None
        self._jobs: JobStore | None = None

    # --- submit --------------------------------------------------------------------------------

    def submit(
        self,
        *,
        role: str = REQUIRED,
        prompt: str = REQUIRED,
        priority: int | str = "normal",
        tenant: str = "default",
        idempotency_key: str | None = None,
        tier: str | None = None,
        run_id: str | None = None,
        system: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        response_format: str | None = None,
        metadata: Mapping[str, str] | None = None,
        cache: bool | None = None,
        lane: str | None = None,
        deadline: str | int | float | timedelta | None = None,
        **unknown: Any,
    ) -> RequestHandle:
        """Validate, record and queue one request (the fields are :class:`RequestSpec`'s).

        ``submit(**fields)`` behaves exactly as ``submit_many([fields])``: a missing ``role`` or
        ``prompt`` (without ``messages``) and an unknown keyword are :class:`InvalidRequest` naming
        the field, like a bad value.
        """
        given = (("role", role), ("prompt", prompt), ("priority", priority), ("tenant", tenant),
                 ("idempotency_key", idempotency_key), ("tier", tier))
        model = (("system", system), ("messages", messages), ("max_tokens", max_tokens),
                 ("temperature", temperature), ("stop", stop), ("response_format", response_format),
                 ("metadata", metadata), ("cache", cache), ("lane", lane),
                 ("deadline", deadline))
        spec: dict[str, Any] = {name: value for name, value in given if value is not REQUIRED}
        spec.update((name, value) for name, value in model if value is not None)
        return self.submit_many([{**spec, **unknown}], run_id=run_id)[0]

    def submit_many(
        self, requests: Iterable[RequestSpec | Mapping[str, Any]], *, run_id: str | None = None
    ) -> list[RequestHandle]:
        """Validate all, then record and queue all. One bad request rejects the whole call.

        ``requests`` is a non-empty iterable (list, tuple, generator) of request mappings, at most
        ``TARS_MAX_REQUESTS_PER_CALL``; ``run_id`` is ``None`` or the id of a row of ``runs``.
        Bad input is :class:`InvalidRequest` before the broker is touched at all.
        """
        planned = self.coordinator.plan(requests, run_id=run_id)
        try:
            listener = self.listener  # subscribe before anything can finish
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"broker unavailable (completion channel): {exc}; nothing was recorded") from exc
        subs: list[Submission] = self.coordinator.submit_planned(planned, run_id=run_id, reply_to=listener.channel)
        return [RequestHandle(id=s.id, tier=s.tier, priority=s.priority, created=s.created, client=self)
                for s in subs]

    # --- jobs (tars_tasks.jobs, docs/JOBS.md) ------------------------------------------------

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            from tars_tasks.jobs.store import JobStore

            self._jobs = JobStore(settings=self.settings, catalog=self.catalog, engine=self.engine,
                                  celery_app=self.celery_app, coordinator=self.coordinator)
        return self._jobs

    def submit_job(self, *, template: str | Mapping[str, Any], input: Mapping[str, Any],
                   priority: int | str = "normal", tenant: str = "default", idempotency_key: str | None = None,
                   run_id: str | None = None) -> JobHandle:
        """Validate a job (its template against the catalog, its input against the template), record it
        with its first steps and queue them; returns a :class:`~tars_tasks.jobs.handle.JobHandle`.
        Priority and tenant apply to every step. Bad input is :class:`InvalidRequest` before any write."""
        from tars_tasks.jobs.handle import JobHandle

        try:
            channel = self.listener.channel
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"broker unavailable (completion channel): {exc}; nothing was recorded") from exc
        sub = self.jobs.submit(template=template, input=input, priority=priority, tenant=tenant,
                               idempotency_key=idempotency_key, reply_to=channel, run_id=run_id)
        return JobHandle(id=sub.id, created=sub.created, client=self)

    def get_job(self, job_id: str) -> JobView:
        """The job's status, steps, critical path and rolled-up tokens and cost (:class:`JobView`)."""
        return self.jobs.get(job_id)

    def wait_job(self, job_id: str, *, timeout: float | None = None, poll_interval_s: float = 2.0) -> JobView:
        from tars_tasks.jobs.handle import wait_job

        return wait_job(self, job_id, timeout=timeout, poll_interval_s=poll_interval_s)

    def cancel_job(self, job_id: str) -> JobView:
        """Stop the job: its queued steps are not run; what running steps spend is still recorded."""
        return self.jobs.cancel(job_id)

    # --- results -------------------------------------------------------------------------------

    @property
    def listener(self) -> CompletionListener:
        if self._listener is None:
            redis_url = self.settings.shared_redis_url
            if redis_url:
                self._listener = RedisListener(
                    self.producer_id, namespace=self.settings.namespace,
                    redis_client=get_redis(redis_url, settings=self.settings,
                                           timeout_s=self.settings.client_timeout_s),
                )
            else:
                self._listener = LocalListener(self.producer_id, namespace=self.settings.namespace)
        return self._listener

    def get(self, request_id: str) -> RequestResult:
        results = self.get_many([request_id])
        if not results:
            raise RequestNotFound(f"no request with id {request_id!r}")
        return results[0]

    def get_many(self, request_ids: Iterable[str]) -> list[RequestResult]:
        ids = list(request_ids)
        if not ids:
            return []
        t = Request.__table__.c
        cols = [t[f] for f in RequestResult.__dataclass_fields__]
        out: dict[str, RequestResult] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 1000):
                for row in conn.execute(select(*cols).where(t.id.in_(ids[i : i + 1000]))):
                    out[row.id] = RequestResult(**row._asdict())
        return [out[i] for i in ids if i in out]

    def wait(self, request_id: str, *, timeout: float | None = None, poll_interval_s: float = 2.0) -> RequestResult:
        """Block until the request is terminal. Notices wake us; the row is the truth."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = self.listener.event_for(request_id)
        while True:
            result = self.get(request_id)
            if result.done:
                self.listener.forget(request_id)
                return result
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.listener.forget(request_id)
                raise ResultTimeout(f"request {request_id} is still {result.status} after {timeout}s")
            event.wait(poll_interval_s if remaining is None else min(poll_interval_s, remaining))

    def wait_many(
        self, request_ids: Iterable[str], *, timeout: float | None = None, poll_interval_s: float = 2.0
    ) -> list[RequestResult]:
        """Block until every request is terminal; results in the order of ``request_ids``.

        Rows are read in batches (one query per round, not one per request); notices wake the
        wait early, and the rows are re-read at least every ``poll_interval_s``.
        """
        ids = list(request_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        events = {rid: self.listener.event_for(rid) for rid in ids}
        done: dict[str, RequestResult] = {}
        pending = list(dict.fromkeys(ids))
        first = True
        try:
            while True:
                rows = self.get_many(pending)
                if first and len(rows) < len(pending):
                    missing = sorted(set(pending) - {r.id for r in rows})
                    raise RequestNotFound(f"no request with id {missing[0]!r}" +
                                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
                first = False
                done.update((r.id, r) for r in rows if r.done)
                pending = [rid for rid in pending if rid not in done]
                if not pending:
                    return [done[rid] for rid in ids]
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise ResultTimeout(f"{len(pending)} of {len(set(ids))} request(s) not finished after {timeout}s "
                                        f"(first: {pending[0]})")
                round_end = now + poll_interval_s if deadline is None else min(now + poll_interval_s, deadline)
                for rid in pending:
                    remaining = round_end - time.monotonic()
                    if remaining <= 0:
                        break
                    events[rid].wait(remaining)
        finally:
            for rid in ids:
                self.listener.forget(rid)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> TarsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
