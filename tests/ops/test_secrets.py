"""Secrets: Flower gets only what it needs, and no way of starting the fleet accepts a placeholder password.

The Flower test reads ``/proc/<pid>/environ`` of the real Flower process (``tars flower`` execs
``celery flower`` in place, so it is the pid we started), with provider keys, a database URL
with a password and an unrelated token in the parent's environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tars_tasks import supervisor
from tars_tasks.default_passwords import is_placeholder, placeholders_in, url_password
from tars_tasks.flower_cli import FLOWER_ENV_BASICS, FLOWER_ENV_PREFIXES, FLOWER_SETTINGS, flower_env
from tests.helpers import ROOT
from tests.ops.conftest import free_port

#: What the parent of Flower holds and Flower must not.
PARENT_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-test-7c1f9e0b",
    "OPENAI_API_KEY": "sk-openai-test-42d0aa",
    "SOME_OTHER_TOKEN": "tok-unrelated-93be",
}
DB_PASSWORD = "db-secret-pw-5b1a"
FLOWER_PASSWORD = "flower-pw-e81c"


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    user, at, host = rest.partition("@")
    return f"{scheme}://{user}:{password}@{host}" if at else f"{scheme}://:{password}@{rest}"


def _tars(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tars_tasks.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _allowed(name: str) -> bool:
    return (name in FLOWER_ENV_BASICS or name.startswith(FLOWER_ENV_PREFIXES)
            or name in {f"TARS_{s.upper()}" for s in FLOWER_SETTINGS})


# --- Flower's environment ------------------------------------------------------------------------


@pytest.mark.integration
def test_the_flower_process_started_by_tars_flower_holds_no_secret_of_its_parent(redis_url, pg_url, tmp_path):
    port = free_port()
    env = {**os.environ, **PARENT_SECRETS, "TARS_BROKER_URL": redis_url,
           "TARS_DATABASE_URL": with_password(pg_url, DB_PASSWORD), "TARS_FLOWER_USER": "operator",
           "TARS_FLOWER_PASSWORD": FLOWER_PASSWORD, "XDG_STATE_HOME": str(tmp_path)}
    proc = supervisor.start([sys.executable, "-m", "tars_tasks.cli", "flower", "--port", str(port), "--no-persistent"],
                            cwd=ROOT, env=env, log_path=tmp_path / "flower.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Flower did not come up"
            time.sleep(0.2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"celery" in cmdline and b"flower" in cmdline, cmdline  # the real Flower, same pid
        environ = proc_environ(proc.pid)
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        for name in (*PARENT_SECRETS, "TARS_DATABASE_URL", "TARS_FLOWER_PASSWORD", "TARS_TEST_PG_DB"):
            assert name not in environ, name
        for value in (*PARENT_SECRETS.values(), DB_PASSWORD):
            assert value.encode() not in raw
        assert environ["FLOWER_BASIC_AUTH"] == f"operator:{FLOWER_PASSWORD}"  # the one secret it needs
        assert environ["TARS_BROKER_URL"] == redis_url
        assert sorted(k for k in environ if not _allowed(k)) == []
        # and it works on what it got: the API, with credentials, reaches the broker
        resp = httpx.get(f"http://127.0.0.1:{port}/api/workers", auth=("operator", FLOWER_PASSWORD), timeout=15)
        assert resp.status_code == 200
    finally:
        supervisor.stop([proc], grace_s=20)


def test_the_flower_allow_list_keeps_the_broker_settings_of_the_workers_app():
    """Flower's Celery app must be configured like the workers' for everything broker-side."""
    from tars_tasks.celery_app import celery_config
    from tests.helpers import make_settings

    parent = {"TARS_BROKER_URL": "redis://:pw@redis:6379/3", "TARS_NAMESPACE": "ns1", "TARS_TASK_EVENTS": "false",
              "TARS_VISIBILITY_TIMEOUT_S": "120", "TARS_REDIS_SOCKET_TIMEOUT_S": "7",
              "TARS_REDIS_HEALTH_CHECK_INTERVAL_S": "3", "TARS_TCP_KEEPALIVE_IDLE_S": "11",
              "TARS_DATABASE_URL": "postgresql://u:p@db/x", "TARS_REDIS_URL": "redis://:other@state:6379/0",
              "ANTHROPIC_API_KEY": "k", "PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "FLOWER_PURGE_OFFLINE_WORKERS": "60"}
    child = flower_env(base=parent, basic_auth="a:b")
    assert {k for k in parent if k not in child} == {"TARS_DATABASE_URL", "TARS_REDIS_URL", "ANTHROPIC_API_KEY"}
    assert child["FLOWER_BASIC_AUTH"] == "a:b"
    worker_conf, flower_conf = celery_config(make_settings(parent)), celery_config(make_settings(child))
    for key in ("broker_url", "broker_transport_options", "worker_send_task_events", "task_send_sent_event",
                "event_serializer", "accept_content"):
        assert flower_conf[key] == worker_conf[key], key


def test_fleet_up_starts_flower_with_only_the_flower_environment(tmp_path):
    from tars_tasks.fleet import LocalFleet, plan_fleet

    specs = plan_fleet(workers={"haiku": 1}, flower=True, mock_llm=False, metrics=False)
    fleet = LocalFleet(specs=specs, state_dir=tmp_path, env={**PARENT_SECRETS, "TARS_FLOWER_PASSWORD": "x",
                                                             "TARS_DATABASE_URL": "postgresql://u:p@h/d"})
    by_name = {s.name: fleet.env_for(s) for s in specs}
    assert not set(PARENT_SECRETS) & set(by_name["flower"])
    assert "TARS_DATABASE_URL" not in by_name["flower"]
    assert by_name["flower"]["TARS_FLOWER_PASSWORD"] == "x"  # for `tars flower`, which turns it into FLOWER_BASIC_AUTH
    assert by_name["haiku-1"]["ANTHROPIC_API_KEY"] == PARENT_SECRETS["ANTHROPIC_API_KEY"]  # workers need them


# --- placeholder passwords -------------------------------------------------------------------------

PLACEHOLDER_LINE = ("error: refusing to start: {names} still {verb} a placeholder password from .env.example "
                    "('change-me...'); set a real password (docs/OPERATIONS.md, Secrets)")


@pytest.mark.integration
def test_tars_flower_refuses_the_placeholder_flower_password_in_one_line(redis_url, tmp_path):
    out = _tars("flower", "--port", str(free_port()), env={"TARS_BROKER_URL": redis_url, "TARS_FLOWER_USER": "operator",
                                                          "TARS_FLOWER_PASSWORD": "change-me-flower",
                                                          "XDG_STATE_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [PLACEHOLDER_LINE.format(names="TARS_FLOWER_PASSWORD", verb="holds")]


@pytest.mark.integration
def test_tars_flower_refuses_a_broker_url_with_a_placeholder_password(tmp_path):
    out = _tars("flower", "--insecure-no-auth", env={"TARS_BROKER_URL": "redis://:Change-Me-redis@127.0.0.1:6379/4",
                                                     "XDG_STATE_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [PLACEHOLDER_LINE.format(names="TARS_BROKER_URL", verb="holds")]


@pytest.mark.integration
def test_fleet_up_refuses_placeholder_passwords_before_starting_anything(redis_url, pg_url, tmp_path):
    out = _tars("fleet", "up", env={"TARS_BROKER_URL": redis_url,
                                    "TARS_DATABASE_URL": with_password(pg_url, "change-me-postgres"),
                                    "TARS_FLOWER_USER": "operator", "TARS_FLOWER_PASSWORD": " CHANGE-ME ",
                                    "TARS_FLEET_DIR": str(tmp_path / "fleet")})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        PLACEHOLDER_LINE.format(names="TARS_DATABASE_URL, TARS_FLOWER_PASSWORD", verb="hold")]
    assert not (tmp_path / "fleet").exists()


def test_fleet_check_secrets_passes_real_passwords_and_names_every_placeholder():
    ok = _tars("fleet", "check-secrets", env={"POSTGRES_PASSWORD": "pg-0f3a", "REDIS_PASSWORD": "rd-77c1",
                                              "TARS_FLOWER_PASSWORD": "fl-9e2d",
                                              "TARS_BROKER_URL": "redis://:rd-77c1@redis:6379/0"})
    assert ok.returncode == 0, ok.stderr
    bad = _tars("fleet", "check-secrets", env={"POSTGRES_PASSWORD": "change-me-postgres", "REDIS_PASSWORD": "rd-77c1",
                                               "TARS_BROKER_URL": "redis://:change-me-redis@redis:6379/0"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        PLACEHOLDER_LINE.format(names="TARS_BROKER_URL, POSTGRES_PASSWORD", verb="hold")]


@settings(max_examples=500, deadline=None)
@given(prefix=st.sampled_from(["change-me", "CHANGE-ME", "Change-Me", " change-me"]),
       rest=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20))
def test_every_password_starting_with_change_me_is_a_placeholder_alone_or_inside_a_url(prefix, rest):
    password = prefix + rest
    assert is_placeholder(password)
    url = f"redis://:{quote(password, safe='')}@redis:6379/0"
    assert url_password(url) == password
    assert placeholders_in({"TARS_BROKER_URL": url, "REDIS_PASSWORD": password}) == ["TARS_BROKER_URL",
                                                                                      "REDIS_PASSWORD"]


@settings(max_examples=500, deadline=None)
@given(password=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30))
def test_a_password_not_starting_with_change_me_is_never_refused(password):
    if password.strip().lower().startswith("change-me"):
        return
    url = f"postgresql://tars:{quote(password, safe='')}@postgres:5432/tars"
    assert placeholders_in({"POSTGRES_PASSWORD": password, "TARS_DATABASE_URL": url}) == []


# --- docker compose: the check runs first, with exactly the environment compose gives it ----------

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (scripts/system-deps)")


def _compose_services(env_file: Path) -> dict:
    from tests.ops.test_compose import _compose, _yaml_to_json

    out = _compose("--env-file", str(env_file), "config")
    assert out.returncode == 0, out.stderr
    return _yaml_to_json(out.stdout)["services"]


def _run_check_as_compose_would(environment: dict[str, str]) -> subprocess.CompletedProcess:
    """`tars fleet check-secrets` as a local process with only the service's compose environment."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "tars_tasks.cli", "fleet", "check-secrets"], cwd="/",
                          env={**base, **{k: str(v) for k, v in environment.items()}},
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@needs_compose
def test_compose_refuses_to_start_with_the_example_passwords(tmp_path):
    services = _compose_services(ROOT / ".env.example")
    out = _run_check_as_compose_would(services["check-secrets"]["environment"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [PLACEHOLDER_LINE.format(
        names="TARS_BROKER_URL, TARS_DATABASE_URL, POSTGRES_PASSWORD, REDIS_PASSWORD, TARS_FLOWER_PASSWORD",
        verb="hold")]
    for name, svc in services.items():  # nothing starts before the check has succeeded
        if name != "check-secrets":
            assert svc["depends_on"]["check-secrets"] == {"condition": "service_completed_successfully"}, name


@needs_compose
def test_compose_starts_with_real_passwords(tmp_path):
    env_file = tmp_path / ".env"
    text = (ROOT / ".env.example").read_text()
    for placeholder, real in (("change-me-postgres", "pg-8d1e0c"), ("change-me-redis", "rd-1a9f44"),
                              ("change-me-flower", "fl-c07b3e")):
        text = text.replace(placeholder, real)
    env_file.write_text(text)
    services = _compose_services(env_file)
    out = _run_check_as_compose_would(services["check-secrets"]["environment"])
    assert out.returncode == 0, out.stderr
