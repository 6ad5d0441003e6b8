"""``tars metrics``: the project's Prometheus endpoint (``serve``) and a one-off reading (``show``)."""

from __future__ import annotations

import signal
import threading

import click

from tars_tasks.errors import ConfigurationError
from tars_tasks.topology import METRICS_PORT


@click.group("metrics")
def metrics() -> None:
    """Prometheus metrics of the fleet: requests, cost, tokens, rate-limit waits, breakers, queues."""


def _settings():
    from config.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        raise ConfigurationError("metrics need the real fleet: set TARS_BROKER_URL and TARS_DATABASE_URL")
    return settings


@metrics.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=METRICS_PORT, show_default=True)
@click.option("--min-interval-s", type=float, default=2.0, show_default=True,
              help="Scrapes closer together than this share one reading of Postgres and Redis.")
def serve(host: str, port: int, min_interval_s: float) -> None:
    """Serve /metrics until SIGTERM or Ctrl-C."""
    from prometheus_client import start_http_server

    from tars_tasks.metrics import make_registry

    registry = make_registry(settings=_settings(), min_interval_s=min_interval_s)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    click.echo(f"tars metrics on http://{host}:{port}/metrics", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(5)


@metrics.command("show")
def show() -> None:
    """Print one reading in the Prometheus text format."""
    from tars_tasks.metrics import render

    click.echo(render(settings=_settings()), nl=False)
