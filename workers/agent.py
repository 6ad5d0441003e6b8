"""The sub-agent: what one task does with one message.

1. Read the request row (batched, :mod:`workers.loader`). The message carries routing fields
   only; the prompt is in the row. A plain-Celery message for a request with no row creates it,
   validated exactly as ``submit`` validates; anything that cannot be run is dead-lettered with
   the reason (never acked silently).
2. A request already terminal is not called again, whatever the delivery (re-announce, done).
3. A redelivered message counts towards the poison cap: a request redelivered often enough to be
   suspect runs alone in its process; one that kills its worker even then is failed as poison
   (:mod:`workers.quarantine`), so the bystanders of a crash are not.
4. Model call with retries (:mod:`workers.caller`) with the request the row holds (system
   prompt, turns, options: :class:`workers.providers.request.ModelRequest`). Every attempt is
   written ``in_flight`` *before* the call, with its input tokens and their cost, and completed
   after it.
5. The request's final rows go to the group-commit writer; the task returns (and Celery acks)
   only after they are durable.

Nothing raised inside a delivery escapes as an acked-but-unrecorded message: an unexpected
error finishes the request ``failed`` with reason ``internal_error`` (see :meth:`SubAgent.handle`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from config.catalog import Catalog, ModelSpec, load_catalog
from config.keys import deliveries_key, quarantine_key, stage_slots_key
from config.settings import Settings, get_settings
from tars_tasks.broker import leases, slots
from tars_tasks.codes import TERMINAL_STATUSES, FailureReason, RequestStatus
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import DeadLetter, Request
from tars_tasks.db.upsert import insert_for
from tars_tasks.errors import InvalidRequest
from tars_tasks.jobs import STEP_METADATA_KEY
from tars_tasks.messages import MalformedMessage, RunRequestMessage
from tars_tasks.notify import LocalNotifier, Notifier, RedisNotifier
from tars_tasks.redis_client import get_redis
from tars_tasks.schemas import LANE_BATCH
from workers.caller import CallOutcome, ModelCaller
from workers.callpath.budget_step import HINT_NO_BUDGET_LIMITS
from workers.callpath.slot_step import HINT_RESERVED_TOKENS, HINT_SLOT_AT, HINT_SLOT_GRACE_S, HINT_SLOT_RESERVED
from workers.loader import RequestLoader, RequestRow
from workers.providers import Provider
from workers.providers.request import ModelRequest
from workers.quarantine import CallGate
from workers.records import AttemptRecord, FinishRecord
from workers.writer import GroupCommitWriter, storable

log = logging.getLogger(__name__)

#: How long a poison counter outlives the last delivery.
DELIVERY_COUNTER_TTL_S = 7 * 24 * 3600
#: ``failure_reason`` values set here.
REASON_POISON = FailureReason.POISON
REASON_INTERNAL = FailureReason.INTERNAL_ERROR
#: What :meth:`SubAgent.handle` returns for a message it dead-lettered.
DEAD_LETTERED = "dead_lettered"
#: What :meth:`SubAgent.handle` returns for a batch-lane request (recorded; the batch runner sends it).
BATCH_LANE = "batch_lane"
#: A dispatched slot is used if the send is at most this share of the limiter's window late.
DISPATCHED_SLOT_TOLERANCE_SHARE = 0.01
#: A message fetched with no budget limit set anywhere skips its first budget reserve only if it
#: starts within this long of the fetch (a message that waited in the worker's prefetch reserves).
BUDGET_READ_MAX_AGE_S = 0.25
#: Verdicts on a redelivered request (see :mod:`workers.quarantine`).
SUSPICION_NONE, SUSPICION_SUSPECT, SUSPICION_POISON = "none", "suspect", "poison"


def _run_concurrently(fn: Callable[[int], None], n: int) -> None:
    """``fn(0)`` … ``fn(n - 1)`` at once, ``fn(0)`` in the caller; returns when all have returned.
    Under gevent's monkey patching, plain greenlets (a patched ``threading.Thread`` costs several
    times a greenlet's start: ~10% of a worker's CPU in a bundled drain's profile); else threads."""
    if n <= 1:
        if n:
            fn(0)
        return
    if _greenlets():
        import gevent

        others = [gevent.spawn(fn, i) for i in range(1, n)]
        fn(0)
        gevent.joinall(others)
        return
    threads = [threading.Thread(target=fn, args=(i,), daemon=True) for i in range(1, n)]
    for t in threads:
        t.start()
    fn(0)
    for t in threads:
        t.join()


#: At most this many requests run at once in this process (its pool's concurrency), bundle
#: members included: without it a worker of concurrency C holding C bundles of B would run C x B
#: calls at once (a breaker tripping would find them all in flight). Set by
#: :func:`limit_calls_at_once` when the worker is ready (pools that run tasks in-process).
_calls_at_once: threading.BoundedSemaphore | None = None


class _MembersDone:
    """Members of bundles still held by this process that have finished (their rows durable).

    A bundle's Celery message is held (reserved, unacked) until its last member finishes, and the
    dispatcher's free slots count every member of a held bundle. With model latencies spread as
    U(0.5, 2.5) s, a bundle of 16 lasts ~2.4 s while its members are busy 1.5 s on average: about
    a third of the slots it is counted for were free, and at C = 2,000 the dispatcher left work
    staged for want of slots that were idle. The free slots subtract this count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def bundle(self) -> _BundleTally:
        """The tally of one bundle's members, from its start to :meth:`_BundleTally.close`."""
        return _BundleTally(self)

    def __call__(self) -> int:
        return self._n


class _BundleTally:
    def __init__(self, owner: _MembersDone) -> None:
        self._owner = owner
        self._n = 0
        self._open = True

    def member_finished(self) -> None:
        with self._owner._lock:
            if self._open:  # a member outliving its bundle (the bundle raised) was counted there already
                self._n += 1
                self._owner._n += 1

    def close(self) -> None:
        """The bundle returns (or raised): its members leave the reserved requests, and the count."""
        with self._owner._lock:
            self._open = False
            self._owner._n -= self._n
            self._n = 0


#: Finished members of the bundles this process holds (:class:`_MembersDone`).
members_done = _MembersDone()


def limit_calls_at_once(n: int | None) -> None:
    """Run at most ``n`` requests at once in this process (None: no bound beyond the pool's)."""
    global _calls_at_once
    _calls_at_once = threading.BoundedSemaphore(n) if n else None


def _greenlets() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("threading"))


def _job_step(row: RequestRow) -> bool:
    """Whether ``row`` may be a job's step: every step request carries its job in its metadata."""
    return bool(row.metadata) and STEP_METADATA_KEY in row.metadata


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
            retry_max_s=settings.writer_retry_max_s,
            stall_unhealthy_s=settings.writer_stall_unhealthy_s,
            on_finished=self._jobs_hook(),
        )
        self.loader = RequestLoader(engine=self.engine, batch_max=settings.writer_batch_max,
                                    linger_ms=settings.writer_linger_ms, retry_max_s=settings.writer_retry_max_s)
        limiter_url = settings.ratelimit_redis_url
        self.caller = ModelCaller(settings=settings, catalog=catalog, writer=self.writer, redis_client=self.redis,
                                  limiter_redis=get_redis(limiter_url) if limiter_url and limiter_url != redis_url
                                  else None)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.gate = CallGate()
        #: The fleet mode, read every ``mode_interval_s``, applied to work queued before a transition.
        self.mode_reader = None
        if self.redis is not None and settings.mode_apply_queued:
            from tars_tasks.fleetmode import ModeBook, ModeReader

            self.mode_reader = ModeReader(book=ModeBook(redis_client=self.redis, namespace=settings.namespace,
                                                        settings=settings), interval_s=settings.mode_interval_s)
        #: A dispatcher's reservation is in the broker's Redis; it stands for the limiter's only when
        #: the limiter's state lives there too (it does whenever dispatch is on: settings.ratelimit_redis_url).
        self.trust_staged_slots = settings.ratelimit_redis_url == settings.broker_redis_url

    def _jobs_hook(self):
        """Jobs schedule their next steps inside the commit that finishes a step (tars_tasks.jobs)."""
        from tars_tasks.celery_app import app
        from tars_tasks.jobs.store import JobStore

        self.jobs = JobStore(settings=self.settings, catalog=self.catalog, engine=self.engine, celery_app=app,
                             notifier=self.notifier)
        return self.jobs.on_finished

    # --- providers -----------------------------------------------------------------------------

    def provider_for(self, spec: ModelSpec) -> Provider:
        return self.caller.provider_for(spec)

    # --- the task ------------------------------------------------------------------------------

    def handle(self, *, message: RunRequestMessage, redelivered: bool = False, worker: str | None = None,
               reserved_tokens: int | None = None, reserved_slot: dict[str, Any] | None = None,
               no_budget_limits: bool = False) -> str:
        """Run one delivery to a terminal, durable verdict. Never raises for the request's sake.

        ``reserved_tokens``: the message came through staging and its dispatcher reserved the first
        attempt's rate-limit slot for that many tokens (not for a redelivery: its slot was spent).
        ``reserved_slot``: that slot's hints, already read (a staged bundle's member); else read here.
        ``no_budget_limits``: its bundle was fetched with no budget limit set (else read here)."""
        with _calls_at_once or contextlib.nullcontext():
            return self._handle(message=message, redelivered=redelivered, worker=worker,
                                reserved_tokens=reserved_tokens, reserved_slot=reserved_slot,
                                no_budget_limits=no_budget_limits)

    def _handle(self, *, message: RunRequestMessage, redelivered: bool, worker: str | None,
                reserved_tokens: int | None, reserved_slot: dict[str, Any] | None, no_budget_limits: bool) -> str:
        worker = leases.current_owner() or worker or self.worker_name
        started = _now()
        hints = None
        read = slots.take(message.request_id) if reserved_slot is None else None  # read with its unacked record
        no_budget_limits = no_budget_limits or (read is not None
                                                and read.no_budget_limits(max_age_s=BUDGET_READ_MAX_AGE_S))
        if reserved_tokens is not None and not redelivered and self.trust_staged_slots:
            if reserved_slot is None:
                found = self._reserved_slots(record_id=message.request_id, tier=message.tier, read=read)
                reserved_slot = self._slot_hint(found[0] if found else None)
            hints = {HINT_SLOT_RESERVED: True, HINT_RESERVED_TOKENS: reserved_tokens, **reserved_slot}
        try:
            return self._run(message=message, redelivered=redelivered, worker=worker, started=started, hints=hints,
                             no_budget_limits=no_budget_limits)
        except MalformedMessage as exc:
            self.dead_letter(reason="malformed_message", detail=f"request {message.request_id}: {exc}")
            return DEAD_LETTERED
        except Exception as exc:
            log.exception("request %s: unexpected error; failing it", message.request_id)
            tier = message.tier or "haiku"
            self._finish(FinishRecord(request_id=message.request_id, status=RequestStatus.FAILED, tier_used=tier,
                                model=self.catalog.spec(tier).model, worker=worker, started_at=started,
                                error=f"{REASON_INTERNAL}: {type(exc).__name__}: {exc}"[:2000],
                                failure_reason=REASON_INTERNAL), api_rows=[], reply_to=message.reply_to)
            return RequestStatus.FAILED

    def handle_bundle(self, *, messages: list[RunRequestMessage], redelivered: bool = False,
                      worker: str | None = None, bundle_id: str | None = None,
                      reserved_tokens: Sequence[int] | None = None) -> list[str]:
        """Run a bundle's members (``tars_tasks.bundles``) concurrently, each exactly as
        :meth:`handle` runs a single message (its row read first: a member already terminal is only
        re-announced), and return once every member's rows are durable (then the bundle is acked).
        Never raises for a member's sake; returns the members' verdicts in order.

        ``reserved_tokens``: the bundle came through staging (one per member, in order) and its
        dispatcher reserved each member's first attempt a slot of its own, recorded under ``bundle_id``."""
        out: list[str] = [RequestStatus.FAILED] * len(messages)
        member_slots: list[dict[str, Any] | None] = [None] * len(messages)
        tokens: list[int | None] = [None] * len(messages)
        no_budget_limits = False
        if reserved_tokens is not None and len(reserved_tokens) == len(messages) and bundle_id is not None:
            read = slots.take(bundle_id)
            no_budget_limits = read is not None and read.no_budget_limits(max_age_s=BUDGET_READ_MAX_AGE_S)
            if not redelivered and self.trust_staged_slots:
                tier = messages[0].tier if messages else None
                found = self._reserved_slots(record_id=bundle_id, tier=tier, read=read)
                if len(found) == len(messages):  # a member whose slot is None acquires its own
                    tokens = [t if at is not None else None for t, at in zip(reserved_tokens, found, strict=True)]
                    member_slots = [self._slot_hint(at) for at in found]
                else:  # the record is unreadable: the first member's slot is now, as a single's; the
                    # others' times are unknown (sent at once they would crowd a window): they acquire
                    tokens = [reserved_tokens[0], *([None] * (len(messages) - 1))]
                    member_slots = [{} for _ in messages]

        tally = members_done.bundle()

        def run(i: int) -> None:
            try:
                out[i] = self.handle(message=messages[i], redelivered=redelivered, worker=worker,
                                     reserved_tokens=tokens[i], reserved_slot=member_slots[i],
                                     no_budget_limits=no_budget_limits)
            finally:  # its slot is free for the dispatcher while the bundle waits for the others
                tally.member_finished()

        try:
            _run_concurrently(run, len(messages))
        finally:  # the bundle leaves the reserved requests now: its members are counted there no more
            tally.close()
        return out

    def _reserved_slots(self, *, record_id: str, tier: str | None,
                        read: slots.SlotRead | None = None) -> list[float | None]:
        """When the slot(s) the dispatcher reserved for the message ``record_id`` (a request's, a
        bundle's: one per member, None for a member without one) were, as ``time.monotonic()``
        values here; empty if unknown."""
        if self.redis is None or tier is None:
            return []
        if read is not None and read.tier == tier:  # read with its unacked record (broker.slots)
            return read.slots_monotonic()
        key = stage_slots_key(self.settings.namespace, tier)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(key, record_id)
            pipe.hdel(key, record_id)
            pipe.time()
            recorded, _, redis_time = pipe.execute()
        except redis.RedisError as exc:
            log.warning("message %s: its reserved slot's time is unreadable (%s); trusting the slot", record_id, exc)
            return []
        return slots.answer(tier=tier, slot=recorded, redis_time=redis_time).slots_monotonic()

    def _slot_hint(self, slot_at: float | None) -> dict[str, Any]:
        """The limiter step's hints for a slot reserved at ``slot_at`` (``time.monotonic()``; empty if
        unknown): the step gives a slot it would miss by more than its tolerance up and takes a fresh
        one (a call sent late crowds a window)."""
        if slot_at is None:
            return {}
        # A dispatched slot may be used later than the limiter's own tolerance (the message still
        # has a BRPOP, its row's read and its in_flight commit to go): up to 1% of the window, which
        # puts at most 1% more calls in a window, inside the 2% ratelimit_utilisation 0.98 leaves.
        limiter = self.caller.limiter
        own = getattr(limiter, "late_tolerance_s", 0.05)
        grace = max(0.0, DISPATCHED_SLOT_TOLERANCE_SHARE * self.settings.ratelimit_window_s - own)
        return {HINT_SLOT_AT: slot_at, HINT_SLOT_GRACE_S: grace}

    def _run(self, *, message: RunRequestMessage, redelivered: bool, worker: str, started: datetime,
             hints: dict[str, Any] | None = None, no_budget_limits: bool = False) -> str:
        row = self.loader.get(message.request_id)
        if row is None:
            row = self._adopt(message)
            if row is None:
                return DEAD_LETTERED
        if row.lane == LANE_BATCH and row.status not in TERMINAL_STATUSES:
            log.info("request %s is on the batch lane; the batch runner sends it, not this worker", row.id)
            return BATCH_LANE
        if row.status in TERMINAL_STATUSES:
            log.info("request %s delivered again but already %s; not running it again", row.id, row.status)
            self._republish_successors(row.id)
            if message.reply_to:
                self.notifier.publish({message.reply_to: [(row.id, row.status)]})
            return row.status
        tier = message.tier or row.tier_requested
        verdict = self._suspicion(row.id) if redelivered else SUSPICION_NONE
        if verdict == SUSPICION_POISON:
            error = (f"{REASON_POISON}: its worker process died while it ran alone, after "
                     f"{self.settings.max_deliveries - 1} redeliveries (max_deliveries={self.settings.max_deliveries})")
            self._finish(FinishRecord(request_id=row.id, status=RequestStatus.FAILED, tier_used=tier,
                                model=self.catalog.spec(tier).model, worker=worker, started_at=started,
                                error=error, failure_reason=REASON_POISON, job_step=_job_step(row)),
                         api_rows=[], reply_to=message.reply_to)
            return RequestStatus.FAILED
        tier, served_mode = self._apply_fleet_mode(row, tier)
        if served_mode is not None:
            hints = None  # the dispatcher reserved the queued tier's slot, not the cheaper tier's
        request = row.model_request()
        # the dispatcher's slot (if any) and what the budget and cache steps need
        hints = {**(hints or {}), "tenant": row.tenant,
                 **({"cache_digest": row.cache_digest} if row.cache_digest else {}),
                 **({HINT_NO_BUDGET_LIMITS: True} if no_budget_limits else {})}
        if verdict == SUSPICION_SUSPECT:
            result = self._call_alone(request_id=row.id, tier=tier, request=request, worker=worker, hints=hints)
        else:
            with self.gate.shared():
                result = self.call_model(request_id=row.id, tier=tier, request=request, worker=worker, hints=hints)
        self._finish(FinishRecord(request_id=row.id, status=result.status, tier_used=result.tier_used,
                                  model=result.model, worker=worker, started_at=started, result=result.text,
                                  error=result.error, failure_reason=result.failure_reason,
                                  stop_reason=result.stop_reason, served_mode=served_mode,
                                  job_step=_job_step(row)),
                     api_rows=result.api_rows, reply_to=message.reply_to)
        return result.status

    def _apply_fleet_mode(self, row: RequestRow, tier: str) -> tuple[str, str | None]:
        """Work queued before the fleet went to high load or critical is served as it would be
        admitted now: below high priority, on sonnet/opus, not already moved (by admission, a
        budget's soft threshold) — it runs on the tier's cheaper fallback, and the row's
        ``served_mode`` becomes the mode that moved it. (tier, None) when nothing changes."""
        from tars_tasks.admission import DEGRADABLE_TIERS, PRIORITY_HIGH
        from tars_tasks.fleetmode import FleetMode

        if (self.mode_reader is None or row.priority >= PRIORITY_HIGH or tier not in DEGRADABLE_TIERS
                or tier != row.tier_requested):
            return tier, None
        fallback = self.catalog.spec(tier).fallback
        if not fallback:
            return tier, None
        mode = self.mode_reader.mode()
        if mode is FleetMode.OPTIMAL:
            return tier, None
        log.info("request %s: fleet mode %s; served on %s instead of %s", row.id, mode, fallback, tier)
        return fallback, str(mode)

    def _republish_successors(self, request_id: str) -> None:
        """A finished job step delivered again: its worker may have died after committing the step's
        successors and before publishing them (see JobStore.republish_unsent)."""
        try:
            self.jobs.republish_unsent(request_id=request_id)
        except Exception as exc:  # the reconciler remains the fallback
            log.warning("request %s: could not check its job's unsent steps (%s)", request_id, exc)

    def call_model(self, *, request_id: str, tier: str, request: ModelRequest, worker: str,
                   hints: dict[str, Any] | None = None) -> CallOutcome:
        """Breaker → fleet rate limiter → provider, inside the retry loop (see :mod:`workers.caller`)."""
        return self.caller.call(request_id=request_id, tier=tier, request=request, worker=worker, hints=hints)

    def _finish(self, finish: FinishRecord, *, api_rows: list[AttemptRecord], reply_to: str | None) -> None:
        self.writer.finish(api_rows=api_rows, request=finish, reply_to=reply_to)

    # --- messages from plain-Celery producers ---------------------------------------------------

    def _adopt(self, message: RunRequestMessage) -> RequestRow | None:
        """Record the request a plain-Celery message describes; None if it was dead-lettered."""
        from tars_tasks.routing import route
        from tars_tasks.schemas import request_columns, validate_spec

        if message.spec is None:
            self.dead_letter(reason="unknown_request",
                             detail=f"request {message.request_id} has no row and the message carries no "
                                    "request fields (role, prompt, ...) to create it from")
            return None
        try:
            spec = validate_spec(message.spec, catalog=self.catalog, max_prompt_chars=self.settings.max_prompt_chars)
            r = route(spec, catalog=self.catalog)
            if spec.lane == LANE_BATCH:
                from tars_tasks.coordinator import BATCH_PROVIDERS

                provider = self.settings.provider_override or self.catalog.spec(r.tier).provider
                if provider not in BATCH_PROVIDERS:
                    raise InvalidRequest(f"lane 'batch' needs a provider with a batch API; tier {r.tier} uses "
                                         f"{provider!r}", field="lane")
        except InvalidRequest as exc:
            self.dead_letter(reason="invalid_request", detail=f"request {message.request_id}: {exc}")
            return None
        now = _now()
        # it skipped admission: the mode it is served under is the fleet's now (as this worker reads it)
        mode = str(self.mode_reader.mode()) if self.mode_reader is not None else None
        with self.engine.begin() as conn:
            stmt = insert_for(conn, Request.__table__).values(
                id=message.request_id, **request_columns(spec, catalog=self.catalog), tier_requested=r.tier,
                tier_queued=r.tier, status=RequestStatus.QUEUED, submitted_at=now, attempts=0, input_tokens=0,
                output_tokens=0, cost_usd=0, lane=spec.lane, served_mode=mode,
                reply_to=message.reply_to if spec.lane == LANE_BATCH else None,
            ).on_conflict_do_nothing()
            conn.execute(stmt)
        row = self.loader.get(message.request_id)
        if row is None:
            self.dead_letter(reason="duplicate_idempotency_key",
                             detail=f"request {message.request_id}: tenant {spec.tenant!r} already has a request "
                                    f"with idempotency key {spec.idempotency_key!r}; not running it twice")
        else:
            log.info("request %s recorded from a plain-Celery message", row.id)
        return row

    def dead_letter(self, *, reason: str, detail: str, queue: str | None = None) -> None:
        log.error("dead letter (%s): %s", reason, detail[:500])
        try:
            with self.engine.begin() as conn:
                conn.execute(DeadLetter.__table__.insert().values(
                    reason=reason, detail=storable(detail)[:10_000], queue=queue, received_at=_now()))
        except Exception:
            log.exception("could not record dead letter (%s)", reason)

    # --- redelivery ----------------------------------------------------------------------------

    def _suspicion(self, request_id: str) -> str:
        """Count a redelivery and judge it (see :mod:`workers.quarantine`). Without Redis: none."""
        if self.redis is None:
            return SUSPICION_NONE
        ns = self.settings.namespace
        try:
            pipe = self.redis.pipeline()
            pipe.incr(deliveries_key(ns, request_id))
            pipe.expire(deliveries_key(ns, request_id), DELIVERY_COUNTER_TTL_S)
            pipe.exists(quarantine_key(ns, request_id))
            redeliveries, _, crashed_alone = pipe.execute()
        except redis.RedisError as exc:
            log.warning("request %s: poison counter unavailable (%s); running it", request_id, exc)
            return SUSPICION_NONE
        if crashed_alone:
            log.error("request %s killed its worker while running alone; failing it as poison", request_id)
            return SUSPICION_POISON
        if int(redeliveries) >= self.settings.max_deliveries - 1:
            log.warning("request %s redelivered %d times; running it alone to see whether it kills its worker",
                        request_id, redeliveries)
            return SUSPICION_SUSPECT
        return SUSPICION_NONE

    def _call_alone(self, *, request_id: str, tier: str, request: ModelRequest, worker: str,
                    hints: dict[str, Any] | None = None) -> CallOutcome:
        key = quarantine_key(self.settings.namespace, request_id)
        with self.gate.alone():
            try:
                self.redis.set(key, worker, ex=DELIVERY_COUNTER_TTL_S)
            except redis.RedisError as exc:
                log.warning("request %s: quarantine mark not set (%s)", request_id, exc)
            result = self.call_model(request_id=request_id, tier=tier, request=request, worker=worker, hints=hints)
            try:
                self.redis.delete(key)
            except redis.RedisError as exc:
                log.warning("request %s: quarantine mark not removed (%s)", request_id, exc)
        return result

    def health(self) -> dict[str, Any]:
        """The group-commit writer's health, with the row reader's folded in: a worker that cannot
        read its requests' rows is as stuck as one that cannot write their results."""
        h = self.writer.health()
        if self.loader.stalled_since is not None:
            stalled_for = max(0.0, time.time() - self.loader.stalled_since)
            h["stalled_for_s"] = round(max(stalled_for, h.get("stalled_for_s") or 0.0), 1)
            h["last_error"] = h.get("last_error") or self.loader.last_error
            h["healthy"] = h["healthy"] and stalled_for < self.settings.writer_stall_unhealthy_s
        h["pending"] = h.get("pending", 0) + self.loader.pending()
        return h

    def close(self) -> None:
        self.writer.close()
        self.loader.close()


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


def peek_agent() -> SubAgent | None:
    """This process's sub-agent if one was made (health reports must not build one)."""
    if _agent is not None and _agent_pid == os.getpid():
        return _agent
    return None


def close_agent() -> None:
    global _agent
    with _agent_lock:
        if _agent is not None and _agent_pid == os.getpid():
            _agent.close()
        _agent = None
