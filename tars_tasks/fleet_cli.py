"""``tars fleet``: run the compose topology as local processes, inspect it, health-check it."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import click

from config.keys import TIERS
from tars_tasks import topology
from tars_tasks.errors import ConfigurationError


@click.group("fleet")
def fleet() -> None:
    """The whole fleet on this machine: workers per tier, Flower, metrics, the mock LLM server."""


def _tier_counts(default: int, overrides: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(TIERS, default)
    for item in overrides:
        tier, sep, n = item.partition("=")
        if not sep or tier not in TIERS or not n.isdigit():
            raise ConfigurationError(f"--tier-workers takes TIER=N with a tier of {', '.join(TIERS)}, not {item!r}")
        counts[tier] = int(n)
    return counts


def _check_flower_credentials(insecure: bool) -> None:
    from tars_tasks.flower_cli import FlowerSettings, basic_auth_value

    if insecure:
        return
    fs = FlowerSettings()
    basic_auth_value(user=fs.user, password=fs.password.get_secret_value() if fs.password else None)


def _secret_values(*, flower_password: bool = True, service_passwords: bool = True) -> dict[str, str | None]:
    """The passwords a fleet starts with: the URLs' (settings, so ``.env`` too), Flower's and, for
    compose, the Redis and Postgres services' own (``POSTGRES_PASSWORD``, ``REDIS_PASSWORD``)."""
    from config.settings import get_settings
    from tars_tasks.default_passwords import PASSWORD_VARIABLES
    from tars_tasks.flower_cli import FlowerSettings

    settings = get_settings()
    values: dict[str, str | None] = {"TARS_BROKER_URL": settings.broker_url,
                                     "TARS_DATABASE_URL": settings.database_url,
                                     "TARS_REDIS_URL": settings.redis_url}
    if service_passwords:
        values.update({name: os.environ.get(name) for name in PASSWORD_VARIABLES})
    fs = FlowerSettings()
    values["TARS_FLOWER_PASSWORD"] = fs.password.get_secret_value() if fs.password and flower_password else None
    return values


@fleet.command("check-secrets")
def check_secrets() -> None:
    """Exit 2 if a password is still a .env.example placeholder (change-me...); compose runs it first."""
    from tars_tasks.default_passwords import refuse_placeholders

    refuse_placeholders(_secret_values())
    click.echo("no placeholder passwords", err=True)


@fleet.command("up")
@click.option("--workers", "-w", type=int, default=1, show_default=True, help="Worker processes per tier.")
@click.option("--tier-workers", multiple=True, metavar="TIER=N", help="Worker count of one tier (repeatable).")
@click.option("--concurrency", "-c", type=int, default=None, help="Tasks in flight per worker (default setting).")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=int, default=topology.FLOWER_PORT, show_default=True)
@click.option("--flower-insecure-no-auth", is_flag=True, help="Start Flower without basic auth.")
@click.option("--mock-llm/--no-mock-llm", default=None, help="The mock LLM server (default: when installed).")
@click.option("--mock-llm-port", type=int, default=topology.MOCK_LLM_PORT, show_default=True)
@click.option("--route-to-mock-llm", is_flag=True,
              help="Send every model call to the mock server (as compose.mock-llm.yml does).")
@click.option("--metrics/--no-metrics", default=True, show_default=True, help="`tars metrics serve`.")
@click.option("--metrics-port", type=int, default=topology.METRICS_PORT, show_default=True)
@click.option("--batch-runner/--no-batch-runner", default=True, show_default=True,
              help="`tars batch-runner`: the providers' batch lane (requests with lane='batch').")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP services listen on.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="fleet.json and logs/ (default TARS_FLEET_DIR, else ~/.local/state/tars/fleet).")
@click.option("--ready-timeout-s", type=float, default=90.0, show_default=True)
@click.option("--stop-timeout-s", type=float, default=60.0, show_default=True,
              help="Warm-shutdown grace per worker before SIGKILL.")
@click.option("--keep-going", is_flag=True, help="Keep the rest running when one process exits.")
def up(workers: int, tier_workers: tuple[str, ...], concurrency: int | None, flower: bool, flower_port: int,
       flower_insecure_no_auth: bool, mock_llm: bool | None, mock_llm_port: int, route_to_mock_llm: bool,
       metrics: bool, metrics_port: int, batch_runner: bool, host: str, state_dir: Path | None, ready_timeout_s: float,
       stop_timeout_s: float, keep_going: bool) -> None:
    """Start the fleet in the foreground; Ctrl-C (or SIGTERM, or `tars fleet down`) stops it cleanly."""
    from config.settings import get_settings
    from tars_tasks.default_passwords import refuse_placeholders
    from tars_tasks.fleet import FleetError, LocalFleet, default_state_dir, plan_fleet

    if get_settings().embedded:
        raise ConfigurationError("a fleet needs a real broker and database: set TARS_BROKER_URL and TARS_DATABASE_URL")
    refuse_placeholders(_secret_values(flower_password=flower and not flower_insecure_no_auth, service_passwords=False))
    if flower:
        _check_flower_credentials(flower_insecure_no_auth)
    if route_to_mock_llm:
        if mock_llm is False:
            raise ConfigurationError("--route-to-mock-llm needs the mock server: drop --no-mock-llm")
        mock_llm = True
    specs = plan_fleet(
        workers=_tier_counts(workers, tier_workers), concurrency=concurrency, flower=flower,
        flower_port=flower_port, flower_insecure_no_auth=flower_insecure_no_auth, mock_llm=mock_llm,
        mock_llm_port=mock_llm_port, metrics=metrics, metrics_port=metrics_port, batch_runner=batch_runner, host=host,
        worker_stop_timeout_s=stop_timeout_s,
    )
    state_dir = state_dir or default_state_dir()

    def echo(msg: str) -> None:
        click.echo(f"fleet: {msg}", err=True)

    env: dict[str, str] = {}
    if route_to_mock_llm:
        loopback = "127.0.0.1" if host in ("0.0.0.0", "") else host
        env.update(topology.mock_route_env(base_url=f"http://{loopback}:{mock_llm_port}",
                                           api_key=os.environ.get("ANTHROPIC_API_KEY")
                                           or topology.MOCK_LLM_DEFAULT_KEY))
    if flower and not os.environ.get("TARS_FLOWER_DB"):
        env["TARS_FLOWER_DB"] = str(Path(state_dir) / "flower" / "flower.db")  # this fleet's Flower history
    fl = LocalFleet(specs=specs, state_dir=state_dir, env=env, echo=echo)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM while starting stops what was started
    fl.start()
    try:
        fl.wait_ready(timeout_s=ready_timeout_s)
    except FleetError:
        fl.stop()
        raise
    except KeyboardInterrupt:
        fl.stop()
        sys.exit(130)
    lines = [f"  {fp.spec.name:<12} pid {fp.pid:<8} log {fp.log_path}" for fp in fl.processes]
    echo("ready (Ctrl-C stops)\n" + "\n".join(lines))
    if flower:
        echo(f"Flower: http://{host}:{flower_port}/")
    if metrics:
        echo(f"metrics: http://{host}:{metrics_port}/metrics")
    sys.exit(fl.run_until_signalled(keep_going=keep_going))


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@fleet.command("down")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
def down(state_dir: Path | None) -> None:
    """Ask the running `tars fleet up` to stop (as Ctrl-C would) and wait for it."""
    import time

    from tars_tasks.fleet import pid_alive, signal_runner

    pid = signal_runner(state_dir=state_dir)
    click.echo(f"asked fleet runner {pid} to stop", err=True)
    while pid_alive(pid):
        time.sleep(0.2)


@fleet.command("status")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def status(state_dir: Path | None, as_json: bool) -> None:
    """The local fleet's processes, plus queue depths, workers per tier and requests by status."""
    from config.settings import get_settings
    from tars_tasks.fleet import default_state_dir, pid_alive, read_state

    state = read_state(state_dir)
    procs = []
    if state is not None:
        procs = [{"name": p["name"], "service": p["service"], "tier": p["tier"], "pid": p["pid"],
                  "alive": pid_alive(p["pid"]), "log": p["log"]} for p in state.processes]
    out: dict = {"state_dir": str(state_dir or default_state_dir()),
                 "runner_pid": state.runner_pid if state else None,
                 "runner_alive": bool(state and state.runner_alive()), "processes": procs}
    settings = get_settings()
    if not settings.embedded:
        from tars_tasks.celery_app import app
        from tars_tasks.status import fleet_status

        try:
            out["fleet"] = fleet_status(settings, app).as_dict()
            from tars_tasks.metrics import breaker_views

            out["fleet"]["breakers"] = {f"{v.provider}:{v.model}": v.describe() for v in breaker_views(settings)}
        except Exception as exc:  # status must work while parts are down
            out["fleet_error"] = str(exc)
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    if not procs:
        click.echo(f"no local fleet running from {out['state_dir']}")
    else:
        click.echo(f"fleet runner pid {out['runner_pid']} ({'alive' if out['runner_alive'] else 'gone'})")
        for p in procs:
            click.echo(f"  {p['name']:<12} pid {p['pid']:<8} {'up' if p['alive'] else 'DOWN':<5} {p['log']}")
    fl = out.get("fleet")
    if fl:
        for tier in TIERS:
            depth = sum(fl["queue_depth"].get(tier, {}).values())
            nodes = ", ".join(fl["workers"].get(tier, [])) or "-"
            click.echo(f"  {tier:<7} queued {depth:<7} workers {nodes}")
        click.echo("  requests: " + (", ".join(f"{k}={v}" for k, v in sorted(fl["requests"].items())) or "none"))
        for model, state in sorted(fl.get("breakers", {}).items()):
            click.echo(f"  breaker {model}: {state}")
    elif "fleet_error" in out:
        click.echo(f"  fleet unreachable: {out['fleet_error']}")


# --- health checks (compose healthcheck commands) ---------------------------------------------


@fleet.group("healthcheck")
def healthcheck() -> None:
    """Exit 0 when a service is healthy (used by the compose healthchecks)."""


def worker_node_name(tier: str, *, hostname: str | None = None) -> str:
    """The node name `tars worker --tier TIER` takes on this host (from workers.start)."""
    from celery.utils.nodenames import host_format

    from workers.start import worker_argv

    argv = worker_argv(tiers=[tier])
    return host_format(argv[argv.index("-n") + 1], host=hostname or socket.gethostname())


@healthcheck.command("worker")
@click.option("--tier", type=click.Choice(TIERS), required=True)
@click.option("--node", default=None, help="Node name to ping (default: this host's worker of the tier).")
@click.option("--timeout-s", type=float, default=5.0, show_default=True)
def healthcheck_worker(tier: str, node: str | None, timeout_s: float) -> None:
    """Ask this host's worker of a tier for its health over the broker: it must answer, and its
    group-commit writer must not have been failing for longer than TARS_WRITER_STALL_UNHEALTHY_S."""
    from tars_tasks.celery_app import app

    node = node or worker_node_name(tier)
    try:
        replies = app.control.broadcast("tars_health", destination=[node], reply=True, timeout=timeout_s) or []
    except Exception as exc:
        click.echo(f"unhealthy: broker unreachable: {exc}", err=True)
        sys.exit(1)
    answer = next((r[node] for r in replies if node in r), None)
    if answer is None:
        click.echo(f"unhealthy: {node} did not answer within {timeout_s}s", err=True)
        sys.exit(1)
    writer = answer.get("writer") or {}
    if not answer.get("healthy", True):
        click.echo(f"unhealthy: {node}: results not durable for {writer.get('stalled_for_s')}s "
                   f"({writer.get('pending')} waiting): {writer.get('last_error')}", err=True)
        sys.exit(1)
    click.echo(f"{node}: healthy")


@healthcheck.command("batch-runner")
def healthcheck_batch_runner() -> None:
    """Healthy when a batch runner on this host looped recently (its heartbeat in the fleet's Redis)."""
    from config.keys import batch_runner_heartbeat_key
    from config.settings import get_settings
    from tars_tasks.redis_client import get_redis

    settings = get_settings()
    host = socket.gethostname()
    if settings.shared_redis_url is None:
        click.echo("unhealthy: no Redis to read the batch runner's heartbeat from (TARS_BROKER_URL)", err=True)
        sys.exit(1)
    try:
        name = get_redis(settings.shared_redis_url).get(batch_runner_heartbeat_key(settings.namespace, host))
    except Exception as exc:
        click.echo(f"unhealthy: Redis unreachable: {exc}", err=True)
        sys.exit(1)
    if name is None:
        click.echo(f"unhealthy: no batch runner on {host} looped recently", err=True)
        sys.exit(1)
    click.echo(f"{name.decode() if isinstance(name, bytes) else name}: healthy")


@healthcheck.command("http")
@click.argument("url")
@click.option("--timeout-s", type=float, default=3.0, show_default=True)
def healthcheck_http(url: str, timeout_s: float) -> None:
    """GET URL; healthy on a 2xx answer."""
    from tars_tasks.fleet import http_ok

    if not http_ok(url, timeout_s=timeout_s):
        click.echo(f"unhealthy: {url}", err=True)
        sys.exit(1)


@healthcheck.command("tcp")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, required=True)
def healthcheck_tcp(host: str, port: int) -> None:
    """Healthy when HOST:PORT accepts a connection."""
    from tars_tasks.fleet import tcp_open

    if not tcp_open(host, port):
        click.echo(f"unhealthy: nothing listens on {host}:{port}", err=True)
        sys.exit(1)
