"""Runs and their rows in the database: the ``runs`` table and ``requests.run_id``.

A run row is created before the first request (``requests.run_id`` references it) and
finished with a summary holding every aggregate *and* the generator's per-request timings,
so a report can be rebuilt — and checked — from the database alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, inspect, or_, select, update

from loadgen.drivers import ClientSample
from loadgen.records import CallRow, DbRow, epoch
from tars_tasks.db.models import ApiCall, BatchItem, Request, Run
from tars_tasks.errors import LoadgenError
from tars_tasks.schemas import LANE_BATCH
from workers.batchlane.runner import attempt_id

_runs = Run.__table__
_req = Request.__table__
_api = ApiCall.__table__
_bi = BatchItem.__table__


def ensure_schema(engine: Engine) -> None:
    if not inspect(engine).has_table("runs"):
        raise LoadgenError(f"database {engine.url.render_as_string(hide_password=True)} has no TARS schema: "
                           "run `tars db upgrade` first")


def create_run(engine: Engine, *, run_id: str, name: str, scenario: str, config: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(_runs.insert().values(id=run_id, name=name, scenario=scenario, config=config, summary=None,
                                           started_at=datetime.now(UTC), finished_at=None))


def finish_run(engine: Engine, *, run_id: str, aggregates: dict[str, Any], samples: Sequence[ClientSample],
               drive: dict[str, Any]) -> None:
    summary = {"aggregates": aggregates, "drive": drive,
               "client": {"columns": list(ClientSample.COLUMNS), "rows": [s.as_row() for s in samples]}}
    with engine.begin() as conn:
        conn.execute(update(_runs).where(_runs.c.id == run_id).values(summary=summary,
                                                                       finished_at=datetime.now(UTC)))


def fetch_rows(engine: Engine, *, run_id: str) -> dict[str, DbRow]:
    """The run's request rows with per-request sums over their api_calls."""
    t = _req.c
    cols = [t.id, t.status, t.error, t.failure_reason, t.tier_requested, t.tier_used, t.worker, t.attempts,
            t.input_tokens,
            t.output_tokens, t.cost_usd, t.submitted_at, t.started_at, t.finished_at, t.answered_by, t.saved_usd,
            t.served_mode, t.priority, t.tenant, t.lane, t.tier_queued]
    rows: dict[str, DbRow] = {}
    calls: dict[str, list[CallRow]] = defaultdict(list)
    with engine.connect() as conn:
        for r in conn.execute(select(*cols).where(t.run_id == run_id)):
            rows[r.id] = DbRow(id=r.id, status=r.status, error=r.error, failure_reason=r.failure_reason,
                               tier_requested=r.tier_requested,
                               tier_used=r.tier_used, worker=r.worker, attempts=r.attempts or 0,
                               input_tokens=r.input_tokens or 0, output_tokens=r.output_tokens or 0,
                               cost_usd=Decimal(str(r.cost_usd or 0)), submitted_at=epoch(r.submitted_at),
                               started_at=epoch(r.started_at), finished_at=epoch(r.finished_at),
                               answered_by=r.answered_by, saved_usd=Decimal(str(r.saved_usd or 0)),
                               served_mode=r.served_mode, priority=r.priority, tenant=r.tenant,
                               lane=r.lane, tier_queued=r.tier_queued)
        # a request in a provider batch was submitted to the batch lane (its lane column says
        # ``interactive`` once the batch sent it on); its batch answer's api_calls id is derived
        # from batch and request (workers/batchlane/runner.py: attempt_id)
        b = _bi.c
        batch_calls: set[str] = set()
        for m in conn.execute(select(b.request_id, b.batch_id).select_from(_bi.join(_req, _req.c.id == b.request_id))
                              .where(t.run_id == run_id)):
            row = rows.get(m.request_id)
            if row is not None:
                row.lane = LANE_BATCH
                batch_calls.add(attempt_id(m.batch_id, m.request_id))
        a = _api.c
        q = (select(a.id, a.request_id, a.tier, a.outcome, a.input_tokens, a.output_tokens, a.cost_usd, a.latency_ms,
                    a.ratelimit_wait_ms, a.attempt, a.cache_write_tokens, a.cache_write_1h_tokens, a.cache_read_tokens)
             .select_from(_api.join(_req, _req.c.id == a.request_id)).where(t.run_id == run_id)
             .order_by(a.request_id, a.attempt, a.started_at))
        for c in conn.execute(q):
            calls[c.request_id].append(CallRow(
                tier=c.tier, outcome=c.outcome, input_tokens=c.input_tokens or 0, output_tokens=c.output_tokens or 0,
                cost_usd=Decimal(str(c.cost_usd or 0)),
                latency_ms=None if c.latency_ms is None else float(c.latency_ms),
                ratelimit_wait_ms=float(c.ratelimit_wait_ms or 0),
                cache_write_tokens=(c.cache_write_tokens or 0) + (c.cache_write_1h_tokens or 0),
                cache_read_tokens=c.cache_read_tokens or 0, cache_write_1h_tokens=c.cache_write_1h_tokens or 0,
                batch=c.id in batch_calls))
    for rid, cs in calls.items():
        row = rows.get(rid)
        if row is not None:
            row.set_calls(cs)
    return rows


def mode_changes(engine: Engine, *, namespace: str, until: float) -> list[dict[str, Any]]:
    """The fleet's mode transitions (``mode_changes``) up to ``until`` (epoch s), oldest first."""
    from tars_tasks.db.models import ModeChange

    m = ModeChange.__table__.c
    q = (select(m.seq, m.at, m.from_mode, m.to_mode, m.reason, m.signals)
         .where(m.namespace == namespace, m.at <= datetime.fromtimestamp(until, UTC)).order_by(m.at, m.seq))
    with engine.connect() as conn:
        return [{"seq": r.seq, "at": epoch(r.at), "from": r.from_mode, "to": r.to_mode, "reason": r.reason,
                 "signals": r.signals} for r in conn.execute(q)]


def call_outcomes(engine: Engine, *, run_id: str) -> dict[str, int]:
    a = _api.c
    q = (select(a.outcome, func.count()).select_from(_api.join(_req, _req.c.id == a.request_id))
         .where(_req.c.run_id == run_id).group_by(a.outcome))
    with engine.connect() as conn:
        return dict(Counter({o: int(n) for o, n in conn.execute(q)}).most_common())


def load_run(engine: Engine, *, run_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        r = conn.execute(select(_runs).where(_runs.c.id == run_id)).mappings().first()
    if r is None:
        raise LoadgenError(f"no run {run_id!r} in the database")
    return dict(r)


def client_samples(summary: dict[str, Any]) -> list[ClientSample]:
    client = (summary or {}).get("client") or {}
    cols = client.get("columns") or list(ClientSample.COLUMNS)
    if tuple(cols) != ClientSample.COLUMNS:
        raise LoadgenError(f"stored client timings have columns {cols}, expected {list(ClientSample.COLUMNS)}")
    return [ClientSample.from_row(row) for row in client.get("rows", [])]


def find_runs(engine: Engine, *, ref: str) -> list[dict[str, Any]]:
    """Runs whose id is ``ref`` or which belong to session ``ref`` (ids ``ref-NN``), in order."""
    with engine.connect() as conn:
        q = select(_runs).where(or_(_runs.c.id == ref, _runs.c.id.like(f"{ref}-%"))).order_by(_runs.c.id)
        return [dict(r) for r in conn.execute(q).mappings()]
