"""Leases: a live call longer than every timeout is never handed to a second worker."""

from __future__ import annotations

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.integration


def test_calls_longer_than_the_lease_ttl_and_the_visibility_timeout_run_once(fleet_env, start_worker, client, db):
    # Calls of 8 s; the lease lives 2 s unless renewed, the visibility timeout is 3 s and kombu's
    # visibility restore runs every second: only the live worker's lease stops both the lease
    # sweeper and the visibility restore of the idle second worker from handing the calls out again.
    env = {"TARS_SIM_LATENCY": "fixed:8000", "TARS_LEASE_TTL_S": "2", "TARS_LEASE_RENEW_INTERVAL_S": "0.5",
           "TARS_VISIBILITY_TIMEOUT_S": "3", "TARS_UNACKED_RESTORE_INTERVAL_S": "1"}
    start_worker(tiers=["haiku"], concurrency=20, env=env)
    handles = client.submit_many([{"role": "researcher", "prompt": f"long {i}"} for i in range(10)])
    start_worker(tiers=["haiku"], concurrency=20, env=env)  # idle, sweeping every second
    results = client.wait_many([h.id for h in handles], timeout=120)
    assert {r.status for r in results} == {"succeeded"}
    with db.connect() as conn:
        per_request = conn.execute(text("SELECT request_id, count(*) FROM api_calls GROUP BY 1")).all()
    assert len(per_request) == 10 and {n for _, n in per_request} == {1}
