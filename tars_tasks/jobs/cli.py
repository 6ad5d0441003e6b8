"""``tars job submit | status | result | cancel``."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click

from tars_tasks.errors import ConfigurationError, InvalidRequest


def _client():
    from tars_tasks.cli import _ready
    from tars_tasks.client import TarsClient

    settings = _ready()
    if settings.embedded:
        raise ConfigurationError("jobs need a fleet (their steps are scheduled by workers): set TARS_BROKER_URL "
                                 "and TARS_DATABASE_URL (README, 'A real fleet')")
    return TarsClient(settings=settings)


def _template(value: str) -> str | dict[str, Any]:
    """A template name, or a TOML file holding one template (``[templates.NAME]`` or the bare table)."""
    if not value.endswith(".toml"):
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"--template {value}: {exc}", field="template") from None
    tables = data.get("templates")
    if isinstance(tables, dict) and len(tables) == 1:
        return next(iter(tables.values()))
    if tables is not None:
        raise InvalidRequest(f"--template {value}: holds {len(tables)} templates; give one, or its name",
                             field="template")
    return data


def _input(value: str) -> Any:
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text()
        except OSError as exc:
            raise InvalidRequest(f"--input {value}: {exc}", field="input") from None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidRequest(f"--input is not JSON: {exc}", field="input") from None


def job_dict(job, *, with_steps: bool = True) -> dict[str, Any]:
    path = job.critical_path()
    out = {"id": job.id, "template": job.template, "status": job.status, "tenant": job.tenant,
           "priority": job.priority, "failure_reason": job.failure_reason, "failed_step": job.failed_step,
           "error": job.error, "submitted_at": job.submitted_at.isoformat(),
           "finished_at": job.finished_at.isoformat() if job.finished_at else None, "latency_s": job.latency_s,
           "attempts": job.attempts, "tokens": job.tokens, "cost_usd": str(job.cost_usd),
           "cost_by_tier": {t: str(c) for t, c in job.cost_by_tier.items()},
           "critical_path": [s.label for s in path], "critical_path_s": round(job.critical_path_s(), 3),
           "step_latency_sum_s": round(job.step_latency_sum_s(), 3)}
    if with_steps:
        out["steps"] = [{"step": s.label, "request_id": s.request_id, "status": s.status,
                         "failure_reason": s.failure_reason, "tier": s.tier, "attempts": s.attempts,
                         "tokens": s.tokens, "cost_usd": str(s.cost_usd), "latency_s": s.latency_s,
                         "worker": s.worker} for s in job.steps]
    return out


@click.group()
def job() -> None:
    """Multi-agent jobs: templates of steps, each an ordinary request (docs/JOBS.md)."""


@job.command()
@click.option("--template", "template", required=True, help="A template name (config/jobs.toml) or a .toml file.")
@click.option("--input", "input_", required=True, help="The job's input as JSON, or @FILE.")
@click.option("--priority", default="normal", show_default=True, help="low / normal / high or 0..9.")
@click.option("--tenant", default="default", show_default=True)
@click.option("--idempotency-key", default=None)
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end and print its status.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
def submit(template, input_, priority, tenant, idempotency_key, wait, timeout) -> None:
    """Submit a job; prints its id (with --wait, its status as JSON)."""
    with _client() as client:
        handle = client.submit_job(template=_template(template), input=_input(input_), priority=priority,
                                   tenant=tenant, idempotency_key=idempotency_key)
        if not wait:
            click.echo(json.dumps({"id": handle.id, "created": handle.created}))
            return
        click.echo(json.dumps(job_dict(handle.wait(timeout=timeout)), indent=2))


@job.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, as_json: bool) -> None:
    """A job step by step: state, tier, attempts, tokens, cost, latency; its critical path and totals."""
    with _client() as client:
        j = client.get_job(job_id)
    if as_json:
        click.echo(json.dumps(job_dict(j), indent=2))
        return
    from rich.table import Table

    from loadgen.progress import make_console

    console = make_console()
    latency = "-" if j.latency_s is None else f"{j.latency_s:.2f}s"
    console.print(f"job {j.id} ({j.template}): {j.status}" + (f" — {j.failure_reason}: {j.error}" if j.error else ""))
    t = Table(title=f"steps (end to end {latency})")
    for col in ("step", "state", "tier", "attempts", "tokens", "cost", "latency"):
        t.add_column(col, justify="left" if col in ("step", "state", "tier") else "right")
    for s in j.steps:
        state = s.status if not s.failure_reason else f"{s.status} ({s.failure_reason})"
        t.add_row(s.label, state, s.tier or "-", str(s.attempts), f"{s.tokens:,}", f"${s.cost_usd:.6f}",
                  "-" if s.latency_s is None else f"{s.latency_s:.2f}s")
    console.print(t)
    console.print(f"critical path: {' → '.join(s.label for s in j.critical_path()) or '-'} "
                  f"({j.critical_path_s():.2f}s; all steps together {j.step_latency_sum_s():.2f}s)")
    console.print(f"total: {j.attempts} API call(s), {j.total_tokens:,} tokens, ${j.cost_usd:.6f} "
                  + "(" + ", ".join(f"{k} ${v:.6f}" for k, v in sorted(j.cost_by_tier.items())) + ")")


@job.command()
@click.argument("job_id")
def result(job_id: str) -> None:
    """Print a job's result (the output step's answer) and status as JSON."""
    with _client() as client:
        j = client.get_job(job_id)
    click.echo(json.dumps({**job_dict(j, with_steps=False), "result": j.result}, indent=2))


@job.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: queued steps are not run; what running steps spend is still recorded."""
    with _client() as client:
        j = client.cancel_job(job_id)
    click.echo(json.dumps(job_dict(j, with_steps=False), indent=2))
