"""The coordinator (the seed's "main agent"): validate, route, record, enqueue.

Order of operations for every request:
1. validate and route — bad input raises :class:`InvalidRequest`, nothing is written;
   admission control may refuse (:class:`Overloaded`) or move the request to a cheaper
   tier under load (see :mod:`tars_tasks.admission`);
2. reserve room on the tier's queue, atomically in the broker's Redis, so that the bound
   ``max_queue_depth`` holds fleet-wide however many producers submit
   (:mod:`tars_tasks.broker.bound`; refused: :class:`Overloaded`, nothing written);
3. record the request row (status ``queued``) in the database;
4. stage it (``dispatch_enabled``, the default: it waits in staging, where priority and
   per-tenant fairness and limits apply, until a worker's dispatcher moves it into its tier's
   queue; docs/DISPATCH.md) or publish it to its tier's queue with its priority; then release
   the reservation.
If staging or publishing fails, the recorded rows are marked ``failed`` (``failure_reason`` "enqueue
failed") and :class:`BrokerUnavailable` is raised: a producer is never left believing a dropped
request is queued. Any broker error before the rows are written — Redis down, or not answering
within ``client_timeout_s`` — is :class:`BrokerUnavailable` too, with nothing written.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, select, tuple_, update
from sqlalchemy.exc import IntegrityError, OperationalError

from config.catalog import Catalog
from config.keys import queue_for_tier
from config.settings import Settings
from config.tenants import TenantConfig, load_tenants
from tars_tasks.admission import Admission
from tars_tasks.broker.bound import AdmissionBound, Reservation
from tars_tasks.budgets import Budgets
from tars_tasks.bundles import group
from tars_tasks.cache import ResponseCache
from tars_tasks.cache_lookup import CacheLookup, CacheVerdict, SemanticOptions
from tars_tasks.codes import FailureReason, RequestStatus
from tars_tasks.db.bulk import insert_rows
from tars_tasks.db.models import Request, Run
from tars_tasks.errors import (
    BrokerUnavailable,
    BudgetExceeded,
    DatabaseUnavailable,
    InvalidRequest,
    Overloaded,
    excerpt,
)
from tars_tasks.publish import ToStage, publish_bundle, publish_request, stage_requests
from tars_tasks.routing import Route, route
from tars_tasks.schemas import (
    LANE_BATCH,
    RequestSpec,
    given_chars,
    request_columns,
    validate_requests,
    validate_run_id,
    validate_spec,
)
from tars_tasks.staging import Staging, staged_tokens

log = logging.getLogger(__name__)
#: Providers with a batch API the batch lane can use (workers/batchlane/).
BATCH_PROVIDERS: tuple[str, ...] = ("anthropic", "openai")


@dataclass(frozen=True, slots=True)
class Submission:
    id: str
    tier: str
    priority: int
    #: False when the idempotency key matched a request submitted earlier.
    created: bool


@dataclass(frozen=True, slots=True)
class _Planned:
    spec: RequestSpec
    #: Where the request goes (after degradation).
    route: Route
    id: str
    #: The tier routing asked for; differs from ``route.tier`` when degradation moved it.
    requested_tier: str
    #: The fleet mode the request was admitted under (``requests.served_mode``).
    mode: str | None = None
    #: The response cache's verdict (None: not looked up yet).
    cache: CacheVerdict | None = None
    #: Critical mode, low priority: refused (Overloaded) unless the cache answers it.
    cache_or_refuse: bool = False
    #: The tenant's spent budget period (refused with BudgetExceeded unless the cache answers it).
    over_budget: str | None = None
    #: Whose budget that is: "tenant 'acme'" or "the fleet".
    over_budget_owner: str = ""

    @property
    def hit(self) -> bool:
        return self.cache is not None and self.cache.hit is not None


#: A run found in ``runs`` is not looked up again for this long: every submit call of a producer
#: running under a run asked Postgres (a pool check-out with its pre-ping, the SELECT, the
#: check-in's rollback: three round trips) before its insert. A run deleted meanwhile fails the
#: insert's foreign key, and that is answered as the look-up would have answered.
RUN_FOUND_TTL_S = 5.0
#: At most this many runs remembered (then forgotten all at once).
RUNS_FOUND_MAX = 1024
#: The foreign key of ``requests.run_id`` (Postgres' own name for it: migration 0001 gives none).
RUN_FK = "requests_run_id_fkey"


def _unknown_run(run_id: str) -> InvalidRequest:
    return InvalidRequest(f"unknown run_id {excerpt(run_id)}: no such run in runs", field="run_id")


class Coordinator:
    def __init__(self, *, settings: Settings, catalog: Catalog, celery_app: Celery, engine: Engine,
                 admission: Admission | None = None, bound: AdmissionBound | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.celery_app = celery_app
        self.engine = engine
        self.admission = admission or Admission.for_settings(settings=settings, catalog=catalog, engine=engine)
        self.bound = bound
        #: The tenants' own limits (``TARS_TENANTS_PATH``), read when first needed.
        self._tenants: TenantConfig | None = None
        #: The broker's Redis when requests are staged (dispatch), else None (published).
        self.staging_redis: redis.Redis | None = None
        needs_bound = bound is None and settings.max_queue_depth > 0
        if settings.broker_redis_url and (settings.dispatch_enabled or needs_bound):
            from tars_tasks.redis_client import get_redis

            broker_redis = get_redis(settings.broker_redis_url, settings=settings, timeout_s=settings.client_timeout_s)
            if settings.dispatch_enabled:
                self.staging_redis = broker_redis
                self._staging = Staging(redis_client=broker_redis, namespace=settings.namespace)
            if needs_bound:
                self.bound = AdmissionBound(redis_client=broker_redis, namespace=settings.namespace,
                                            limit=settings.max_queue_depth,
                                            ttl_s=settings.admission_reservation_ttl_s)
        semantic = (SemanticOptions(max_prompt_chars=settings.semantic_max_prompt_chars,
                                    pending_ttl_s=settings.semantic_pending_ttl_s, threads=settings.semantic_threads)
                    if settings.semantic_cache else None)
        if semantic is not None:
            from tars_tasks.embedding import require_extra

            require_extra()  # named even without a cache_url: the setting asks for it
        self.cache_lookup = CacheLookup(cache=ResponseCache.for_settings(settings), catalog=catalog,
                                        semantic=semantic)
        self.budgets = (Budgets.for_settings(settings, timeout_s=settings.client_timeout_s)
                        if settings.budgets_enabled else None)
        self._notifier = None
        #: run id -> time.monotonic() it was last found in ``runs`` (see :meth:`check_run`).
        self._runs_found: dict[str, float] = {}

    def plan(self, requests: Iterable[RequestSpec | Mapping[str, Any]], *, run_id: str | None = None) -> list[_Planned]:
        """Validate and route every request and check ``run_id`` names a run; raise
        :class:`InvalidRequest` for the first bad one, before any write (``tars_tasks.schemas``)."""
        items = validate_requests(requests, max_requests=self.settings.max_requests_per_call)
        planned = []
        for i, data in enumerate(items):
            where = i if len(items) > 1 else None
            spec = validate_spec(data, catalog=self.catalog, max_prompt_chars=self.settings.max_prompt_chars,
                                 index=where)
            r = route(spec, catalog=self.catalog)
            if spec.lane == LANE_BATCH:
                self._check_batch_lane(r.tier, index=where)
            planned.append(_Planned(spec=spec, route=r, id=str(uuid.uuid4()), requested_tier=r.tier))
        self.check_run(run_id)
        return planned

    def _check_batch_lane(self, tier: str, *, index: int | None) -> None:
        """A batch-lane request needs a provider with a batch API (Anthropic, OpenAI)."""
        provider = self.settings.provider_override or self.catalog.spec(tier).provider
        if provider not in BATCH_PROVIDERS:
            where = f"request #{index}: " if index is not None else ""
            raise InvalidRequest(f"{where}lane 'batch' needs a provider with a batch API ({', '.join(BATCH_PROVIDERS)}"
                                 f"); tier {tier} uses {provider!r}", field="lane", index=index)

    def check_run(self, run_id: Any) -> str | None:
        """``run_id`` as given if it is ``None`` or names a row of ``runs``; else :class:`InvalidRequest`
        (a foreign-key error from Postgres is not a message for a producer)."""
        run_id = validate_run_id(run_id)
        if run_id is None:
            return None
        found_at = self._runs_found.get(run_id)
        if found_at is not None and time.monotonic() - found_at < RUN_FOUND_TTL_S:
            return run_id  # a producer submits many calls under one run: one look-up per RUN_FOUND_TTL_S
        runs = Run.__table__.c
        try:
            with self.engine.connect() as conn:
                found = conn.execute(select(runs.id).where(runs.id == run_id)).first()
        except OperationalError as exc:
            raise DatabaseUnavailable(f"could not look up run {run_id}: {exc.orig or exc}") from exc
        if found is None:
            raise _unknown_run(run_id)
        if len(self._runs_found) >= RUNS_FOUND_MAX:
            self._runs_found.clear()
        self._runs_found[run_id] = time.monotonic()
        return run_id

    def admit(self, planned: list[_Planned]) -> list[_Planned]:
        """Apply admission control and degradation; raise Overloaded before any write."""
        try:
            decisions = self.admission.decide_many([(p.route.tier, p.spec.priority) for p in planned])
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"broker unavailable (reading queue depths): {exc}; nothing was recorded") from exc
        out = []
        for p, d in zip(planned, decisions, strict=True):
            if d.tier != p.route.tier:
                p = replace(p, route=Route(tier=d.tier, queue=queue_for_tier(d.tier),
                                           model=self.catalog.spec(d.tier).model))
            out.append(replace(p, mode=str(d.mode), cache_or_refuse=d.cache_or_refuse))
        self.admission.admitted(decisions)
        return out

    def submit_many(
        self,
        requests: Iterable[RequestSpec | Mapping[str, Any]],
        *,
        run_id: str | None = None,
        reply_to: str | None = None,
    ) -> list[Submission]:
        return self.submit_planned(self.plan(requests, run_id=run_id), run_id=run_id, reply_to=reply_to)

    def submit_planned(self, planned: list[_Planned], *, run_id: str | None = None,
                       reply_to: str | None = None) -> list[Submission]:
        """Admit, record and queue requests :meth:`plan` validated (its ``run_id`` checked there)."""
        planned = self.admit(planned)
        planned = self.apply_budgets(planned)
        planned = self.answer_from_cache(planned)
        self._refuse_uncached(planned)
        # a cache hit is recorded answered, never queued; a batch-lane request is recorded and left to the
        # batch runner (workers/batchlane/), which gathers it into a provider batch: no queue room either
        queued = [p for p in planned if not p.hit and p.spec.lane != LANE_BATCH]
        reservations = self._reserve(queued)
        try:
            created, existing = self._record(planned, run_id=run_id, reply_to=reply_to)
            self._enqueue([p for p in queued if p.id in created], reply_to=reply_to)
        finally:
            self._release(reservations)
        self._announce([p for p in planned if p.hit and p.id in created], reply_to=reply_to)
        out = []
        for p in planned:
            if p.id in created:
                tier = p.cache.hit.tier if p.hit else p.route.tier
                out.append(Submission(id=p.id, tier=tier, priority=p.spec.priority, created=True))
            else:
                rid, tier, prio = existing[(p.spec.tenant, p.spec.idempotency_key)]
                out.append(Submission(id=rid, tier=tier, priority=prio, created=False))
        return out

    # --- the response cache (tars_tasks/cache.py) ----------------------------------------------

    def answer_from_cache(self, planned: list[_Planned]) -> list[_Planned]:
        """Every planned request with its cache verdict (digest, and the answer if one is cached).

        Looked up on the tier it is queued for, then — moved to a cheaper tier by the fleet mode or its
        tenant's soft budget threshold — on the tier it asked for (an answer already paid for, $0),
        then in critical mode on the cheaper tier's."""
        items = [(p.route.tier, p.spec.tenant, request_columns(p.spec, catalog=self.catalog), p.spec.cache)
                 for p in planned]
        also = [self._other_cache_tiers(p) for p in planned]
        verdicts = self.cache_lookup.look_up(items, also_tiers=also)
        return [replace(p, cache=v) for p, v in zip(planned, verdicts, strict=True)]

    def _other_cache_tiers(self, p: _Planned) -> list[str]:
        """Tiers besides the queued one whose cached answer ``p`` may take, in order of preference."""
        tiers = [p.requested_tier] if p.requested_tier != p.route.tier else []
        if p.mode == "critical":  # the cheaper tier's cached answer will do too
            tiers += [t for t in (self.catalog.spec(p.route.tier).fallback,) if t]
        return [t for t in dict.fromkeys(tiers) if t != p.route.tier]

    def apply_budgets(self, planned: list[_Planned]) -> list[_Planned]:
        """Tenants' budgets (tars_tasks/budgets.py): past ``budget_soft_fraction`` (spent + reserved) a
        tenant's work moves from sonnet/opus to the cheaper tier; a request is refused (after the cache
        had its say) when its period is used up, or when what is already *settled* leaves no room for
        its worst case (it could never be called this period). An unreadable budget state is
        :class:`BrokerUnavailable` (nothing is written), like any Redis error of a submit."""
        if self.budgets is None:
            return planned
        states = self.limited_periods_of(sorted({p.spec.tenant for p in planned}))
        out = []
        for p in planned:
            limited = states.get(p.spec.tenant) or []
            if not limited:
                out.append(p)
                continue
            used = max(st.used_fraction for st in limited)
            if used >= self.settings.budget_soft_fraction and p.route.tier in ("sonnet", "opus"):
                cheaper = self.catalog.spec(p.route.tier).fallback
                if cheaper:
                    p = replace(p, route=Route(tier=cheaper, queue=queue_for_tier(cheaper),
                                               model=self.catalog.spec(cheaper).model))
            worst = self._worst_case(p)
            for st in limited:
                if st.used_fraction >= 1.0 or st.spent_usd + worst > st.limit_usd:
                    p = replace(p, over_budget=st.period, over_budget_owner=st.owner)
                    break
            out.append(p)
        return out

    def limited_periods(self, tenant: str) -> list:
        """The tenant's budget periods that have a limit (none without budgets); an unreadable
        budget state is :class:`BrokerUnavailable` (nothing is written)."""
        return self.limited_periods_of([tenant])[tenant]

    def limited_periods_of(self, tenants: Sequence[str]) -> dict[str, list]:
        """:meth:`limited_periods` of several tenants, read in one round trip (each with the fleet's)."""
        if self.budgets is None:
            return {t: [] for t in tenants}
        from tars_tasks.budgets import FLEET

        try:  # the fleet-wide budget binds every tenant
            states = self.budgets.states([*tenants, FLEET])
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"fleet state unavailable (reading budgets): {exc}; nothing was recorded") from exc
        return {t: [st for scope in ([t] if t == FLEET else [t, FLEET]) for st in states[scope]
                    if st.limit_usd is not None] for t in tenants}

    def _worst_case(self, p: _Planned) -> Decimal:
        """A request's most on its tier: its input (about four characters a token) and its output limit."""
        spec = self.catalog.spec(p.route.tier)
        cols = request_columns(p.spec, catalog=self.catalog)
        input_tokens = max(1, -(-given_chars(cols) // 4))
        output = max(1, min(cols.get("max_tokens") or spec.output_tokens[1], spec.max_output_tokens))
        return spec.cost_usd(input_tokens=input_tokens, output_tokens=output)

    def _refuse_uncached(self, planned: Sequence[_Planned]) -> None:
        """A tenant's spent budget, or critical mode for low priority: a request the cache could not
        answer refuses the whole call (nothing is written)."""
        spent = [p for p in planned if p.over_budget and not p.hit]
        if spent:
            p = spent[0]
            raise BudgetExceeded(f"{p.over_budget_owner or f'tenant {p.spec.tenant!r}'} has spent its "
                                 f"{p.over_budget} budget; "
                                 f"{len(spent)} request(s) refused, nothing was recorded",
                                 tenant=p.spec.tenant, period=p.over_budget)
        refused = [p for p in planned if p.cache_or_refuse and not p.hit]
        if refused:
            from tars_tasks.admission import RETRY_AFTER_S

            raise Overloaded(f"the fleet is in critical mode: {len(refused)} low-priority request(s) (priority "
                             f"< normal) not answerable from cache are refused; retry in {RETRY_AFTER_S:.0f}s",
                             retry_after_s=RETRY_AFTER_S)

    def _cost_columns(self, p: _Planned, *, now: datetime) -> dict[str, Any]:
        """The cost-control columns of a request row; a cache hit's row is finished here."""
        cols: dict[str, Any] = {"served_mode": p.mode, "cache_digest": p.cache.digest if p.cache else None,
                                # every row of one INSERT has the same keys
                                "result": None, "stop_reason": None, "tier_used": None, "model": None,
                                "answered_by": None, "saved_usd": 0, "started_at": None, "finished_at": None,
                                "cache_similarity": None}
        if p.hit:
            hit = p.cache.hit
            cols.update(status=RequestStatus.SUCCEEDED, result=hit.text, stop_reason=hit.stop_reason,
                        tier_used=hit.tier, model=hit.model, answered_by=p.cache.how, saved_usd=hit.cost_usd,
                        cache_similarity=p.cache.similarity,
                        started_at=now, finished_at=now)
        return cols

    def _announce(self, planned: Sequence[_Planned], *, reply_to: str | None) -> None:
        """Completion notices for the requests answered at submit (as a worker sends for its own)."""
        if not planned or not reply_to:
            return
        if self._notifier is None:
            from tars_tasks.notify import LocalNotifier, RedisNotifier

            url = self.settings.shared_redis_url
            if url:
                from tars_tasks.redis_client import get_redis

                self._notifier = RedisNotifier(get_redis(url, settings=self.settings,
                                                         timeout_s=self.settings.client_timeout_s))
            else:
                self._notifier = LocalNotifier()
        self._notifier.publish({reply_to: [(p.id, str(RequestStatus.SUCCEEDED)) for p in planned]})

    # --- steps -------------------------------------------------------------------------------

    def _reserve(self, planned: Sequence[_Planned]) -> list[Reservation]:
        """Room on every tier this call publishes to, or Overloaded / BrokerUnavailable (nothing kept)."""
        if self.bound is None:
            return []
        per_tier: dict[str, int] = {}
        for p in planned:
            per_tier[p.route.tier] = per_tier.get(p.route.tier, 0) + 1
        granted: list[Reservation] = []
        try:
            for tier, n in sorted(per_tier.items()):
                reservation, depth = self.bound.reserve(tier=tier, n=n)
                if reservation is None:
                    self._release(granted)
                    raise Overloaded(
                        f"tier {tier!r} is full: {depth} queued or reserved fleet-wide, {n} more would pass "
                        f"max_queue_depth={self.bound.limit}; retry later", retry_after_s=1.0)
                granted.append(reservation)
        except redis.RedisError as exc:
            self._release(granted)
            raise BrokerUnavailable(f"broker unavailable (admission): {exc}; nothing was recorded") from exc
        return granted

    def _release(self, reservations: list[Reservation]) -> None:
        for r in reservations:
            try:
                self.bound.release(r)
            except redis.RedisError as exc:  # it expires by itself; until then it only holds room
                log.warning("admission reservation %s not released (%s); it expires in %.0fs", r.id, exc,
                            self.settings.admission_reservation_ttl_s)

    def _record(
        self, planned: Sequence[_Planned], *, run_id: str | None, reply_to: str | None = None
    ) -> tuple[set[str], dict[tuple[str, str | None], tuple[str, str, int]]]:
        now = datetime.now(UTC)
        rows, seen_keys = [], set()
        for p in planned:
            key = (p.spec.tenant, p.spec.idempotency_key)
            if p.spec.idempotency_key is not None:
                if key in seen_keys:  # same key twice in one call: the first one wins
                    continue
                seen_keys.add(key)
            rows.append(
                {
                    "id": p.id,
                    **request_columns(p.spec, catalog=self.catalog),
                    "tier_requested": p.requested_tier,
                    "tier_queued": p.route.tier,
                    "status": RequestStatus.QUEUED,
                    "run_id": run_id,
                    "submitted_at": now,
                    "lane": p.spec.lane,
                    "reply_to": reply_to if p.spec.lane == LANE_BATCH and not p.hit else None,
                    **self._cost_columns(p, now=now),
                }
            )
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    # Each statement here stands alone: the INSERT is atomic, ON CONFLICT waits for a
                    # writer of the same key to end, and the look-up after it reads committed rows in a
                    # transaction too. In autocommit the INSERT is one round trip, not BEGIN, INSERT,
                    # COMMIT (the pool puts the connection back out of autocommit when it is returned).
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                created = set(insert_rows(conn, Request.__table__, rows,
                                          on_conflict_do_nothing=("tenant", "idempotency_key"), returning="id"))
                existing: dict[tuple[str, str | None], tuple[str, str, int]] = {}
                dup_keys = [
                    (p.spec.tenant, p.spec.idempotency_key)
                    for p in planned
                    if p.id not in created and p.spec.idempotency_key is not None
                ]
                if dup_keys:
                    t = Request.__table__.c
                    q = select(t.id, t.tenant, t.idempotency_key, t.tier_requested, t.priority).where(
                        tuple_(t.tenant, t.idempotency_key).in_(dup_keys)
                    )
                    for rid, tenant, key, tier, prio in conn.execute(q):
                        existing[(tenant, key)] = (rid, tier, prio)
                conn.commit()  # elsewhere (SQLite) a transaction; in autocommit nothing is left to commit
        except OperationalError as exc:
            raise DatabaseUnavailable(f"could not record requests: {exc.orig or exc}") from exc
        except IntegrityError as exc:
            # the run was found within RUN_FOUND_TTL_S and deleted since: the same answer as the look-up's
            if run_id is None or getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != RUN_FK:
                raise
            self._runs_found.pop(run_id, None)
            raise _unknown_run(run_id) from None
        return created, existing

    def _enqueue(self, planned: Sequence[_Planned], *, reply_to: str | None) -> None:
        """Publish in one Redis pipeline per call (kombu's ``Producer.batch``: ~3x the messages/s
        of one round trip each, measured). If publishing fails, every request of the call is
        marked failed ("enqueue failed"); one that reached Redis anyway may still be run, and its
        worker's finish then corrects the row (see ``workers.writer._finish_stmt``)."""
        if not planned:
            return
        try:
            if self.staging_redis is not None:
                stage_requests(self.celery_app, redis_client=self.staging_redis, namespace=self.settings.namespace,
                               requests=[self._to_stage(p, reply_to=reply_to) for p in planned],
                               staging=self._staging, bundle_max=self.settings.bundle_max)
            else:
                runs = group(planned, key=lambda p: (p.route.tier, p.spec.priority) if self._bundles(p) else p.id,
                             size=self.settings.bundle_max)
                with self.celery_app.producer_or_acquire() as producer, producer.batch():
                    for run in runs:
                        p = run[0]
                        if len(run) == 1:
                            publish_request(self.celery_app, producer=producer, request_id=p.id, tier=p.route.tier,
                                            tenant=p.spec.tenant, priority=p.spec.priority, reply_to=reply_to)
                        else:  # one message for the run (tars_tasks.bundles): same list, same priority
                            publish_bundle(self.celery_app, producer=producer, request_ids=[m.id for m in run],
                                           tier=p.route.tier, priority=p.spec.priority, reply_to=reply_to)
        except Exception as exc:
            self._fail_unsent([p.id for p in planned], error=f"{FailureReason.ENQUEUE_FAILED}: {exc}")
            raise BrokerUnavailable(
                f"broker unavailable; {len(planned)} request(s) could not be queued "
                f"and are recorded as failed: {exc}"
            ) from exc

    def _to_stage(self, p: _Planned, *, reply_to: str | None) -> ToStage:
        cols = request_columns(p.spec, catalog=self.catalog)
        tokens = staged_tokens(spec=self.catalog.spec(p.route.tier), prompt=cols["prompt"], system=cols["system"],
                               messages=cols["messages"], max_tokens=cols["max_tokens"])
        return ToStage(request_id=p.id, tier=p.route.tier, tenant=p.spec.tenant, priority=p.spec.priority,
                       tokens=tokens, reply_to=reply_to, bundle=self._bundles(p))

    def _bundles(self, p: _Planned) -> bool:
        """Whether the request may share a bundle: not if its tenant has a rate limit of its own on
        its tier (docs/DELIVERY.md, "Bundles")."""
        if self.settings.bundle_max <= 1:
            return False
        if self._tenants is None:
            self._tenants = load_tenants(self.settings.tenants_path)
        return not self._tenants.spec(p.spec.tenant).limited_on(p.route.tier)

    def _fail_unsent(self, ids: list[str], *, error: str) -> None:
        if not ids:
            return
        try:
            with self.engine.begin() as conn:
                t = Request.__table__.c
                conn.execute(
                    update(Request.__table__)
                    .where(t.id.in_(ids), t.status == RequestStatus.QUEUED)
                    .values(status=RequestStatus.FAILED, error=error[:2000],
                            failure_reason=FailureReason.ENQUEUE_FAILED,
                            finished_at=datetime.now(UTC))
                )
        except Exception:
            log.exception("could not mark %d unqueued request(s) failed", len(ids))
