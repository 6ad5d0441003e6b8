"""The compose file, checked statically (no Docker engine here): it is valid, and its services
run the commands of tars_tasks/topology.py — the ones `tars fleet up` runs locally."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config.keys import TIERS
from tars_tasks import topology
from tars_tasks.fleet import mock_llm_available, plan_fleet
from tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_COMPOSE = shutil.which("docker-compose")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's docker-compose depends on python3-yaml there

needs_compose = pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (scripts/system-deps)")


def _compose(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """docker-compose on cwd's docker-compose.yml; a leading ``-f FILE`` in args adds an override file."""
    files = ["-f", str(cwd / "docker-compose.yml")]
    args_list = list(args)
    while "-f" in args_list:
        i = args_list.index("-f")
        files += args_list[i : i + 2]
        del args_list[i : i + 2]
    return subprocess.run([DOCKER_COMPOSE, "--project-directory", str(cwd), *files, *args_list], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _yaml_to_json(yaml_text: str) -> dict:
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))"
    out = subprocess.run([SYSTEM_PYTHON, "-c", code], input=yaml_text, capture_output=True, text=True,
                         timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def compose_config() -> dict:
    """The compose file as compose itself resolves it, with the example env file."""
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose not installed (scripts/system-deps)")
    out = _compose("--env-file", str(ENV_EXAMPLE), "config")
    assert out.returncode == 0, out.stderr
    return _yaml_to_json(out.stdout)


@needs_compose
def test_docker_compose_config_passes_with_the_example_env_file():
    out = _compose("--env-file", str(ENV_EXAMPLE), "config", "-q")
    assert out.returncode == 0, out.stderr


@needs_compose
def test_docker_compose_config_refuses_to_run_without_the_secrets(tmp_path):
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")  # no .env beside it
    out = _compose("config", "-q", cwd=tmp_path)
    assert out.returncode != 0
    assert "PASSWORD" in out.stderr


def test_the_real_env_file_is_ignored_by_git_and_the_example_is_not():
    def ignored(name: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT).returncode == 0

    assert ignored(".env")
    assert not ignored(".env.example")
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_compose_services_run_the_commands_of_the_topology(compose_config):
    services = compose_config["services"]
    for svc in topology.SERVICES:
        assert svc.name in services, f"compose has no service {svc.name}"
        c = services[svc.name]
        if svc.default_args:
            assert c["entrypoint"] == list(svc.command)
            assert c["command"] == list(svc.default_args)
        else:
            assert c["command"] == list(svc.command), svc.name
        if svc.healthcheck:
            assert c["healthcheck"]["test"] == ["CMD", *svc.healthcheck], svc.name
        if svc.profile:
            assert c["profiles"] == [svc.profile]
    project = {n for n, c in services.items() if "build" in c}
    assert project == {s.name for s in topology.SERVICES}, "a project service is missing from topology.py"


def _placeholders(argv: list[str]) -> list[str]:
    """The command with the values of --host and --port (which differ by design) blanked."""
    out = list(argv)
    for i, a in enumerate(argv[:-1]):
        if a in ("--host", "--port"):
            out[i + 1] = f"<{a[2:]}>"
    return out


#: Options the local runner adds after a service's command, and why: several workers of a tier
#: on one host need distinct node names; tests and laptops want smaller pools.
LOCAL_EXTRAS = {"--name", "--concurrency", "--insecure-no-auth"}


def test_the_local_runner_runs_the_same_commands_as_compose(compose_config):
    services = compose_config["services"]
    python = sys.executable
    plan = plan_fleet(workers=dict.fromkeys(TIERS, 2), concurrency=10, mock_llm=None, python=python,
                      flower_port=19555, metrics_port=19108, mock_llm_port=19090)
    seen = set()
    for p in plan:
        seen.add(p.service)
        compose_cmd = services[p.service]["command"]
        local = list(p.argv)
        assert local[:3] == [python, "-m", "tars_tasks.cli"], "`tars` is run as the same CLI module"
        shared, extra = local[3 : 3 + len(compose_cmd) - 1], local[3 + len(compose_cmd) - 1 :]
        assert _placeholders(shared) == _placeholders(compose_cmd[1:]), p.name
        assert {a for a in extra if a.startswith("-")} <= LOCAL_EXTRAS, p.name
        if p.port is not None:
            assert shared[shared.index("--port") + 1] == str(p.port)
            assert shared[shared.index("--host") + 1] == "127.0.0.1"
    assert seen >= {"flower", "metrics", "batch-runner", *(f"worker-{t}" for t in TIERS)}
    assert ("mock-llm" in seen) == mock_llm_available()
    for tier in TIERS:
        assert [p.name for p in plan if p.tier == tier] == [f"{tier}-1", f"{tier}-2"]


@needs_compose
def test_the_mock_override_file_routes_every_worker_and_the_batch_runner_to_the_mock_as_the_local_runner_does():
    out = _compose("--env-file", str(ENV_EXAMPLE), "-f", str(ROOT / "compose.mock-llm.yml"), "config")
    assert out.returncode == 0, out.stderr
    services = _yaml_to_json(out.stdout)["services"]
    expected = topology.mock_route_env(base_url=f"http://{topology.MOCK_LLM.name}:{topology.MOCK_LLM_PORT}")
    for name in (*(f"worker-{t}" for t in TIERS), topology.BATCH_RUNNER.name):
        w = services[name]
        assert {k: w["environment"][k] for k in expected} == expected, name
        assert w["depends_on"]["mock-llm"]["condition"] == "service_healthy"
        assert w["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["mock-llm"]["command"] == list(topology.MOCK_LLM.command)


def test_only_flower_publishes_a_port_and_only_on_loopback_by_default(compose_config):
    published = {n: c["ports"] for n, c in compose_config["services"].items() if c.get("ports")}
    assert list(published) == ["flower"]
    (port,) = published["flower"]
    assert port.startswith("127.0.0.1:") if isinstance(port, str) else port["host_ip"] == "127.0.0.1"


def test_long_running_services_have_healthchecks_and_workers_time_for_a_warm_shutdown(compose_config):
    services = compose_config["services"]
    long_running = {"redis", "postgres", *(s.name for s in topology.SERVICES if s.long_running)}
    for name in long_running:
        assert "healthcheck" in services[name], name
        assert services[name].get("restart") == "unless-stopped", name
    for tier in TIERS:
        grace = services[f"worker-{tier}"]["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) >= topology.WORKER_STOP_GRACE_S


def test_workers_wait_for_the_migration_and_redis_keeps_every_message(compose_config):
    services = compose_config["services"]
    assert services["migrate"]["command"] == ["tars", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for tier in TIERS:
        deps = services[f"worker-{tier}"]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert "--appendonly yes" in redis_cmd
    assert "--requirepass" in redis_cmd
    assert services["postgres"]["volumes"][0].startswith("postgres-data:")
    assert "postgres-data" in compose_config["volumes"]


def test_the_response_cache_has_its_own_bounded_evicting_redis(compose_config):
    """The broker's Redis never evicts (queued work); the cache's must, and is bounded."""
    services = compose_config["services"]
    cache_cmd = " ".join(services["redis-cache"]["command"])
    assert "--maxmemory-policy allkeys-lru" in cache_cmd and "--maxmemory" in cache_cmd
    assert "--requirepass" in cache_cmd
    for tier in TIERS:
        env = services[f"worker-{tier}"]["environment"]
        assert "@redis-cache:6379" in env["TARS_CACHE_URL"]
        assert "@redis:6379" in env["TARS_BROKER_URL"]


def test_no_secret_is_written_in_the_compose_file_itself():
    raw = COMPOSE.read_text()
    for secret in ("change-me", "s3cret"):
        assert secret not in raw
    assert "${POSTGRES_PASSWORD:?" in raw and "${REDIS_PASSWORD:?" in raw and "${TARS_FLOWER_PASSWORD:?" in raw


def test_each_service_holds_exactly_the_secrets_topology_gives_it(compose_config):
    services = compose_config["services"]
    for svc in topology.SERVICES:
        env = services[svc.name].get("environment") or {}
        held = {k for k in env if k in topology.SECRET_VARIABLES}
        assert held == topology.SERVICE_SECRETS[svc.name], svc.name
    assert {k for k in services["redis"]["environment"] if k in topology.SECRET_VARIABLES} == {"REDIS_PASSWORD"}
    assert {k for k in services["postgres"]["environment"] if k in topology.SECRET_VARIABLES} == {"POSTGRES_PASSWORD"}
    # the provider keys are the operator's (empty unless set), never written into the file
    for tier in TIERS:
        env = services[f"worker-{tier}"]["environment"]
        assert env["ANTHROPIC_API_KEY"] == "" and env["OPENAI_API_KEY"] == ""


def test_every_service_waits_for_the_secrets_check_to_succeed(compose_config):
    services = compose_config["services"]
    assert services["check-secrets"]["command"] == list(topology.CHECK_SECRETS.command)
    assert services["check-secrets"].get("restart") == "no"
    for name, svc in services.items():
        if name != "check-secrets":
            assert svc["depends_on"]["check-secrets"]["condition"] == "service_completed_successfully", name


def test_the_dockerfile_is_slim_non_root_and_installs_dependencies_before_the_code():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip()
             and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all("-slim" in ln for ln in froms)
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("root", "0")
    copy_pyproject = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    install_deps = next(i for i, ln in enumerate(lines) if "pip install -r" in ln or "pip install -r" in
                        lines[i - 1] + ln)
    copy_code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY tars_tasks"))
    assert copy_pyproject < install_deps < copy_code
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
