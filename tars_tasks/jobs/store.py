"""Jobs in Postgres: submit, advance (inside the group commit that finishes a step), cancel, read.

Durability (docs/JOBS.md):

* **submit** writes the job row, its first step instances and their request rows (``queued``) in
  one transaction, then publishes the requests; if publishing fails the job and its requests are
  marked failed ("enqueue failed") and :class:`BrokerUnavailable` is raised, as for a request.
* **advance** runs inside the worker's group-commit transaction that finishes step requests
  (:class:`workers.writer.GroupCommitWriter`'s ``on_finished`` hook): it locks the jobs those
  requests belong to (``FOR UPDATE`` in id order, after the writer's request locks — the only
  order anything here takes them in), asks :func:`tars_tasks.jobs.plan.advance` what comes next,
  and inserts the successors' instances and request rows (``queued``) in that same transaction.
  Instances are unique on ``(job_id, step, item, revision)`` and their requests on the
  idempotency key ``job:<job>:<step>:<item>:<revision>``: a re-delivered finish, or a pass over a
  job that already moved, adds nothing. The successors are published after the commit; a crash in
  between leaves them ``queued`` and the lost-request reconciler (workers/maintenance.py)
  publishes them.
* **cancel** and a job's end mark its still-queued step requests failed (``cancelled``); those
  whose row another transaction holds right now (``SKIP LOCKED``) are being finished, and what
  they spend is counted like everything else.

A job's tokens and cost are always read as the sums of its requests' ``api_calls``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import OperationalError

from config.catalog import Catalog
from config.pricing import TOKEN_CLASSES
from config.settings import Settings
from tars_tasks.db.errors import is_transient
from tars_tasks.db.models import ENQUEUE_FAILED, STATUS_FAILED, STATUS_QUEUED, ApiCall, Request
from tars_tasks.db.upsert import insert_for
from tars_tasks.errors import BrokerUnavailable, DatabaseUnavailable, InvalidRequest, Overloaded
from tars_tasks.jobs import STEP_METADATA_KEY
from tars_tasks.jobs import plan as planner
from tars_tasks.jobs.tables import (
    JOB_CANCELLED,
    JOB_FAILED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    JOB_TERMINAL,
    REASON_CANCELLED,
    Job,
    JobStep,
)
from tars_tasks.jobs.template import Template, check_input, parse_template, resolve
from tars_tasks.publish import ToStage, publish_request, stage_requests
from tars_tasks.schemas import LANE_BATCH, LANE_INTERACTIVE

log = logging.getLogger(__name__)

_jobs = Job.__table__
_steps = JobStep.__table__
_req = Request.__table__
_api = ApiCall.__table__
REASON_INTERNAL = "internal_error"


def _now() -> datetime:
    return datetime.now(UTC)


def step_key(job_id: str, step: str, item: int, revision: int) -> str:
    return f"job:{job_id}:{step}:{item}:{revision}"


@dataclass(frozen=True, slots=True)
class JobSubmission:
    id: str
    #: False when the idempotency key matched a job submitted earlier.
    created: bool
    #: Step requests queued by this submit.
    steps: int


@dataclass(frozen=True, slots=True)
class StepView:
    step: str
    item: int
    revision: int
    request_id: str
    status: str
    failure_reason: str | None
    error: str | None
    role: str
    tier: str | None
    attempts: int
    tokens: int
    cost_usd: Decimal
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: str | None
    worker: str | None
    #: True for an instance of a step that runs once per item.
    fanned: bool = False

    @property
    def label(self) -> str:
        s = f"{self.step}[{self.item}]" if self.fanned else self.step
        return s if self.revision == 0 else f"{s}@r{self.revision}"

    @property
    def latency_s(self) -> float | None:
        """From queued to finished (waiting in its tier's queue included)."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.submitted_at).total_seconds()


@dataclass(frozen=True, slots=True)
class JobView:
    id: str
    template: str
    status: str
    tenant: str
    priority: int
    result: str | None
    error: str | None
    failure_reason: str | None
    failed_step: str | None
    submitted_at: datetime
    finished_at: datetime | None
    steps: tuple[StepView, ...]
    #: Sums of the job's requests' api_calls.
    attempts: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    cost_usd: Decimal = Decimal(0)
    cost_by_tier: dict[str, Decimal] = field(default_factory=dict)
    #: The template as stored with the job.
    definition: Template | None = None

    @property
    def done(self) -> bool:
        return self.status in JOB_TERMINAL

    @property
    def ok(self) -> bool:
        return self.status == JOB_SUCCEEDED

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else (self.finished_at - self.submitted_at).total_seconds()

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def critical_path(self) -> list[StepView]:
        """The chain of instances the job's end waited on: from the last to finish, back through the
        latest-finishing instance each one could have waited for (its ``after`` steps, and for a
        revision the validator that sent it back)."""
        done = [s for s in self.steps if s.finished_at is not None]
        if not done:
            return []
        definition = self.definition
        after: dict[str, set[str]] = {}
        if definition is not None:
            for st in definition.steps:
                after.setdefault(st.name, set()).update(st.after)
                if st.revises:
                    after.setdefault(st.revises, set()).add(st.name)
        path = [max(done, key=lambda s: s.finished_at)]
        while True:
            cur = path[-1]
            preds = [s for s in done if s.step in after.get(cur.step, ()) and s.finished_at <= cur.submitted_at]
            if not preds:
                break
            path.append(max(preds, key=lambda s: s.finished_at))
        return list(reversed(path))

    def critical_path_s(self) -> float:
        return sum(s.latency_s or 0.0 for s in self.critical_path())

    def step_latency_sum_s(self) -> float:
        return sum(s.latency_s or 0.0 for s in self.steps)


class JobStore:
    def __init__(self, *, settings: Settings, catalog: Catalog, engine: Engine, celery_app,
                 coordinator=None, notifier=None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = engine
        self.celery_app = celery_app
        self._coordinator = coordinator
        self.notifier = notifier
        self.scheduled = 0
        #: Jobs the current hook call ended (logged once its transaction commits).
        self._ended: list[tuple[str, str]] | None = None

    @property
    def coordinator(self):
        if self._coordinator is None:
            from tars_tasks.coordinator import Coordinator

            self._coordinator = Coordinator(settings=self.settings, catalog=self.catalog,
                                            celery_app=self.celery_app, engine=self.engine)
        return self._coordinator

    # --- planning requests -------------------------------------------------------------------

    def _specs(self, *, job_id: str, template: Template, new: Sequence[planner.NewInstance], tenant: str,
               priority: int) -> list[dict[str, Any]]:
        out = []
        for n in new:
            s = template.step(n.step)
            spec = {"role": s.role, "prompt": n.prompt, "priority": priority, "tenant": tenant,
                    "idempotency_key": step_key(job_id, n.step, n.item, n.revision),
                    "metadata": {STEP_METADATA_KEY: job_id, "step": n.step, "item": str(n.item),
                                 "revision": str(n.revision)}}
            if s.tier:
                spec["tier"] = s.tier
            if s.lane != LANE_INTERACTIVE:
                spec["lane"] = s.lane
            if s.deadline is not None:
                spec["deadline"] = s.deadline
            out.append(spec)
        return out

    def _check_lanes(self, template: Template) -> None:
        """Every batch-lane step's tier has a provider with a batch API — checked at submit for all the
        steps, not when a later step is scheduled (the job would fail halfway)."""
        from tars_tasks.routing import route
        from tars_tasks.schemas import validate_spec

        for s in template.steps:
            if s.lane != LANE_BATCH:
                continue
            spec = validate_spec({"role": s.role, "prompt": "lane check", "lane": s.lane,
                                  **({"tier": s.tier} if s.tier else {})}, catalog=self.catalog,
                                 max_prompt_chars=self.settings.max_prompt_chars)
            try:
                self.coordinator._check_batch_lane(route(spec, catalog=self.catalog).tier, index=None)
            except InvalidRequest as exc:
                raise InvalidRequest(f"template {template.name!r}: step {s.name!r}: {exc}",
                                     field=f"steps.{s.name}.lane") from None

    def _to_send(self, planned) -> list[ToStage]:
        """What goes to the queues: a batch-lane step is recorded and left to the batch runner."""
        return [self.coordinator._to_stage(p, reply_to=None) for p in planned if p.spec.lane != LANE_BATCH]

    def _rows(self, planned, *, run_id: str | None, now: datetime) -> list[dict[str, Any]]:
        from tars_tasks.schemas import request_columns

        return [{"id": p.id, **request_columns(p.spec, catalog=self.catalog), "tier_requested": p.requested_tier,
                 "tier_queued": p.route.tier, "status": STATUS_QUEUED, "run_id": run_id, "submitted_at": now,
                 "attempts": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0, "served_mode": p.mode,
                 "lane": p.spec.lane}
                for p in planned]

    # --- submit --------------------------------------------------------------------------------

    def submit(self, *, template: str | Mapping[str, Any], input: Any, priority: int | str = "normal",
               tenant: str = "default", idempotency_key: str | None = None, reply_to: str | None = None,
               run_id: str | None = None) -> JobSubmission:
        from tars_tasks.schemas import validate_spec

        t = resolve(template, catalog=self.catalog, path=self.settings.job_templates_path)
        data = check_input(t, input, max_chars=self.settings.max_prompt_chars)
        head = validate_spec({"role": t.steps[0].role, "prompt": "job", "priority": priority, "tenant": tenant,
                              "idempotency_key": idempotency_key}, catalog=self.catalog,
                             max_prompt_chars=self.settings.max_prompt_chars)
        first = planner.advance(t, data, [])
        if first.verdict is not None or not first.new:
            raise InvalidRequest(f"template {t.name!r}: the job cannot start: "
                                 f"{first.verdict.error if first.verdict else 'no step is ready'}", field="input")
        self._check_lanes(t)
        job_id = str(uuid.uuid4())
        try:
            planned = self.coordinator.plan(self._specs(job_id=job_id, template=t, new=first.new, tenant=head.tenant,
                                                        priority=head.priority), run_id=run_id)
        except InvalidRequest as exc:
            raise InvalidRequest(f"template {t.name!r}: a first step's request is invalid: {exc}",
                                 field=exc.field) from None
        planned = self.coordinator.admit(planned)
        # the tenant's budget and the fleet's mode apply to a job as to a request: past the soft
        # threshold its steps move to the cheaper tier; a spent budget (BudgetExceeded) or, in
        # critical mode, low priority (Overloaded) refuses the job before anything is written
        planned = self.coordinator.apply_budgets(planned)
        self.coordinator._refuse_uncached(planned)
        self._refuse_unaffordable(planned, tenant=head.tenant)
        reservations = self.coordinator._reserve(planned)
        try:
            created = self._record_job(job_id=job_id, template=t, data=data, tenant=head.tenant,
                                       priority=head.priority, idempotency_key=head.idempotency_key,
                                       reply_to=reply_to, run_id=run_id, new=first.new, planned=planned)
            if created is not None:
                return JobSubmission(id=created, created=False, steps=0)
            try:
                self._publish(self._to_send(planned))
            except Exception as exc:
                self._fail_unsent(job_id, [p.id for p in planned], reason=f"{ENQUEUE_FAILED}: {exc}")
                raise BrokerUnavailable(f"broker unavailable; job {job_id} could not be queued and is recorded as "
                                        f"failed: {exc}") from exc
        finally:
            self.coordinator._release(reservations)
        return JobSubmission(id=job_id, created=True, steps=len(planned))

    def _refuse_unaffordable(self, planned, *, tenant: str) -> None:
        """A job starts only if its first steps' worst cases fit together in what the tenant's
        budget has left (spent and reserved counted): started anyway, its parallel first steps would
        reserve against each other and the job would fail step by step, $0 each, forever."""
        from tars_tasks.errors import BudgetExceeded

        states = self.coordinator.limited_periods(tenant)
        if not states:
            return
        worst = sum((self.coordinator._worst_case(p) for p in planned), Decimal(0))
        for st in states:
            left = st.limit_usd - st.spent_usd - st.reserved_usd
            if worst > left:
                raise BudgetExceeded(f"{st.owner}: its {st.period} budget has {max(left, Decimal(0)):.6f} USD "
                                     f"left, this job's first steps may cost {worst:.6f}; nothing was recorded",
                                     tenant=tenant, period=st.period)

    def _record_job(self, *, job_id, template, data, tenant, priority, idempotency_key, reply_to, run_id, new,
                    planned) -> str | None:
        """Write the job and its first steps; the existing job's id if the idempotency key was used."""
        now = _now()
        try:
            with self.engine.begin() as conn:
                ins = insert_for(conn, _jobs).values(
                    id=job_id, tenant=tenant, idempotency_key=idempotency_key, template=template.name,
                    definition=template.to_data(), input=data, priority=priority, status=JOB_RUNNING,
                    reply_to=reply_to, run_id=run_id, submitted_at=now)
                got = conn.execute(ins.on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
                                   .returning(_jobs.c.id)).first()
                if got is None:
                    return conn.execute(select(_jobs.c.id).where(_jobs.c.tenant == tenant,
                                                                 _jobs.c.idempotency_key == idempotency_key)).scalar()
                self._insert_instances(conn, job_id=job_id, new=new, planned=planned, run_id=run_id, now=now)
        except OperationalError as exc:
            raise DatabaseUnavailable(f"could not record job: {exc.orig or exc}") from exc
        return None

    def _insert_instances(self, conn: Connection, *, job_id: str, new, planned, run_id, now) -> list:
        """Insert instances and their requests; only those not there yet (unique keys). Returns the
        planned requests that were inserted."""
        rows = self._rows(planned, run_id=run_id, now=now)
        step_rows = [{"job_id": job_id, "step": n.step, "item": n.item, "revision": n.revision, "request_id": p.id,
                      "item_value": n.item_value, "created_at": now} for n, p in zip(new, planned, strict=True)]
        fresh = {r[0] for r in conn.execute(
            insert_for(conn, _steps).on_conflict_do_nothing(index_elements=["job_id", "step", "item", "revision"])
            .returning(_steps.c.request_id), step_rows)}
        if not fresh:
            return []
        conn.execute(insert_for(conn, _req).on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"]),
                     [r for r in rows if r["id"] in fresh])
        return [p for p in planned if p.id in fresh]

    def _publish(self, requests: Iterable[ToStage], *, notices=None) -> None:
        """Send step requests the way the coordinator sends requests: staged for dispatch (priority
        and tenant order under a binding limit, docs/DISPATCH.md), or with dispatch off published."""
        requests = list(requests)
        if requests:
            c = self.coordinator
            if c.staging_redis is not None:
                stage_requests(self.celery_app, redis_client=c.staging_redis, namespace=self.settings.namespace,
                               requests=requests, staging=c._staging)
            else:
                with self.celery_app.producer_or_acquire() as producer, producer.batch():
                    for r in requests:
                        publish_request(self.celery_app, producer=producer, request_id=r.request_id, tier=r.tier,
                                        tenant=r.tenant, priority=r.priority, reply_to=None)
        if notices and self.notifier is not None:
            self.notifier.publish(notices)

    def republish_unsent(self, *, request_id: str) -> int:
        """Publish the job's step requests that were committed but never sent; returns how many.

        Called when a finished step's message is delivered again. Its worker acks a message only
        after the commit that finished the step *and* the publish of the successors it queued,
        so a worker killed in between leaves that message unacked; the lease sweeper hands it to
        another worker within seconds, and this is where the successors that never reached the
        broker go out (``queued``, no attempt, in no staging, tier list or ``unacked`` entry). Without
        it they waited for the lost-request reconciler (``requeue_lost_after_s``, minutes)."""
        from sqlalchemy import exists

        from tars_tasks.broker.presence import ids_in_broker
        from tars_tasks.redis_client import get_redis

        with self.engine.connect() as conn:
            job_id = conn.execute(select(_steps.c.job_id).where(_steps.c.request_id == request_id)).scalar()
            if job_id is None:
                return 0
            rows = conn.execute(
                select(_req.c.id, _req.c.tier_queued, _req.c.tier_requested, _req.c.tenant, _req.c.priority,
                       _req.c.prompt, _req.c.system, _req.c.messages, _req.c.max_tokens)
                .join(_steps, _steps.c.request_id == _req.c.id)
                .where(_steps.c.job_id == job_id, _req.c.status == STATUS_QUEUED, _req.c.lane != LANE_BATCH,
                       ~exists().where(_api.c.request_id == _req.c.id))).all()
        if not rows or not self.settings.broker_redis_url:
            return 0
        tiers = {r.tier_queued or r.tier_requested for r in rows}
        present = ids_in_broker(get_redis(self.settings.broker_redis_url, settings=self.settings),
                                ids=[r.id for r in rows], tiers=tiers, namespace=self.settings.namespace)
        from tars_tasks.staging import staged_tokens

        unsent = [ToStage(request_id=r.id, tier=(tier := r.tier_queued or r.tier_requested), tenant=r.tenant,
                          priority=r.priority,
                          tokens=staged_tokens(spec=self.catalog.spec(tier), prompt=r.prompt, system=r.system,
                                               messages=r.messages, max_tokens=r.max_tokens))
                  for r in rows if r.id not in present]
        for rid in [u.request_id for u in unsent]:
            log.warning("job %s: step request %s was committed but never published (its worker died in "
                        "between); publishing it now", job_id, rid)
        self._publish(unsent)
        return len(unsent)

    def _fail_unsent(self, job_id: str, ids: list[str], *, reason: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(update(_req).where(_req.c.id.in_(ids), _req.c.status == STATUS_QUEUED).values(
                    status=STATUS_FAILED, error=reason[:2000], failure_reason=ENQUEUE_FAILED, finished_at=_now()))
                conn.execute(update(_jobs).where(_jobs.c.id == job_id, _jobs.c.status == JOB_RUNNING).values(
                    status=JOB_FAILED, failure_reason=ENQUEUE_FAILED, error=reason[:2000], finished_at=_now()))
        except Exception:
            log.exception("could not mark job %s failed after its publish failed", job_id)

    # --- advance (inside the writer's transaction) --------------------------------------------

    def on_finished(self, conn: Connection, request_ids: Sequence[str]) -> Callable[[], None] | None:
        """The group-commit hook: schedule what the finished steps make ready, in ``conn``'s
        transaction. Returns what to do after the commit (publish, notify), or None."""
        if not request_ids:
            return None
        job_ids = sorted(set(conn.execute(select(_steps.c.job_id).where(_steps.c.request_id.in_(list(request_ids))))
                             .scalars()))
        if not job_ids:
            return None
        jobs = conn.execute(select(_jobs).where(_jobs.c.id.in_(job_ids)).order_by(_jobs.c.id)
                            .with_for_update()).mappings().all()
        to_publish: list[ToStage] = []
        notices: dict[str, list[tuple[str, str]]] = {}
        ended = self._ended = []
        for job in jobs:
            if job["status"] != JOB_RUNNING:
                continue
            savepoint = conn.begin_nested()
            try:
                status = self._advance_one(conn, job, to_publish)
                savepoint.commit()
            except Exception as exc:
                savepoint.rollback()
                if is_transient(exc):
                    raise
                log.exception("job %s: scheduling failed; failing the job", job["id"])
                status = self._end(conn, job["id"], planner.Verdict(
                    planner.FAILED, failure_reason=REASON_INTERNAL, error=f"{REASON_INTERNAL}: {type(exc).__name__}: "
                                                                          f"{exc}"[:2000]))
            if status is not None and job["reply_to"]:
                notices.setdefault(job["reply_to"], []).append((job["id"], status))
        self._ended = None
        if not to_publish and not notices and not ended:
            return None

        def after_commit() -> None:
            self.scheduled += len(to_publish)
            for job_id, status in ended:  # once per job: the tests count these lines
                log.info("job %s ended %s", job_id, status)
            self._publish(to_publish, notices=notices)

        return after_commit

    def _instances(self, conn: Connection, job_id: str) -> list[planner.Instance]:
        q = (select(_steps.c.step, _steps.c.item, _steps.c.revision, _steps.c.item_value, _req.c.status,
                    _req.c.result, _req.c.failure_reason, _req.c.error)
             .join(_req, _req.c.id == _steps.c.request_id).where(_steps.c.job_id == job_id))
        return [planner.Instance(step=r.step, item=r.item, revision=r.revision, status=r.status, result=r.result,
                                 failure_reason=r.failure_reason, error=r.error, item_value=r.item_value)
                for r in conn.execute(q)]

    def _advance_one(self, conn: Connection, job, to_publish: list) -> str | None:
        template = parse_template(job["template"], job["definition"], catalog=self.catalog)
        result = planner.advance(template, job["input"], self._instances(conn, job["id"]))
        if result.new:
            try:
                planned = self.coordinator.plan(self._specs(job_id=job["id"], template=template, new=result.new,
                                                            tenant=job["tenant"], priority=job["priority"]))
            except InvalidRequest as exc:
                return self._end(conn, job["id"], planner.Verdict(
                    planner.FAILED, failure_reason=planner.REASON_RENDER, error=f"a step's request is invalid: {exc}"))
            try:  # degradation applies; a job admitted at submit is never refused halfway
                planned = self.coordinator.admit(planned)
            except (Overloaded, BrokerUnavailable) as exc:
                log.info("job %s: successors queued on their own tiers (admission: %s)", job["id"], exc)
            try:  # the soft budget threshold moves them to the cheaper tier; a spent budget is the call
                # path's to refuse (the step fails with reason "budget", and the job with it)
                planned = self.coordinator.apply_budgets(planned)
            except BrokerUnavailable as exc:
                log.info("job %s: successors scheduled without a budget check (%s)", job["id"], exc)
            inserted = self._insert_instances(conn, job_id=job["id"], new=result.new, planned=planned,
                                              run_id=job["run_id"], now=_now())
            to_publish.extend(self._to_send(inserted))
        if result.verdict is not None:
            return self._end(conn, job["id"], result.verdict)
        return None

    def _end(self, conn: Connection, job_id: str, verdict: planner.Verdict) -> str:
        ended = conn.execute(update(_jobs).where(_jobs.c.id == job_id, _jobs.c.status == JOB_RUNNING).values(
            status=verdict.status, result=verdict.result, error=verdict.error, failure_reason=verdict.failure_reason,
            failed_step=verdict.failed_step, finished_at=_now())).rowcount
        if ended and self._ended is not None:
            self._ended.append((job_id, verdict.status))
        self._stop_queued(conn, job_id, why=f"job {verdict.status}")
        return verdict.status

    def _stop_queued(self, conn: Connection, job_id: str, *, why: str) -> int:
        """Fail the job's step requests still queued (``cancelled``), but none another transaction holds."""
        ids = list(conn.execute(
            select(_req.c.id).where(_req.c.id.in_(select(_steps.c.request_id).where(_steps.c.job_id == job_id)),
                                    _req.c.status == STATUS_QUEUED)
            .order_by(_req.c.id).with_for_update(skip_locked=True)).scalars())
        if ids:
            conn.execute(update(_req).where(_req.c.id.in_(ids), _req.c.status == STATUS_QUEUED).values(
                status=STATUS_FAILED, failure_reason=REASON_CANCELLED, error=f"{REASON_CANCELLED}: {why}",
                finished_at=_now()))
        return len(ids)

    # --- cancel / read -------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobView:
        from tars_tasks.errors import RequestNotFound

        with self.engine.begin() as conn:
            job = conn.execute(select(_jobs.c.id, _jobs.c.status, _jobs.c.reply_to).where(_jobs.c.id == job_id)
                               .with_for_update()).first()
            if job is None:
                raise RequestNotFound(f"no job with id {job_id!r}")
            if job.status == JOB_RUNNING:
                conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(
                    status=JOB_CANCELLED, failure_reason=REASON_CANCELLED, error="cancelled by request",
                    finished_at=_now()))
                self._stop_queued(conn, job_id, why="job cancelled")
        return self.get(job_id)

    def get(self, job_id: str) -> JobView:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobView]:
        from tars_tasks.errors import RequestNotFound

        ids = list(dict.fromkeys(job_ids))
        with self.engine.connect() as conn:
            jobs = {r["id"]: r for r in conn.execute(select(_jobs).where(_jobs.c.id.in_(ids))).mappings()}
            missing = [i for i in ids if i not in jobs]
            if missing:
                raise RequestNotFound(f"no job with id {missing[0]!r}")
            definitions: dict[str, Template | None] = {}
            for i, j in jobs.items():
                try:
                    definitions[i] = parse_template(j["template"], j["definition"], catalog=self.catalog)
                except InvalidRequest:
                    definitions[i] = None
            steps: dict[str, list[StepView]] = {i: [] for i in ids}
            q = (select(_steps.c.job_id, _steps.c.step, _steps.c.item, _steps.c.revision, _req.c.id, _req.c.status,
                        _req.c.failure_reason, _req.c.error, _req.c.role, _req.c.tier_used, _req.c.tier_queued,
                        _req.c.attempts, *[_req.c[c] for c in TOKEN_CLASSES], _req.c.cost_usd, _req.c.submitted_at,
                        _req.c.started_at, _req.c.finished_at, _req.c.result, _req.c.worker)
                 .join(_req, _req.c.id == _steps.c.request_id).where(_steps.c.job_id.in_(ids))
                 .order_by(_steps.c.job_id, _steps.c.id))
            for r in conn.execute(q):
                d = definitions[r.job_id]
                fanned = bool(d and r.step in {x.name for x in d.steps} and d.step(r.step).fans_out)
                steps[r.job_id].append(StepView(fanned=fanned,
                    step=r.step, item=r.item, revision=r.revision, request_id=r.id, status=r.status,
                    failure_reason=r.failure_reason, error=r.error, role=r.role, tier=r.tier_used or r.tier_queued,
                    attempts=r.attempts, tokens=sum(getattr(r, c) for c in TOKEN_CLASSES), cost_usd=Decimal(r.cost_usd),
                    submitted_at=r.submitted_at, started_at=r.started_at, finished_at=r.finished_at, result=r.result,
                    worker=r.worker))
            sums = {c: func.coalesce(func.sum(_api.c[c]), 0) for c in TOKEN_CLASSES}
            tq = (select(_steps.c.job_id, _api.c.tier, func.count(_api.c.id).label("n"),
                         func.coalesce(func.sum(_api.c.cost_usd), 0).label("cost"),
                         *[v.label(c) for c, v in sums.items()])
                  .join(_api, _api.c.request_id == _steps.c.request_id).where(_steps.c.job_id.in_(ids))
                  .group_by(_steps.c.job_id, _api.c.tier))
            totals: dict[str, list] = {i: [] for i in ids}
            for r in conn.execute(tq):
                totals[r.job_id].append(r)
        out = []
        for i in ids:
            j = jobs[i]
            ts = totals[i]
            out.append(JobView(
                id=i, template=j["template"], status=j["status"], tenant=j["tenant"], priority=j["priority"],
                result=j["result"], error=j["error"], failure_reason=j["failure_reason"], failed_step=j["failed_step"],
                submitted_at=j["submitted_at"], finished_at=j["finished_at"], steps=tuple(steps[i]),
                attempts=sum(r.n for r in ts), tokens={c: sum(int(getattr(r, c)) for r in ts) for c in TOKEN_CLASSES},
                cost_usd=sum((Decimal(r.cost) for r in ts), Decimal(0)),
                cost_by_tier={r.tier: Decimal(r.cost) for r in ts}, definition=definitions[i]))
        return out
