"""The fleet-wide limiter with real workers, real Redis and the mock provider counting what it got.

The limiter's "minute" is scaled down (``TARS_RATELIMIT_WINDOW_S``) to keep the tests short;
the mock counts requests per wall-clock second and the test sums whole-second windows.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.helpers import make_settings
from tests.integration.model_calls_support import (  # noqa: F401 - fixture
    FAKE_ANTHROPIC_KEY,
    MODELS,
    api_rows,
    mock_llm,
    request_rows,
    window_counts,
    write_catalog,
)

pytestmark = pytest.mark.integration

WINDOW_S = 10
FLEET_RPM = 600  # per WINDOW_S seconds: 60 requests a second across the fleet
WORKERS = 4


def _env(fleet_env, tmp_path, mock, **tiers) -> dict[str, str]:
    return {**fleet_env, "TARS_CATALOG_PATH": str(write_catalog(tmp_path / "catalog.toml", **tiers)),
            "TARS_PROVIDER_BASE_URL": mock.url, "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
            "TARS_RATELIMIT_WINDOW_S": str(WINDOW_S)}


@pytest.mark.parametrize(("dispatch", "bundle"), [(True, 0), (False, 0), (True, 16)],
                         ids=["staged", "published", "staged-bundles"])
def test_four_workers_sharing_a_limit_never_exceed_it_and_reach_95_percent_of_it(
        fleet_env, tmp_path, mock_llm, start_worker, db, dispatch, bundle):  # noqa: F811
    """``staged-bundles``: 60 staged bundles of 16 (``tars_tasks.bundles``); dispatch moves each whole
    but must reserve all 16 members their own slots (one slot per bundle would send 16 calls a slot)."""
    from tars_tasks.client import TarsClient

    mock = mock_llm("--latency", "uniform:10:40")  # the mock itself allows any rate
    env = _env(fleet_env, tmp_path, mock, haiku={"rpm": FLEET_RPM, "tpm": 10_000_000, "retry_budget_s": 60})
    env["TARS_DISPATCH_ENABLED"] = "true" if dispatch else "false"
    env["TARS_BUNDLE_MAX"] = str(bundle)
    workers = [start_worker(tiers=["haiku"], concurrency=40, env=env, wait=False) for _ in range(WORKERS)]
    for w in workers:
        w.wait_ready()
    n = int(FLEET_RPM * 1.6)  # a backlog of 1.6 windows' worth
    with TarsClient(settings=make_settings(env)) as client:
        handles = client.submit_many([{"role": "researcher", "prompt": f"question {i}"} for i in range(n)])
        backlog_from = int(time.time()) + 1  # the first whole second with everything queued
        results = client.wait_many([h.id for h in handles], timeout=120)
    assert [r.status for r in results].count("succeeded") == n

    per_second = mock.per_second(MODELS["haiku"])
    assert sum(per_second.values()) == n
    windows = window_counts(per_second, window_s=WINDOW_S)
    assert max(windows) <= FLEET_RPM, f"a {WINDOW_S}s window saw {max(windows)} > {FLEET_RPM}: {per_second}"
    # Under backlog (whole seconds after submission ended *and* after the first second the mock saw calls
    # in, which is partial, up to before the last) the fleet uses the limit.
    backlog_from = max(backlog_from, min(per_second) + 1)
    inner = window_counts({s: c for s, c in per_second.items() if backlog_from <= s < max(per_second)},
                          window_s=WINDOW_S)
    # The limit's use over the whole backlog is the claim (≥ 95%); a single window may dip a little
    # further when the shared machine starves the workers for a second or two (CI: 3 windows at 94.5%
    # while the backlog's mean was 95.9%), never far.
    backlog = [c for s, c in per_second.items() if backlog_from <= s < max(per_second)]
    assert inner and len(backlog) >= WINDOW_S, per_second
    mean_use = sum(backlog) / len(backlog) * WINDOW_S / FLEET_RPM
    assert mean_use >= 0.95, f"under backlog {mean_use:.1%} of the limit: {per_second}"
    assert min(inner) >= 0.90 * FLEET_RPM, f"under backlog only {min(inner)} per window: {per_second}"

    rows = api_rows(db)
    assert len({r["worker"] for r in rows}) == WORKERS  # every worker took part
    waited = sum(1 for r in rows if float(r["ratelimit_wait_ms"]) > 0)
    if dispatch:  # the backlog waited in staging (queue wait); first attempts held their dispatcher's slot
        assert waited < n / 10
    else:
        assert waited > n / 2  # waits were recorded


def test_a_429_storm_is_backed_off_as_told_and_every_request_ends_terminal(
        fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    from tars_tasks.client import TarsClient

    # The provider allows 15 requests a second and says "retry after 1 s"; the fleet limit is far higher.
    mock = mock_llm("--latency", "fixed:10", "--rpm", "15", "--window-s", "1", "--retry-after-s", "1")
    env = {**_env(fleet_env, tmp_path, mock, haiku={"max_attempts": 4, "retry_budget_s": 20}),
           "TARS_RETRY_BACKOFF_INITIAL_S": "0.05"}
    start_worker(tiers=["haiku"], concurrency=60, env=env)
    n = 120
    with TarsClient(settings=make_settings(env)) as client:
        handles = client.submit_many([{"role": "researcher", "prompt": f"storm {i}"} for i in range(n)])
        results = client.wait_many([h.id for h in handles], timeout=90)

    assert len(results) == n and all(r.done for r in results)  # none lost, none pending
    requests = request_rows(db)
    assert len(requests) == n and {r["status"] for r in requests} <= {"succeeded", "failed"}
    assert all("rate_limited" in r["error"] for r in requests if r["status"] == "failed")
    assert mock.total(MODELS["haiku"], "status_429") > 0

    rows = api_rows(db)
    assert all(r["outcome"] != "in_flight" for r in rows)
    by_request: dict[str, list[dict]] = {}
    for r in rows:
        by_request.setdefault(r["request_id"], []).append(r)
    gaps = [(b["started_at"] - a["finished_at"]).total_seconds()
            for attempts in by_request.values() for a, b in itertools.pairwise(attempts)
            if a["http_status"] == 429]
    assert gaps and min(gaps) >= 0.95  # Retry-After: 1 honoured before every retry
    assert sum(r["attempts"] for r in requests) == len(rows)  # every attempt counted on its request


@pytest.fixture
def state_redis(tmp_path):
    """A second Redis of the test's own, for the fleet state apart from the broker (TARS_REDIS_URL)."""
    from tests.helpers import PrivateRedis

    server = PrivateRedis(tmp_path).start()
    yield server.url
    server.kill()


def test_with_the_fleet_state_apart_from_the_broker_staged_first_attempts_are_paced_once(
        fleet_env, tmp_path, mock_llm, start_worker, db, state_redis):  # noqa: F811
    """TARS_REDIS_URL apart from the broker: the limiter's hashes live beside staging (the broker's
    Redis), so a dispatched first attempt's slot stands and is not taken a second time in another
    Redis (before: every staged first attempt acquired again — paced twice, waits recorded on most)."""
    import redis as redis_lib

    from tars_tasks.client import TarsClient

    mock = mock_llm("--latency", "uniform:10:40")
    env = {**_env(fleet_env, tmp_path, mock, haiku={"rpm": FLEET_RPM, "tpm": 10_000_000, "retry_budget_s": 60}),
           "TARS_REDIS_URL": state_redis}
    for _ in range(2):
        start_worker(tiers=["haiku"], concurrency=40, env=env)
    n = int(FLEET_RPM * 0.8)
    with TarsClient(settings=make_settings(env)) as client:
        handles = client.submit_many([{"role": "researcher", "prompt": f"question {i}"} for i in range(n)])
        results = client.wait_many([h.id for h in handles], timeout=120)
    assert [r.status for r in results].count("succeeded") == n
    per_second = mock.per_second(MODELS["haiku"])
    assert sum(per_second.values()) == n
    assert max(window_counts(per_second, window_s=WINDOW_S)) <= FLEET_RPM
    rows = api_rows(db)
    # one pacing, the dispatcher's: only a slot missed beyond its grace (a loaded machine) is taken again
    # in the limiter (before: every first attempt, n of n, waited in a second limiter state)
    assert sum(1 for r in rows if float(r["ratelimit_wait_ms"]) > 0) < n / 2
    ns = env["TARS_NAMESPACE"]
    assert not list(redis_lib.Redis.from_url(state_redis).scan_iter(f"{ns}:ratelimit:*"))  # no second limiter state
