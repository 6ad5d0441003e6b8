"""A staged call asks no budget script while no budget limit is set anywhere, and a limit set while
workers run binds the calls fetched after it (issue 13: the budget reserve's round trip was ~19% of
a bundled drain's worker CPU with no budget set; ``tars_tasks.broker.slots``).

The worker counts the limits set (``HLEN``) in the round trip that records a fetched message as
unacked; a count of 0 read moments before the call means a reserve would answer "unlimited" and
hold nothing. Real worker, a private redis-server as the broker (its MONITOR shows the commands
the budget scripts run, nobody else's), Postgres."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest
import redis as redis_lib
from sqlalchemy import text

from config.catalog import load_catalog
from tars_tasks.budgets import Budgets
from tests.helpers import MonitorCounts, PrivateRedis, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path):
    server = PrivateRedis(tmp_path).start()
    yield server.url
    server.kill()


def _budget_commands(line: str) -> str | None:
    """The budget scripts' purge of a tenant's leases (one per script: a reserve, a settle, a state
    read) and the transport's count of the limits."""
    if line.startswith("ZRANGEBYSCORE") and ":budget:lease:acme" in line:
        return "budget_script"
    if line.startswith("HLEN") and ":budget:limits" in line:
        return "limits_counted"
    return None


@pytest.mark.parametrize("bundle", [0, 16], ids=["singles", "bundles"])
def test_no_budget_script_runs_while_no_limit_is_set_and_a_limit_set_meanwhile_binds_the_next_fetch(
        fleet_env, start_worker, db, broker, bundle):
    from tars_tasks.client import TarsClient

    env = {**fleet_env, "TARS_BROKER_URL": broker, "TARS_BUNDLE_MAX": str(bundle)}
    seen = MonitorCounts(broker, _budget_commands)
    seen.counts()  # watching before the worker starts
    start_worker(tiers=["haiku"], concurrency=50, env=env)
    n = 200
    with TarsClient(settings=make_settings(env)) as tars:
        before = seen.counts()
        handles = tars.submit_many([{"role": "researcher", "prompt": f"question {i}", "tenant": "acme"}
                                    for i in range(n)])
        first = tars.wait_many([h.id for h in handles], timeout=120)
        after = seen.counts()
        assert [x.status for x in first].count("succeeded") == n
        # before: every call's reserve ran the tenant's script (n of n); now only the submit's state
        # read does (one per submit_many), and a call whose message waited long after its fetch
        budget_scripts = after.get("budget_script", 0) - before.get("budget_script", 0)
        assert budget_scripts < n / 10, (before, after)
        messages = n if bundle <= 1 else -(-n // bundle)
        assert after.get("limits_counted", 0) - before.get("limits_counted", 0) >= messages  # with every fetch

        # a limit of about three calls' worst cases, set while the worker runs: the next fetches see it
        s = make_settings(env)
        worst = load_catalog(s.catalog_path).spec("haiku").cost_usd(input_tokens=20, output_tokens=400)
        limit = worst * Decimal("3.5")
        Budgets(redis_client=redis_lib.Redis.from_url(s.shared_redis_url), namespace=s.namespace).set_limit(
            tenant="acme", period="day", usd=limit)
        handles = tars.submit_many([{"role": "researcher", "prompt": f"more {i}", "tenant": "acme",
                                     "max_tokens": 400} for i in range(30)])
        later = tars.wait_many([h.id for h in handles], timeout=120)
    outcomes = Counter((x.status, x.failure_reason) for x in later)
    assert outcomes[("failed", "budget")] >= 26 and sum(outcomes.values()) == 30, outcomes
    with db.connect() as conn:
        billed = conn.execute(text("SELECT coalesce(sum(a.cost_usd), 0) FROM api_calls a JOIN requests r "
                                   "ON r.id = a.request_id WHERE r.prompt LIKE 'more %'")).scalar_one()
    assert billed <= limit  # every call after the limit was set ran inside a reservation
