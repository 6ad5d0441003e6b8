"""`tars metrics`: each series against rows and Redis state the test wrote itself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import insert

from config.keys import KOMBU_PRIORITY_SEP
from tars_tasks.celery_app import redis_priority
from tars_tasks.db.models import ApiCall, Request
from tars_tasks.metrics import make_registry
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


def _samples(settings) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in make_registry(settings=settings, min_interval_s=0).collect():
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def settings(pg_url, redis_url, redis, db):
    return make_settings({"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url,
                          "TARS_NAMESPACE": f"m{uuid.uuid4().hex[:8]}"})


def _request(**kw) -> dict:
    now = datetime.now(UTC)
    return {"id": str(uuid.uuid4()), "tenant": "t", "role": "researcher", "priority": 5, "prompt": "p",
            "submitted_at": now, "tier_requested": "haiku", "tier_used": None, "status": "queued", **kw}


def _call(request_id: str, **kw) -> dict:
    return {"id": str(uuid.uuid4()), "request_id": request_id, "attempt": 1, "provider": "simulated",
            "model": "m", "started_at": datetime.now(UTC), "outcome": "ok", **kw}


def test_requests_cost_tokens_and_rate_limit_waits_are_the_sums_of_the_rows(settings, db):
    r1 = _request(status="succeeded", tier_requested="sonnet", tier_used="haiku")  # downgraded: counts as haiku
    r2 = _request(status="failed", tier_requested="opus", tier_used="opus")
    r3 = _request(status="queued", tier_requested="sonnet")
    calls = [
        _call(r1["id"], tier="haiku", input_tokens=100, output_tokens=40, cost_usd=Decimal("0.000300"),
              ratelimit_wait_ms=Decimal("250.5")),
        _call(r1["id"], attempt=2, tier="haiku", outcome="rate_limited", input_tokens=0, output_tokens=0,
              cost_usd=Decimal(0), ratelimit_wait_ms=Decimal("0")),
        _call(r2["id"], tier="opus", outcome="transient_error", input_tokens=1000, output_tokens=0,
              cost_usd=Decimal("0.005000"), ratelimit_wait_ms=Decimal("1000")),
        _call(r2["id"], attempt=2, tier="opus", outcome="ok", input_tokens=1000, output_tokens=500,
              cost_usd=Decimal("0.017500"), ratelimit_wait_ms=Decimal("0")),
    ]
    with db.begin() as conn:
        conn.execute(insert(Request), [r1, r2, r3])
        conn.execute(insert(ApiCall), calls)
    m = _samples(settings)
    assert m["tars_requests"] == {
        (("status", "succeeded"), ("tier", "haiku")): 1.0,
        (("status", "failed"), ("tier", "opus")): 1.0,
        (("status", "queued"), ("tier", "sonnet")): 1.0,
    }
    assert m["tars_api_calls"] == {
        (("outcome", "ok"), ("tier", "haiku")): 1.0, (("outcome", "rate_limited"), ("tier", "haiku")): 1.0,
        (("outcome", "transient_error"), ("tier", "opus")): 1.0, (("outcome", "ok"), ("tier", "opus")): 1.0,
    }
    assert m["tars_cost_usd_total"] == {(("tier", "haiku"),): 0.0003, (("tier", "opus"),): 0.0225,
                                        (("tier", "sonnet"),): 0.0}
    assert m["tars_tokens_total"][(("kind", "input"), ("tier", "opus"))] == 2000
    assert m["tars_tokens_total"][(("kind", "output"), ("tier", "opus"))] == 500
    assert m["tars_tokens_total"][(("kind", "output"), ("tier", "haiku"))] == 40
    assert m["tars_ratelimit_wait_seconds_total"] == {(("tier", "haiku"),): 0.2505, (("tier", "opus"),): 1.0,
                                                      (("tier", "sonnet"),): 0.0}
    assert m["tars_ratelimit_waited_calls_total"][(("tier", "haiku"),)] == 1
    assert m["tars_ratelimit_waited_calls_total"][(("tier", "opus"),)] == 1


def test_queue_depth_is_reported_per_tier_and_tars_priority(settings, redis):
    # kombu's priority lists: TARS normal (5) is the bare queue, the others "queue<sep><step>"
    redis.rpush("tars.sonnet", b"m1", b"m2")
    redis.rpush(f"tars.sonnet{KOMBU_PRIORITY_SEP}{redis_priority(2)}", b"m3")
    redis.rpush(f"tars.opus{KOMBU_PRIORITY_SEP}{redis_priority(0)}", b"m4")
    depth = _samples(settings)["tars_queue_depth"]
    assert depth[(("priority", "5"), ("tier", "sonnet"))] == 2
    assert depth[(("priority", "2"), ("tier", "sonnet"))] == 1
    assert depth[(("priority", "0"), ("tier", "opus"))] == 1
    assert sum(depth.values()) == 4
    assert len(depth) == 30


def test_breaker_state_is_one_for_the_current_state_of_each_model(settings, redis):
    breaker_mod = pytest.importorskip("workers.breaker")
    from tars_tasks.redis_client import get_redis

    b = breaker_mod.FleetBreaker(redis_client=get_redis(settings.shared_redis_url), namespace=settings.namespace)
    b.record_failure(provider="anthropic", model="claude-opus-4-5", reason="401", trip=True)
    b.record_failure(provider="anthropic", model="claude-haiku-4-5", reason="500")
    m = _samples(settings)
    state = m["tars_breaker_state"]
    assert state[(("model", "claude-opus-4-5"), ("provider", "anthropic"), ("state", "open"))] == 1
    assert state[(("model", "claude-opus-4-5"), ("provider", "anthropic"), ("state", "closed"))] == 0
    assert state[(("model", "claude-haiku-4-5"), ("provider", "anthropic"), ("state", "closed"))] == 1
    assert m["tars_breaker_trips_total"][(("model", "claude-opus-4-5"), ("provider", "anthropic"))] == 1
    assert m["tars_breaker_consecutive_failures"][(("model", "claude-haiku-4-5"), ("provider", "anthropic"))] == 1
