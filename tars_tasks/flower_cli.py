"""``tars flower``: Flower on the project's Celery app, with basic auth on by default.

What Flower 2.2 (the pinned version) does, read from its source:

* ``--basic_auth=user:password`` (or ``FLOWER_BASIC_AUTH``) guards the dashboard and the
  ``/api/*`` endpoints; a request without the right credentials gets ``401`` with
  ``WWW-Authenticate: Basic``. Credentials are handed to Flower through ``FLOWER_BASIC_AUTH``
  in its environment, never on the command line where ``ps`` would show them.
* ``/metrics`` (Prometheus) and ``/healthcheck`` are **not** behind auth — scrapers and
  health probes reach them without credentials. Only publish Flower's port where that is fine.
* ``--persistent=True --db=PATH`` keeps the task/worker history in a ``shelve`` file,
  saved on shutdown and every ``--state_save_interval`` ms; without it history is memory only.
* ``--enable_events`` (default on) makes Flower periodically *switch task events on* in every
  worker; we pass ``TARS_TASK_EVENTS`` through so Flower does not override an operator who
  turned them off (then Flower sees workers, from heartbeats, but no tasks).

Flower is a web server that anyone who reaches its port talks to, so it gets only what it needs
(:func:`flower_env`): the broker settings of the project's Celery app, its own ``FLOWER_*``
options and credentials, and the process basics (``PATH``, ``HOME``, locale, ``PYTHON*``).
Provider API keys, the database URL and anything else of the parent's environment stay behind.
A password starting with ``change-me`` (the ``.env.example`` placeholders) is refused.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import click
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tars_tasks.errors import ConfigurationError
from tars_tasks.topology import FLOWER_PORT

#: How often Flower saves its state in persistent mode.
DEFAULT_STATE_SAVE_INTERVAL_S = 60
#: Workers offline this long leave the dashboard and /metrics. Compose replicas are named after
#: their container, so without a purge every replica ever scaled away stays listed (and, in
#: persistent mode, survives Flower restarts).
DEFAULT_PURGE_OFFLINE_WORKERS_S = 3600


class FlowerSettings(BaseSettings):
    """``TARS_FLOWER_*`` variables (or ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="TARS_FLOWER_", env_file=".env", extra="ignore")

    user: str | None = None
    password: SecretStr | None = None
    #: Persistent-mode database file (``shelve``); default under the user's state directory.
    db: Path | None = None


def default_db_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tars" / "flower" / "flower.db"


def basic_auth_value(*, user: str | None, password: str | None) -> str:
    """``user:password`` for Flower, or :class:`ConfigurationError` naming what is wrong."""
    if not user or not password:
        missing = [n for n, v in (("TARS_FLOWER_USER", user), ("TARS_FLOWER_PASSWORD", password)) if not v]
        raise ConfigurationError(
            f"Flower needs basic-auth credentials: set {' and '.join(missing)} "
            "(or pass --insecure-no-auth for a dashboard on this machine only)"
        )
    if ":" in user or "," in user:
        raise ConfigurationError("TARS_FLOWER_USER must not contain ':' or ','")
    if "," in password:
        raise ConfigurationError("TARS_FLOWER_PASSWORD must not contain ',' (Flower splits the list on it)")
    return f"{user}:{password}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def flower_argv(
    *,
    host: str,
    port: int,
    persistent: bool,
    db_path: Path | None,
    state_save_interval_s: int = DEFAULT_STATE_SAVE_INTERVAL_S,
    enable_events: bool = True,
    purge_offline_workers_s: int | None = DEFAULT_PURGE_OFFLINE_WORKERS_S,
    url_prefix: str | None = None,
    python: str | None = None,
) -> list[str]:
    """``python -m celery -A tars_tasks flower ...`` (credentials go in the environment)."""
    argv = [
        python or sys.executable, "-m", "celery", "-A", "tars_tasks", "flower",
        f"--address={host}", f"--port={port}",
        f"--enable_events={enable_events}",
    ]
    if persistent:
        if db_path is None:
            raise ConfigurationError("persistent mode needs a database path (--db or TARS_FLOWER_DB)")
        argv += ["--persistent=True", f"--db={db_path}", f"--state_save_interval={state_save_interval_s * 1000}"]
    if purge_offline_workers_s:
        argv.append(f"--purge_offline_workers={purge_offline_workers_s}")
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    return argv


#: Process basics Flower keeps from its parent's environment.
FLOWER_ENV_BASICS = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "TMPDIR", "LANG", "LANGUAGE",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
    "PYTHONUTF8", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR",
)
#: Prefixes kept too: the locale (``LC_*``) and Flower's own options (``FLOWER_*``).
FLOWER_ENV_PREFIXES = ("LC_", "FLOWER_")
#: The settings (``TARS_`` + upper case) that shape the Celery app Flower runs on: the broker,
#: its transport options (visibility timeout, connection bounds) and task events. Not the
#: database, not the fleet-state Redis, not the providers.
FLOWER_SETTINGS = (
    "broker_url", "namespace", "task_events", "worker_prefetch_multiplier", "visibility_timeout_s",
    "unacked_restore_interval_s", "redis_socket_connect_timeout_s", "redis_socket_timeout_s",
    "redis_health_check_interval_s", "tcp_keepalive_idle_s", "tcp_keepalive_interval_s", "tcp_keepalive_count",
    "tcp_user_timeout_s",
)
#: What ``tars flower`` itself reads; ``tars fleet up`` hands these to it, Flower never sees them.
FLOWER_CLI_VARIABLES = ("TARS_FLOWER_USER", "TARS_FLOWER_PASSWORD", "TARS_FLOWER_DB", "XDG_STATE_HOME")


def _kept(name: str) -> bool:
    return (name in FLOWER_ENV_BASICS or name.startswith(FLOWER_ENV_PREFIXES)
            or name in {f"TARS_{s.upper()}" for s in FLOWER_SETTINGS})


def flower_env(*, base: dict[str, str], basic_auth: str | None) -> dict[str, str]:
    """The environment of the Flower process: the allow-list of ``base``, plus the credentials."""
    env = {k: v for k, v in base.items() if _kept(k)}
    env.pop("FLOWER_BASIC_AUTH", None)  # the credentials are ours (or none, with --insecure-no-auth)
    if basic_auth is not None:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    return env


def flower_launcher_env(base: dict[str, str]) -> dict[str, str]:
    """The environment ``tars fleet up`` starts ``tars flower`` with: Flower's, plus what the command reads."""
    env = flower_env(base=base, basic_auth=None)
    env.update({k: base[k] for k in FLOWER_CLI_VARIABLES if k in base})
    return env


@click.command("flower")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=FLOWER_PORT, show_default=True)
@click.option("--insecure-no-auth", is_flag=True,
              help="Start without basic auth (local use only): anyone who reaches the port controls the workers.")
@click.option("--persistent/--no-persistent", default=True, show_default=True,
              help="Keep Flower's history in a file across restarts.")
@click.option("--db", "db_path", type=click.Path(path_type=Path), default=None,
              help="Persistent-mode file (default TARS_FLOWER_DB, else ~/.local/state/tars/flower/flower.db).")
@click.option("--state-save-interval-s", type=int, default=DEFAULT_STATE_SAVE_INTERVAL_S, show_default=True)
@click.option("--purge-offline-workers-s", type=int, default=DEFAULT_PURGE_OFFLINE_WORKERS_S, show_default=True,
              help="Drop workers offline this long from the dashboard (0 keeps them forever).")
@click.option("--url-prefix", default=None, help="Serve under a path prefix (behind a reverse proxy).")
def flower(host: str, port: int, insecure_no_auth: bool, persistent: bool, db_path: Path | None,
           state_save_interval_s: int, purge_offline_workers_s: int, url_prefix: str | None) -> None:
    """Flower, the Celery dashboard, on the fleet's broker (basic auth from TARS_FLOWER_USER/PASSWORD)."""
    from config.settings import get_settings
    from tars_tasks.default_passwords import refuse_placeholders

    fs = FlowerSettings()
    settings = get_settings()
    if settings.embedded:
        raise ConfigurationError("Flower needs a real broker: set TARS_BROKER_URL (the embedded fleet has none)")
    password = fs.password.get_secret_value() if fs.password else None
    refuse_placeholders({"TARS_BROKER_URL": settings.broker_url,
                         **({} if insecure_no_auth else {"TARS_FLOWER_PASSWORD": password})})
    if insecure_no_auth:
        basic_auth = None
        click.echo("warning: Flower runs WITHOUT authentication (--insecure-no-auth)", err=True)
        if not is_loopback(host):
            click.echo(f"warning: and it listens on {host}, not only on this machine", err=True)
    else:
        basic_auth = basic_auth_value(user=fs.user, password=password)
    db = db_path or fs.db or default_db_path()
    if persistent:
        db.parent.mkdir(parents=True, exist_ok=True)
    argv = flower_argv(host=host, port=port, persistent=persistent, db_path=db,
                       state_save_interval_s=state_save_interval_s, enable_events=settings.task_events,
                       purge_offline_workers_s=purge_offline_workers_s, url_prefix=url_prefix)
    env = flower_env(base=dict(os.environ), basic_auth=basic_auth)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
