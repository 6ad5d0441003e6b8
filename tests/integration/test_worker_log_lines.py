"""Celery's two INFO lines per task are off by default (``TARS_TASK_LOG_LINES``): a worker at INFO logs
its start and its warnings, not "received" and "succeeded in" for every request; a task that raised
is still logged."""

from __future__ import annotations

import pytest

from tars_tasks.client import TarsClient
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("lines", [False, True], ids=["default", "TARS_TASK_LOG_LINES=true"])
def test_a_workers_per_task_info_lines_follow_the_setting(lines, fleet_env, start_worker):
    env = {"TARS_TASK_LOG_LINES": "true"} if lines else {}
    worker = start_worker(tiers=["haiku"], concurrency=5, env=env)
    with TarsClient(settings=make_settings(fleet_env)) as client:
        # five messages (one submit each: a submit_many of five would be one bundle, one task)
        handles = [client.submit(role="researcher", prompt=f"log {i}") for i in range(5)]
        assert {r.status for r in client.wait_many([h.id for h in handles], timeout=60)} == {"succeeded"}
    worker.stop(timeout=20)
    log = worker.log_path.read_text()
    assert " ready." in log  # the worker logged at INFO
    received = sum(1 for line in log.splitlines() if "tars.run_request[" in line and " received" in line)
    succeeded = sum(1 for line in log.splitlines() if "tars.run_request[" in line and " succeeded in " in line)
    assert (received, succeeded) == ((5, 5) if lines else (0, 0)), log[-2000:]
