"""Fixtures of the operations tests: a whole local fleet (`tars fleet up`) shared by a module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import redis as redis_lib

from tars_tasks import supervisor
from tests.helpers import ROOT, empty_tables
from tests.helpers import free_port as helpers_free_port

FLOWER_USER = "operator"
FLOWER_PASSWORD = "s3cret-flower-pw"
#: Secrets the operator's shell holds when it runs `tars fleet up`: only the workers may get them.
PROVIDER_KEYS = {"ANTHROPIC_API_KEY": "sk-ant-ops-1f6b2c", "OPENAI_API_KEY": "sk-openai-ops-9a03de"}
#: A password in the database URL (the test server trusts local connections, so it is never asked for).
DB_PASSWORD = "ops-db-pw-6e7f"
PORT_RANGE = (19000, 19999)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 inside the ops tests' range."""
    return helpers_free_port(low=PORT_RANGE[0], high=PORT_RANGE[1])


@dataclass
class RunningFleet:
    proc: subprocess.Popen
    env: dict[str, str]
    state_dir: Path
    log_path: Path
    flower_port: int
    metrics_port: int
    descendants: set[int] = field(default_factory=set)

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def remember_descendants(self) -> set[int]:
        try:
            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        return self.descendants

    def interrupt(self, *, timeout: float = 90) -> int:
        """Ctrl-C, as an operator would; returns the runner's exit code."""
        self.remember_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def kill_leftovers(self) -> None:
        for pid in self.descendants:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _wait_ready(fleet: RunningFleet, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.proc.poll() is not None:
            raise RuntimeError(f"tars fleet up exited ({fleet.proc.returncode}):\n{fleet.log()[-5000:]}")
        if "fleet: ready" in fleet.log():
            return
        time.sleep(0.2)
    raise TimeoutError(f"fleet not ready after {timeout}s:\n{fleet.log()[-5000:]}")


@pytest.fixture(scope="module")
def ops_fleet(pg_url: str, redis_url: str, tmp_path_factory) -> Iterator[RunningFleet]:
    """`tars fleet up` with one worker per tier, Flower and the metrics endpoint, on real services."""
    from tars_tasks.db.engine import get_engine

    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    empty_tables(get_engine(pg_url))
    tmp = tmp_path_factory.mktemp("fleet")
    state_dir = tmp / "state"
    flower_port, metrics_port = free_port(), free_port()
    while metrics_port == flower_port:
        metrics_port = free_port()
    scheme, rest = pg_url.split("://", 1)
    user, _, host = rest.partition("@")
    env = {
        **PROVIDER_KEYS,
        "TARS_BROKER_URL": redis_url,
        "TARS_DATABASE_URL": f"{scheme}://{user}:{DB_PASSWORD}@{host}",
        "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "TARS_SIM_LATENCY": "uniform:20:60",
        "TARS_SIM_FAILURE_RATE": "0",
        "TARS_TASK_EVENTS": "true",
        "TARS_VISIBILITY_TIMEOUT_S": "60",
        "TARS_UNACKED_RESTORE_INTERVAL_S": "1",
        "TARS_FLOWER_USER": FLOWER_USER,
        "TARS_FLOWER_PASSWORD": FLOWER_PASSWORD,
        "TARS_FLEET_DIR": str(state_dir),
        "XDG_STATE_HOME": str(tmp / "xdg"),
    }
    log_path = tmp / "fleet-up.log"
    argv = [sys.executable, "-m", "tars_tasks.cli", "fleet", "up", "--workers", "1", "--concurrency", "50",
            "--no-mock-llm", "--flower-port", str(flower_port), "--metrics-port", str(metrics_port),
            "--stop-timeout-s", "30"]
    proc = supervisor.start(argv, cwd=ROOT, env={**os.environ, **env}, log_path=log_path)
    fleet = RunningFleet(proc=proc, env=env, state_dir=state_dir, log_path=log_path, flower_port=flower_port,
                         metrics_port=metrics_port)
    try:
        _wait_ready(fleet, timeout=90)
        fleet.remember_descendants()
        yield fleet
    finally:
        try:
            if proc.poll() is None:
                fleet.interrupt()
        finally:
            fleet.kill_leftovers()
            r.flushdb()
            r.close()
