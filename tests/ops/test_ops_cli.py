"""The operator commands refuse what would be unsafe or wrong, with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tars_tasks import supervisor
from tars_tasks.errors import ConfigurationError
from tars_tasks.fleet import plan_fleet
from tars_tasks.flower_cli import basic_auth_value, flower_argv, flower_env
from tests.helpers import ROOT, make_settings
from tests.ops.conftest import free_port


def _tars(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tars_tasks.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_flower_refuses_to_start_without_credentials(redis_url, tmp_path):
    port = free_port()
    out = _tars("flower", "--port", str(port), env={"TARS_BROKER_URL": redis_url, "XDG_STATE_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: Flower needs basic-auth credentials: set TARS_FLOWER_USER and TARS_FLOWER_PASSWORD "
        "(or pass --insecure-no-auth for a dashboard on this machine only)"]


def test_fleet_up_refuses_to_start_flower_without_credentials_and_starts_nothing(redis_url, pg_url, tmp_path):
    out = _tars("fleet", "up", env={"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url,
                                    "TARS_FLEET_DIR": str(tmp_path / "fleet"), "TARS_FLOWER_USER": "op"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: Flower needs basic-auth credentials: set TARS_FLOWER_PASSWORD "
                                  "(or pass --insecure-no-auth for a dashboard on this machine only)")
    assert not (tmp_path / "fleet").exists()


def test_fleet_up_without_a_real_broker_is_a_one_line_error(tmp_path):
    out = _tars("fleet", "up", env={"TARS_FLEET_DIR": str(tmp_path / "fleet")})
    assert out.returncode == 2
    assert out.stderr.startswith("error: a fleet needs a real broker and database")


def test_fleet_up_rejects_a_bad_tier_count():
    out = _tars("fleet", "up", "--tier-workers", "gpt=2", env={"TARS_BROKER_URL": "redis://127.0.0.1:6379/5",
                                                                "TARS_DATABASE_URL": "postgresql://x@127.0.0.1/x",
                                                                "TARS_FLOWER_USER": "a", "TARS_FLOWER_PASSWORD": "b"})
    assert out.returncode == 2
    assert "--tier-workers takes TIER=N" in out.stderr


def test_plan_rejects_unknown_tiers_and_negative_counts():
    with pytest.raises(ConfigurationError, match="unknown tier"):
        plan_fleet(workers={"gpt": 1})
    with pytest.raises(ConfigurationError, match=">= 0"):
        plan_fleet(workers={"haiku": -1})


def test_flower_credentials_go_in_the_environment_never_on_the_command_line(tmp_path):
    auth = basic_auth_value(user="op", password="pw-123")
    argv = flower_argv(host="0.0.0.0", port=5555, persistent=True, db_path=tmp_path / "f.db", enable_events=False)
    assert "pw-123" not in " ".join(argv)
    assert argv[1:6] == ["-m", "celery", "-A", "tars_tasks", "flower"]
    assert {"--persistent=True", f"--db={tmp_path / 'f.db'}", "--enable_events=False", "--address=0.0.0.0",
            "--port=5555", "--purge_offline_workers=3600"} <= set(argv)
    assert flower_env(base={}, basic_auth=auth) == {"FLOWER_BASIC_AUTH": "op:pw-123"}
    with pytest.raises(ConfigurationError, match="','"):
        basic_auth_value(user="op", password="a,b")


def test_flower_with_insecure_no_auth_serves_the_dashboard_but_still_locks_its_api(redis_url, tmp_path):
    port = free_port()
    env = {**os.environ, "TARS_BROKER_URL": redis_url, "XDG_STATE_HOME": str(tmp_path)}
    log_path = tmp_path / "flower.log"
    proc = supervisor.start([sys.executable, "-m", "tars_tasks.cli", "flower", "--port", str(port),
                             "--insecure-no-auth", "--no-persistent"], cwd=ROOT, env=env, log_path=log_path)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=10).status_code == 401
        assert "WITHOUT authentication" in log_path.read_text()
    finally:
        supervisor.stop([proc], grace_s=20)


def test_metrics_report_an_unreachable_postgres_as_a_source_down_instead_of_failing_the_scrape(redis_url):
    from tars_tasks.metrics import make_registry

    port = free_port()  # nothing listens there
    settings = make_settings({"TARS_BROKER_URL": redis_url,
                              "TARS_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/nothing"})
    registry = make_registry(settings=settings, min_interval_s=0)
    up = {s.labels["source"]: s.value for fam in registry.collect() for s in fam.samples
          if s.name == "tars_metrics_source_up"}
    assert up == {"postgres": 0.0, "redis": 1.0}


def test_fleet_up_refuses_a_port_that_is_taken_before_starting_anything(redis_url, pg_url, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _tars("fleet", "up", "--no-flower", "--no-mock-llm", "--metrics-port", str(port),
                    env={"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url,
                         "TARS_FLEET_DIR": str(tmp_path / "fleet")})
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: port {port} for metrics is already in use on 127.0.0.1"
    assert not (tmp_path / "fleet" / "fleet.json").exists()
