"""``tars dead-letter``: the requests that ended ``failed``, listed and re-submitted.

Repairs "silently dropped": a request that exhausted its retries (or hit a permanent error,
or an open breaker) is a ``failed`` row with its reason; this is where an operator finds it
and sends it again. Re-submitting makes a *new* request (new id, fresh retries) through the
producer API and prints ``old id -> new id``; the failed row is left as it was, as the record
of what happened.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import click
from sqlalchemy import select

from config.keys import TIERS
from tars_tasks.codes import RequestStatus
from tars_tasks.db.models import Request
from tars_tasks.schemas import MODEL_FIELDS

#: On the embedded default, how long a re-submission waits for its requests to run in-process.
RESUBMIT_TIMEOUT_S = 600.0
_REL_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None) -> datetime | None:
    """``30m``, ``2h``, ``1d`` ago, or an ISO-8601 time (UTC if it names no zone)."""
    if not value:
        return None
    m = _REL_RE.match(value.strip())
    if m:
        return datetime.now(UTC) - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use e.g. 30m, 2h, 1d or an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def failed_requests(*, engine, tier: str | None = None, since: datetime | None = None, reason: str | None = None,
                    ids: tuple[str, ...] = (), limit: int = 100) -> list[dict]:
    """Failed requests, newest first. ``reason`` is a ``failure_reason`` code (``rate_limited``, ...),
    matched exactly: the error text is for people and is never searched for a reason."""
    t = Request.__table__.c
    q = select(t.id, t.tenant, t.role, t.tier_requested, t.tier_used, t.priority, t.prompt, t.error,
               t.failure_reason, t.attempts,
               t.submitted_at, t.finished_at, *(t[f] for f in MODEL_FIELDS)).where(t.status == RequestStatus.FAILED)
    if tier:
        q = q.where(t.tier_requested == tier)
    if since:
        q = q.where(t.finished_at >= since)
    if reason:
        q = q.where(t.failure_reason == reason)
    if ids:
        q = q.where(t.id.in_(ids))
    q = q.order_by(t.finished_at.desc()).limit(limit)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def resubmission(row: dict) -> dict:
    """The fields of a new request repeating a failed one: its prompt, conversation and options as
    they were stored (the role's defaults of the time included), on the tier it asked for."""
    spec = {"role": row["role"], "priority": row["priority"], "tenant": row["tenant"], "tier": row["tier_requested"]}
    if row["prompt"] is not None:
        spec["prompt"] = row["prompt"]
    spec.update((f, row[f]) for f in MODEL_FIELDS if row.get(f) is not None)
    return spec


def _filters(f):
    f = click.option("--tier", type=click.Choice(TIERS), default=None, help="Tier requested.")(f)
    f = click.option("--since", default=None, help="Failed since: 30m, 2h, 1d or an ISO time.")(f)
    f = click.option("--reason", default=None, help="Failure reason code, e.g. rate_limited, circuit_open, poison.")(f)
    f = click.option("--limit", type=int, default=100, show_default=True)(f)
    return f


@click.group("dead-letter")
def dead_letter() -> None:
    """Failed requests: list them, re-submit them."""


@dead_letter.command("list")
@_filters
@click.option("--json", "as_json", is_flag=True)
def list_cmd(tier: str | None, since: str | None, reason: str | None, limit: int, as_json: bool) -> None:
    """List failed requests with their reasons, newest first."""
    from config.settings import get_settings
    from tars_tasks.db.engine import get_engine
    from tars_tasks.embedded import ensure_schema

    settings = get_settings()
    ensure_schema(settings)
    rows = failed_requests(engine=get_engine(settings.database_url), tier=tier, since=parse_since(since),
                           reason=reason, limit=limit)
    if as_json:
        for r in rows:
            for text in ("prompt", "system", "messages"):
                r.pop(text, None)
            for k, v in r.items():
                if isinstance(v, datetime):
                    r[k] = v.isoformat()
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no failed requests match")
        return
    for r in rows:
        when = r["finished_at"].isoformat(timespec="seconds") if r["finished_at"] else "-"
        click.echo(f"{r['id']}  {when}  tier={r['tier_requested']}  attempts={r['attempts']}  {r['error']}")


@dead_letter.command("resubmit")
@click.argument("request_ids", nargs=-1)
@_filters
@click.option("--all-matching", is_flag=True, help="Re-submit every failed request the filters match.")
def resubmit_cmd(request_ids: tuple[str, ...], tier: str | None, since: str | None, reason: str | None, limit: int,
                 all_matching: bool) -> None:
    """Re-submit failed requests as new requests; prints OLD_ID -> NEW_ID for each.

    On the embedded default (no broker) the new requests run in this process, and the command
    returns when they have finished (OLD_ID -> NEW_ID STATUS)."""
    from config.settings import get_settings
    from tars_tasks.client import TarsClient
    from tars_tasks.db.engine import get_engine
    from tars_tasks.embedded import ensure_schema, run_in_process

    if not request_ids and not all_matching:
        raise click.UsageError("name request ids, or use --all-matching with filters")
    settings = get_settings()
    ensure_schema(settings)
    rows = failed_requests(engine=get_engine(settings.database_url), tier=tier, since=parse_since(since),
                           reason=reason, ids=request_ids, limit=limit)
    missing = set(request_ids) - {r["id"] for r in rows}
    for rid in sorted(missing):
        click.echo(f"{rid}: not a failed request; skipped", err=True)
    if not rows:
        click.echo("nothing to re-submit")
        return
    specs = [resubmission(r) for r in rows]
    if settings.embedded:
        handles, results = run_in_process(specs, timeout_s=RESUBMIT_TIMEOUT_S, settings=settings)
        for r, h, res in zip(rows, handles, results, strict=True):
            click.echo(f"{r['id']} -> {h.id} {res.status}")
        return
    with TarsClient() as client:
        handles = client.submit_many(specs)
        for r, h in zip(rows, handles, strict=True):
            click.echo(f"{r['id']} -> {h.id}")
