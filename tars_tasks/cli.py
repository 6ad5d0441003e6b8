"""The ``tars`` command line. A user's or the environment's mistake (bad input, Redis or Postgres
down, no schema, text that is not UTF-8) prints one clear line and exits 2, never a traceback
(see :mod:`tars_tasks.cli_errors`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click

from config.keys import TIERS
from tars_tasks.cli_errors import EXIT_USAGE, check_argv, message_for, read_stdin_text
from tars_tasks.errors import ConfigurationError, TarsError


def _loadgen() -> click.Command:
    from loadgen.cli import loadgen

    return loadgen


def _fleet() -> click.Command:
    from tars_tasks.fleet_cli import fleet

    return fleet


def _mock_llm() -> click.Command:
    from loadgen.mock_llm.cli import mock_llm

    return mock_llm


def _metrics() -> click.Command:
    from tars_tasks.metrics_cli import metrics

    return metrics


def _budget() -> click.Command:
    from tars_tasks.budget_cli import budget

    return budget


def _dead_letter() -> click.Command:
    from tars_tasks.dead_letter_cli import dead_letter

    return dead_letter


def _flower() -> click.Command:
    from tars_tasks.flower_cli import flower

    return flower


def _job() -> click.Command:
    from tars_tasks.jobs.cli import job

    return job


#: Sub-command groups that live with their domain, each loaded by a plain import when it is
#: asked for (``tars --help`` lists them all; ``tars status`` imports none of them). The imports
#: are real ``from ... import`` statements, so the layering contract sees them, and an
#: ImportError is a bug that surfaces — a command never silently disappears.
COMMAND_GROUPS: dict[str, Callable[[], click.Command]] = {
    "budget": _budget,
    "dead-letter": _dead_letter,
    "fleet": _fleet,
    "flower": _flower,
    "job": _job,
    "loadgen": _loadgen,
    "metrics": _metrics,
    "mock-llm": _mock_llm,
}


class TarsGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMAND_GROUPS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in COMMAND_GROUPS:
            cmd = COMMAND_GROUPS[name]()
        return cmd

    def main(self, args=None, *a, **kw):
        try:
            check_argv(list(args) if args is not None else sys.argv[1:])
        except TarsError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        return super().main(args, *a, **kw)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            msg = message_for(exc)
            if msg is None:
                raise
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USAGE)


def _settings():
    from config.settings import get_settings

    return get_settings()


def _ready(settings=None):
    """Settings, with a database the command can use (see :func:`tars_tasks.embedded.ensure_schema`)."""
    from tars_tasks.embedded import ensure_schema

    settings = settings or _settings()
    ensure_schema(settings)
    return settings


@click.group(cls=TarsGroup)
def main() -> None:
    """TARS fleet: LLM agent work on a Celery worker fleet."""


# --- db ------------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema."""
    import migrations
    from config.settings import get_settings
    from tars_tasks.db.engine import get_engine
    from tars_tasks.embedded import database_path

    settings = get_settings()
    url = settings.database_url
    migrations.upgrade(url, revision)
    click.echo(f"database {database_path(settings)} at revision {migrations.current(get_engine(url))}")


@db.command("current")
def db_current() -> None:
    import migrations
    from config.settings import get_settings
    from tars_tasks.db.engine import get_engine

    click.echo(migrations.current(get_engine(get_settings().database_url)) or "(empty)")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    import migrations
    from config.settings import get_settings

    migrations.downgrade(get_settings().database_url, revision)


# --- worker --------------------------------------------------------------------------------------


@main.command()
@click.option("--tier", "tiers", type=click.Choice(TIERS), multiple=True, required=True,
              help="Tier(s) whose queue this pool consumes; repeat for several.")
@click.option("--concurrency", "-c", type=int, default=None, help="Tasks in flight (default TARS_WORKER_CONCURRENCY).")
@click.option("--pool", "-P", default=None, help="Celery pool (default gevent).")
@click.option("--name", "-n", default=None, help="Celery node name (default TIER.%i@%h).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(tiers: tuple[str, ...], concurrency: int | None, pool: str | None, name: str | None,
           loglevel: str) -> None:
    """Start a sub-agent pool: a Celery worker on the tier's queue."""
    from tars_tasks.embedded import NO_BROKER
    from workers.start import exec_worker

    if _settings().embedded:
        raise ConfigurationError(f"tars worker refused: {NO_BROKER}")

    exec_worker(tiers=list(tiers), concurrency=concurrency, pool=pool, name=name, loglevel=loglevel)


@main.command("batch-runner")
@click.option("--once", is_flag=True, help="One tick (form, submit, poll), then exit.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def batch_runner(once: bool, loglevel: str) -> None:
    """Run the providers' batch lane: gather batch-lane requests into provider batches, submit, poll,
    record the results (docs/COST_CONTROLS.md, "Batch lane"). Several may run; one acts at a time."""
    import logging

    from config.catalog import load_catalog
    from tars_tasks.db.engine import get_engine
    from tars_tasks.embedded import NO_BROKER
    from workers.batchlane.runner import BatchRunner

    settings = _settings()
    if settings.embedded:
        raise ConfigurationError(f"tars batch-runner refused: {NO_BROKER}")
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = BatchRunner(settings=settings, catalog=load_catalog(settings.catalog_path),
                         engine=get_engine(settings.database_url))
    try:
        if once:
            click.echo(json.dumps(runner.tick()))
        else:
            import signal
            import threading

            stop = threading.Event()  # SIGTERM/SIGINT: finish the tick in hand, release the lock, exit 0
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            click.echo("batch runner started", err=True)
            runner.run(stop=stop)
    finally:
        runner.close()


# --- producer ------------------------------------------------------------------------------------


def _result_dict(r) -> dict:
    d = {k: getattr(r, k) for k in r.__dataclass_fields__}
    for k, v in d.items():
        if hasattr(v, "isoformat"):
            d[k] = v.isoformat()
        elif k in ("cost_usd", "saved_usd"):
            d[k] = None if v is None else format(v, "f")  # str(Decimal) prints a zero as "0E-9"
    return d


def _model_fields(*, system, messages, max_tokens, temperature, stop, response_format, metadata) -> dict:
    """``tars submit``'s model-request options as ``submit``'s fields (validated there, like the rest)."""
    from tars_tasks.errors import InvalidRequest

    fields: dict = {"system": system, "max_tokens": max_tokens, "temperature": temperature,
                    "stop": list(stop) or None, "response_format": response_format}
    if messages is not None:
        try:
            fields["messages"] = json.loads(messages)
        except ValueError as exc:
            raise InvalidRequest(f"messages: --messages is not JSON ({exc.msg} at character {exc.pos})",
                                 field="messages") from None
    if metadata:
        pairs = {}
        for item in metadata:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidRequest("metadata: --metadata takes KEY=VALUE", field="metadata")
            pairs[key] = value
        fields["metadata"] = pairs
    return {k: v for k, v in fields.items() if v is not None}


@main.command()
@click.option("--role", required=True)
@click.option("--prompt", default=None, help="The prompt (the last user turn); '-' reads it from standard input.")
@click.option("--system", default=None, help="The system prompt (default: the role's; '' for none).")
@click.option("--messages", default=None, help='Earlier turns as JSON: [{"role": "user", "content": "..."}, ...].')
@click.option("--max-tokens", type=int, default=None, help="The output limit (default: the role's).")
@click.option("--temperature", type=float, default=None)
@click.option("--stop", multiple=True, help="A stop sequence (repeatable).")
@click.option("--response-format", type=click.Choice(["text", "json"]), default=None)
@click.option("--metadata", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--priority", default="normal", show_default=True, help="low / normal / high or 0..9.")
@click.option("--tenant", default="default", show_default=True)
@click.option("--idempotency-key", default=None)
@click.option("--tier", type=click.Choice(TIERS), default=None, help="Override the role's tier.")
@click.option("--lane", type=click.Choice(["interactive", "batch"]), default=None,
              help="batch: sent through the provider's batch API at the batch price, answered within 24 h. "
                   "Default: interactive, or batch if --deadline is at least 24h.")
@click.option("--deadline", default=None,
              help="How long you accept to wait: 24h, 90m, 2d, 3600s or seconds. At least 24h (the providers' "
                   "batch window) takes the batch lane; shorter stays interactive.")
@click.option("--wait/--no-wait", default=False, help="Wait for the result.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
def submit(role, prompt, system, messages, max_tokens, temperature, stop, response_format, metadata, priority, tenant,
           idempotency_key, tier, lane, deadline, wait, timeout) -> None:
    """Submit one request; prints its id (and with --wait, its result as JSON).

    On the embedded default (no TARS_BROKER_URL) nothing else could ever run the request, so it
    runs here, in-process, and the command returns when it has finished."""
    from tars_tasks.client import TarsClient

    if prompt == "-":
        prompt = read_stdin_text(what="--prompt")
    model = _model_fields(system=system, messages=messages, max_tokens=max_tokens, temperature=temperature,
                          stop=stop, response_format=response_format, metadata=metadata)
    settings = _ready()
    spec = {"role": role, "priority": priority, "tenant": tenant, "idempotency_key": idempotency_key, "tier": tier,
            **({} if lane is None else {"lane": lane}), **({} if deadline is None else {"deadline": deadline}),
            **({} if prompt is None else {"prompt": prompt}), **model}
    if settings.embedded:
        from tars_tasks.embedded import database_path, run_in_process

        (handle,), (res,) = run_in_process([spec], timeout_s=timeout, settings=settings)
        click.echo(f"embedded default: ran in this process (no broker); stored in {database_path(settings)}",
                   err=True)
        if not wait:
            click.echo(json.dumps({"id": handle.id, "tier": handle.tier, "created": handle.created,
                                   "status": res.status}))
            return
        click.echo(json.dumps(_result_dict(res), indent=2))
        return
    with TarsClient() as client:
        handle = client.submit(**spec)
        if not wait:
            click.echo(json.dumps({"id": handle.id, "tier": handle.tier, "created": handle.created}))
            return
        click.echo(json.dumps(_result_dict(handle.wait(timeout=timeout)), indent=2))


@main.command()
@click.argument("request_id")
def result(request_id: str) -> None:
    """Print a request's current state as JSON."""
    from tars_tasks.client import TarsClient

    _ready()
    with TarsClient() as client:
        click.echo(json.dumps(_result_dict(client.get(request_id)), indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Queue depth per tier and priority, workers per tier, requests by status."""
    from tars_tasks.celery_app import app
    from tars_tasks.embedded import NO_BROKER, database_path
    from tars_tasks.status import fleet_status

    settings = _ready()
    st = fleet_status(settings, app)
    if as_json:
        click.echo(json.dumps({**st.as_dict(), "embedded": settings.embedded,
                               "database": database_path(settings)}, indent=2))
        return
    from rich.table import Table

    from loadgen.progress import make_console

    console = make_console()
    if settings.embedded:
        console.print(f"embedded default, database {database_path(settings)}: {NO_BROKER}")
    else:
        qt = Table(title="Queue depth (priority 9 is served first)")
        qt.add_column("tier")
        prios = sorted({p for d in st.queue_depth.values() for p in d}, reverse=True)
        for p in prios:
            qt.add_column(f"p{p}", justify="right")
        qt.add_column("total", justify="right")
        qt.add_column("staged", justify="right")
        qt.add_column("workers")
        for tier in TIERS:
            depth = st.queue_depth.get(tier, {})
            staged = sum(n for by_tenant in st.staged.get(tier, {}).values() for n in by_tenant.values())
            qt.add_row(tier, *[str(depth.get(p, 0)) for p in prios], str(sum(depth.values())), str(staged),
                       ", ".join(st.workers.get(tier, [])) or "-")
        console.print(qt)
        if any(st.staged.values()):
            stt = Table(title="Staged for dispatch (waiting where priority and tenant fairness apply)")
            for col in ("tier", "priority", "tenant", "staged"):
                stt.add_column(col, justify="right" if col == "staged" else "left")
            for tier in TIERS:
                for prio, by_tenant in sorted(st.staged.get(tier, {}).items(), reverse=True):
                    for tenant, n in sorted(by_tenant.items()):
                        stt.add_row(tier, str(prio), tenant, str(n))
            console.print(stt)
    if st.tenants:
        tt = Table(title="Tenants (fair-share weight; own RPM/TPM limits, 0 = none; * = every other tenant)")
        for col in ("tenant", "weight", "rpm", "tpm", "per tier"):
            tt.add_column(col, justify="left" if col in ("tenant", "per tier") else "right")
        for name, t in st.tenants.items():
            per_tier = ", ".join(f"{tier}: {lim['rpm']} rpm / {lim['tpm']} tpm" for tier, lim in t["tiers"].items())
            tt.add_row(name, f"{t['weight']:g}", str(t["rpm"]), str(t["tpm"]), per_tier or "-")
        console.print(tt)
    rt = Table(title="Requests")
    rt.add_column("status")
    rt.add_column("count", justify="right")
    for s, n in sorted(st.requests.items()):
        rt.add_row(s, str(n))
    console.print(rt)
    if st.breakers:
        bt = Table(title="Circuit breakers")
        bt.add_column("model")
        bt.add_column("state")
        for m, s in sorted(st.breakers.items()):
            bt.add_row(m, s)
        console.print(bt)
    if st.worker_health:
        wt = Table(title="Worker processes (live leases)")
        wt.add_column("worker")
        wt.add_column("results durable")
        wt.add_column("waiting to commit", justify="right")
        for owner, h in sorted(st.worker_health.items()):
            w = h.get("writer") or {}
            ok = ("yes" if w.get("healthy", True)
                  else f"NO, failing for {w.get('stalled_for_s')}s: {w.get('last_error')}")
            wt.add_row(owner, ok, str(w.get("pending", 0)))
        console.print(wt)
    if st.usage:
        from decimal import Decimal

        ut = Table(title="API calls by tier: tokens by billing class and cost")
        for col in ("tier", "attempts", "input", "cache writes 5m", "cache writes 1h", "cache reads", "output", "cost"):
            ut.add_column(col, justify="left" if col == "tier" else "right")
        for tier, u in st.usage.items():
            ut.add_row(tier, f"{u['attempts']:,}", f"{u['input_tokens']:,}", f"{u['cache_write_tokens']:,}",
                       f"{u['cache_write_1h_tokens']:,}", f"{u['cache_read_tokens']:,}", f"{u['output_tokens']:,}",
                       f"${Decimal(u['cost_usd']):.6f}")
        console.print(ut)
    batches = st.batches or {}
    if batches.get("in_flight") or batches.get("waiting"):
        bt2 = Table(title="Batch lane: provider batches in flight (waiting for a batch: "
                          + (", ".join(f"{t} {n:,}" for t, n in sorted(batches["waiting"].items())) or "none") + ")")
        for col in ("batch", "tier", "provider", "model", "state", "requests", "provider id", "provider status",
                    "polls", "age"):
            bt2.add_column(col)
        for b in batches.get("in_flight") or []:
            bt2.add_row(b["id"][:8], b["tier"], b["provider"], b["model"], b["state"], f"{b['requests']:,}",
                        b["provider_batch_id"] or "-", b["provider_status"] or "-", str(b["polls"]),
                        f"{b['age_s']:.0f}s")
        console.print(bt2)
    if st.fleet_mode:
        fm = st.fleet_mode
        sig = ", ".join(f"{k} {v:.2f}" for k, v in sorted((fm.get("signals") or {}).items()))
        console.print(f"Fleet mode: {fm['mode']} (transition {fm['transition']}; signals: {sig or 'none yet'})")
    if st.budgets:
        bt = Table(title="Budgets (USD; reserved = in flight, worst case)")
        for col in ("tenant", "period", "limit", "spent", "reserved", "used", "expired reservations"):
            bt.add_column(col, justify="left" if col in ("tenant", "period") else "right")
        for tenant, periods in sorted(st.budgets.items()):
            for p in periods:
                if p["limit_usd"] is None:
                    continue
                bt.add_row(tenant, p["period"], p["limit_usd"], p["spent_usd"], p["reserved_usd"],
                           f"{p['used']:.1%}", str(p["expired"]))
        console.print(bt)
    cache = st.cache or {}
    if cache.get("answered_by"):
        by = ", ".join(f"{k} {v:,}" for k, v in sorted(cache["answered_by"].items()))
        console.print(f"Answered by: {by}; the response cache saved ${float(cache['saved_usd']):.6f}")
    unknown = st.billed_unknown or {}
    if unknown.get("attempts"):
        console.print(f"Attempts billed, outcome unknown: {unknown['attempts']} "
                      f"(${unknown['cost_usd']:.6f} at the input price known when sent)")


if __name__ == "__main__":  # pragma: no cover
    main()
