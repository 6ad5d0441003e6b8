"""The local runner's worst case: killed outright, it still leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_a_runner_killed_with_sigkill_takes_its_workers_down_with_it(fleet_env, tmp_path):
    state_dir = tmp_path / "fleet"
    env = {**os.environ, **fleet_env, "TARS_FLEET_DIR": str(state_dir)}
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tars_tasks.cli", "fleet", "up", "--no-flower", "--no-metrics", "--no-mock-llm",
         "--workers", "0", "--tier-workers", "haiku=1", "--concurrency", "5"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "fleet: ready" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "fleet not ready"
            time.sleep(0.2)
        children = json.loads((state_dir / "fleet.json").read_text())["processes"]
        assert sorted(c["name"] for c in children) == ["batch-runner", "haiku-1"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _gone, alive = psutil.wait_procs([psutil.Process(c["pid"]) for c in children], timeout=30)
        assert alive == [], "a worker or the batch runner outlived its runner"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # the stale state file does not block the next `tars fleet up`, and status says the runner is gone
    out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", "fleet", "status", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    st = json.loads(out.stdout)
    assert st["runner_alive"] is False
    assert [p["alive"] for p in st["processes"]] == [False, False]


def test_route_to_mock_llm_sends_every_model_call_of_the_local_fleet_to_the_mock_server_batches_too(
        fleet_env, tmp_path, db):
    """`tars fleet up` runs a batch runner beside the workers: batch-lane requests are answered through
    the mock's Message Batches API at the batch price (without one they would wait forever)."""
    pytest.importorskip("loadgen.mock_llm")
    from sqlalchemy import text

    from tars_tasks import topology
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings
    from tests.ops.conftest import free_port

    env = {**os.environ, **fleet_env, "TARS_FLEET_DIR": str(tmp_path / "fleet"),
           "TARS_BATCH_MAX_AGE_S": "0.5", "TARS_BATCH_POLL_INTERVAL_S": "0.5"}
    env.pop("ANTHROPIC_API_KEY", None)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tars_tasks.cli", "fleet", "up", "--no-flower", "--no-metrics",
             "--route-to-mock-llm", "--mock-llm-port", str(free_port()), "--workers", "1", "--concurrency", "20"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "fleet: ready" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "fleet not ready"
            time.sleep(0.2)
        # the producer knows the calls go to the mock (it refuses a batch lane without a batch API)
        with TarsClient(settings=make_settings(fleet_env, provider_override=topology.MOCK_LLM_PROTOCOL)) as client:
            handles = client.submit_many([{"role": "researcher", "prompt": f"mock {i}",
                                           "tier": ("haiku", "sonnet", "opus")[i % 3]} for i in range(30)])
            batched = client.submit_many([{"role": "researcher", "prompt": f"batched {i}", "lane": "batch",
                                           "tier": ("haiku", "sonnet")[i % 2]} for i in range(6)])
            results = client.wait_many([h.id for h in handles + batched], timeout=90)
        assert {r.status for r in results} == {"succeeded"}, [r.error for r in results if not r.ok][:3]
        with db.connect() as conn:
            providers = dict(conn.execute(text("SELECT provider, count(*) FROM api_calls GROUP BY provider")).all())
            lanes = dict(conn.execute(text("SELECT lane, count(*) FROM requests GROUP BY lane")).all())
            in_batches = conn.execute(text("SELECT count(*) FROM batch_items")).scalar()
        assert providers == {"anthropic": 36}
        assert lanes == {"interactive": 30, "batch": 6} and in_batches == 6
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
GRANDCHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
child = subprocess.Popen([sys.executable, "-c", GRANDCHILD])
print("ready child", child.pid, flush=True)
time.sleep(120)
"""


def test_a_process_that_ignores_sigterm_is_killed_with_its_whole_group_after_its_grace(tmp_path):
    from tars_tasks.fleet import LocalFleet, ProcessSpec

    specs = [ProcessSpec(name=f"stubborn-{i}", service="test", argv=(sys.executable, "-c", STUBBORN),
                         ready="log:ready child", tier="haiku", stop_timeout_s=1.0) for i in range(2)]
    fleet = LocalFleet(specs=specs, state_dir=tmp_path / "fleet")
    fleet.start()
    fleet.wait_ready(timeout_s=30)
    pids = []
    for fp in fleet.processes:
        pids.append(fp.pid)
        pids.append(int(fp.log_path.read_text().split("ready child")[1].split()[0]))
    codes = fleet.stop()
    assert codes == {"stubborn-0": -signal.SIGKILL, "stubborn-1": -signal.SIGKILL}
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
    assert alive == [], "a grandchild survived the group kill"
