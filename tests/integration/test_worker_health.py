"""A worker whose results cannot be made durable says so: the healthcheck fails, status shows it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.faults.harness import wait_until
from tests.helpers import ROOT, make_settings
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def _healthcheck(env: dict, node: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tars_tasks.cli", "fleet", "healthcheck", "worker", "--tier",
                           "haiku", "--node", node, "--timeout-s", "5"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_a_writer_that_cannot_commit_makes_the_worker_unhealthy_until_it_can(fleet_env, start_worker, client, db):
    from tars_tasks.status import worker_health

    proxy = TcpProxy(target_host="127.0.0.1", target_port=5432)
    try:
        worker_db = fleet_env["TARS_DATABASE_URL"].replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        worker = start_worker(tiers=["haiku"], concurrency=10,
                              env={"TARS_DATABASE_URL": worker_db, "TARS_WRITER_STALL_UNHEALTHY_S": "2"})
        assert client.submit(role="researcher", prompt="before").wait(timeout=60).ok
        assert _healthcheck(fleet_env, worker.name).returncode == 0

        proxy.cut()
        handles = client.submit_many([{"role": "researcher", "prompt": f"during {i}"} for i in range(5)])
        failing = wait_until(lambda: (r := _healthcheck(fleet_env, worker.name)).returncode == 1 and r,
                             timeout=60, interval=1, what="the healthcheck failing")
        assert "unhealthy" in failing.stderr and "not durable" in failing.stderr
        # tars status reads what the worker publishes with its lease (renewed every second): it may
        # lag the healthcheck's live answer by one renewal, never stay healthy
        wait_until(lambda: any(not (h.get("writer") or {}).get("healthy", True)
                               for h in worker_health(make_settings(fleet_env)).values()),
                   timeout=15, interval=0.5, what="tars status showing the stalled writer")

        proxy.restore()
        assert all(r.ok for r in client.wait_many([h.id for h in handles], timeout=120))
        wait_until(lambda: _healthcheck(fleet_env, worker.name).returncode == 0, timeout=60, interval=1,
                   what="the healthcheck passing again")
    finally:
        proxy.close()
