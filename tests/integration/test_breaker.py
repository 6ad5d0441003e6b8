"""The fleet-wide breaker with real workers: it trips for every worker at once, requests fall
back to the fallback tier (recorded as the tier used), and after the cooldown a probe closes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, make_settings
from tests.integration.model_calls_support import (  # noqa: F401 - fixture
    FAKE_ANTHROPIC_KEY,
    MODELS,
    api_rows,
    mock_llm,
    write_catalog,
)

pytestmark = pytest.mark.integration

THRESHOLD = 5
COOLDOWN_S = 3.0
CONCURRENCY = 4


def test_consecutive_failures_trip_the_breaker_for_every_worker_and_a_probe_closes_it(
        fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    from tars_tasks.client import TarsClient
    from tars_tasks.status import breaker_states

    mock = mock_llm("--latency", "fixed:20")
    mock.configure(force_status={MODELS["sonnet"]: 500})
    catalog = write_catalog(tmp_path / "catalog.toml", sonnet={"max_attempts": 3, "retry_budget_s": 20})
    env = {**fleet_env, "TARS_CATALOG_PATH": str(catalog), "TARS_PROVIDER_BASE_URL": mock.url,
           "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "TARS_BREAKER_FAILURE_THRESHOLD": str(THRESHOLD),
           "TARS_BREAKER_COOLDOWN_S": str(COOLDOWN_S), "TARS_RETRY_BACKOFF_INITIAL_S": "0.05"}
    workers = [start_worker(tiers=["sonnet", "haiku"], concurrency=CONCURRENCY, env=env, wait=False)
               for _ in range(2)]
    for w in workers:
        w.wait_ready()
    settings = make_settings(env)
    with TarsClient(settings=settings) as client:
        handles = client.submit_many([{"role": "engineer", "prompt": f"build {i}"} for i in range(40)])
        results = client.wait_many([h.id for h in handles], timeout=60)

        # Sick sonnet: at most the threshold plus what was already in flight reached it ...
        sonnet_calls = mock.total(MODELS["sonnet"])
        assert THRESHOLD <= sonnet_calls <= THRESHOLD + 2 * CONCURRENCY
        # ... every request still ended, served by the fallback tier and recorded as such ...
        assert all(r.status == "succeeded" for r in results)
        assert sum(r.tier_used == "haiku" for r in results) >= 40 - 2 * CONCURRENCY
        # ... and both workers fell back: the breaker they share was open for both.
        fallback_workers = {r["worker"] for r in api_rows(db, where="tier = 'haiku'")}
        assert len(fallback_workers) == 2
        state = breaker_states(settings)[f"anthropic:{MODELS['sonnet']}"]
        assert state.startswith("open")
        shown = subprocess.run([sys.executable, "-m", "tars_tasks.cli", "status", "--json"], cwd=ROOT,
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["breakers"][f"anthropic:{MODELS['sonnet']}"].startswith("open")

        # The model recovers; after the cooldown the next call is the probe, and it closes the breaker.
        mock.configure(force_status={})
        time.sleep(COOLDOWN_S + 0.2)
        probe = client.submit(role="engineer", prompt="probe").wait(timeout=30)
        assert probe.status == "succeeded" and probe.tier_used == "sonnet"
        assert breaker_states(settings)[f"anthropic:{MODELS['sonnet']}"] == "closed"
        after = client.wait_many([h.id for h in client.submit_many(
            [{"role": "engineer", "prompt": f"again {i}"} for i in range(10)])], timeout=30)
        assert all(r.status == "succeeded" and r.tier_used == "sonnet" for r in after)


def test_a_5xx_and_overload_storm_ends_every_request_terminal_with_every_call_a_row(
        fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    from tars_tasks.client import TarsClient

    mock = mock_llm("--latency", "fixed:10", "--error-rate", "0.3", "--overload-rate", "0.2", "--seed", "7")
    catalog = write_catalog(tmp_path / "catalog.toml", haiku={"max_attempts": 4, "retry_budget_s": 15})
    env = {**fleet_env, "TARS_CATALOG_PATH": str(catalog), "TARS_PROVIDER_BASE_URL": mock.url,
           "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "TARS_BREAKER_COOLDOWN_S": "1",
           "TARS_RETRY_BACKOFF_INITIAL_S": "0.05"}
    start_worker(tiers=["haiku"], concurrency=40, env=env)
    n = 100
    with TarsClient(settings=make_settings(env)) as client:
        handles = client.submit_many([{"role": "researcher", "prompt": f"storm {i}"} for i in range(n)])
        results = client.wait_many([h.id for h in handles], timeout=90)

    assert len(results) == n and all(r.done for r in results)
    assert sum(r.ok for r in results) > n / 2
    rows = api_rows(db)
    outcomes = {r["outcome"] for r in rows}
    assert {"ok", "transient_error", "overloaded"} <= outcomes and "in_flight" not in outcomes
    # every call the provider received is an attempt row, and every attempt row a call it received
    assert mock.total(MODELS["haiku"]) == len(rows) == sum(r.attempts for r in results)
    for r in results:
        if not r.ok:
            assert any(k in r.error for k in ("transient_error", "overloaded", "circuit_open")), r.error
