"""The exact response cache end to end: real workers fill it, the coordinator answers from it at
submit (a request row ``succeeded``, answered ``exact``, $0, the dollars saved, no queue touched),
per tenant unless the tier shares, never for a request that opted out or samples without opting in.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import func, select, text

from config.catalog import DEFAULT_CATALOG_PATH
from tars_tasks.cache import CachedAnswer, ResponseCache
from tars_tasks.db.models import ApiCall
from tests.helpers import make_settings

pytestmark = pytest.mark.integration

PROMPT = "What is the boiling point of water at sea level?"


def _cache_env(fleet_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**fleet_env, "TARS_CACHE_URL": fleet_env["TARS_BROKER_URL"], **extra}


def _client(env):
    from tars_tasks.client import TarsClient

    return TarsClient(settings=make_settings(env))


def _api_calls(db) -> int:
    with db.connect() as conn:
        return conn.execute(select(func.count()).select_from(ApiCall.__table__)).scalar_one()


def _row(db, rid: str) -> dict:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM requests WHERE id = :id"), {"id": rid}).mappings().one())


def _shared_catalog(tmp_path: Path) -> Path:
    body = DEFAULT_CATALOG_PATH.read_text().replace("cache_shared = false", "cache_shared = true")
    p = tmp_path / "models.toml"
    p.write_text(body)
    return p


def test_a_repeated_deterministic_request_is_answered_at_submit_from_what_a_worker_cached(fleet_env, start_worker,
                                                                                          db):
    env = _cache_env(fleet_env)
    worker = start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=10, env=env)
    with _client(env) as tars:
        first = tars.submit(role="researcher", prompt=PROMPT, temperature=0).wait(timeout=60)
        assert first.status == "succeeded" and first.answered_by == "model" and first.cost_usd > 0
        assert first.saved_usd == 0
        worker.stop()  # nothing runs queued work from here on
        calls_before = _api_calls(db)
        h = tars.submit(role="researcher", prompt=PROMPT, temperature=0)
        second = tars.get(h.id)  # terminal at once: no worker, no queue
    assert second.status == "succeeded"
    assert second.answered_by == "exact"
    assert second.result == first.result
    assert second.cost_usd == 0 and second.attempts == 0
    assert second.saved_usd == first.cost_usd  # the call it did not make cost this (one attempt)
    assert second.model == first.model and second.tier_used == first.tier_used
    assert _api_calls(db) == calls_before
    r = redis_lib.Redis.from_url(fleet_env["TARS_BROKER_URL"])
    queued = sum(r.llen(k) for k in r.keys("tars.*") if r.type(k) == b"list")
    assert queued == 0
    row = _row(db, h.id)
    assert row["cache_digest"] == _row(db, first.id)["cache_digest"] is not None


def test_the_cache_is_per_tenant_unless_the_tier_shares_and_parameters_are_part_of_the_key(fleet_env, start_worker,
                                                                                           db, tmp_path):
    env = _cache_env(fleet_env)
    start_worker(concurrency=10, env=env)
    with _client(env) as tars:
        a = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="acme").wait(timeout=60)
        same = tars.get(tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="acme").id)
        other_tenant = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="globex")
        other_params = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="acme", max_tokens=77)
        other_system = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="acme", system="Be terse.")
        other_tier = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tenant="acme", tier="sonnet")
        rest = tars.wait_many([other_tenant.id, other_params.id, other_system.id, other_tier.id], timeout=60)
    assert a.answered_by == "model" and same.answered_by == "exact"
    assert [r.answered_by for r in rest] == ["model"] * 4

    shared = _cache_env(fleet_env, TARS_CATALOG_PATH=str(_shared_catalog(tmp_path)))
    with _client(shared) as tars:
        # the shared tier's digest has no tenant in it: a new entry, then every tenant is served
        first = tars.submit(role="researcher", prompt="shared " + PROMPT, temperature=0, tenant="acme")
        first = tars.wait(first.id, timeout=60)
        hits = [tars.get(tars.submit(role="researcher", prompt="shared " + PROMPT, temperature=0, tenant=t).id)
                for t in ("acme", "globex", "initech")]
    assert first.answered_by == "model"
    assert [h.answered_by for h in hits] == ["exact"] * 3
    assert {h.result for h in hits} == {first.result}


def test_opting_out_and_sampling_keep_a_request_away_from_the_cache_unless_it_opts_in(fleet_env, start_worker, db):
    env = _cache_env(fleet_env)
    start_worker(concurrency=10, env=env)
    with _client(env) as tars:
        # cache=False: never served, never fills
        out1 = tars.submit(role="researcher", prompt="opt out", temperature=0, cache=False).wait(timeout=60)
        out2 = tars.submit(role="researcher", prompt="opt out", temperature=0, cache=False).wait(timeout=60)
        after_out = tars.get(tars.submit(role="researcher", prompt="opt out", temperature=0).id)
        # the role's default temperature (0.3) samples: neither served nor filled by default
        s1 = tars.submit(role="researcher", prompt="sampled").wait(timeout=60)
        s2 = tars.submit(role="researcher", prompt="sampled").wait(timeout=60)
        # opting in: a sampled request fills and is served
        in1 = tars.submit(role="researcher", prompt="sampled", cache=True).wait(timeout=60)
        in2 = tars.get(tars.submit(role="researcher", prompt="sampled", cache=True).id)
        not_in = tars.submit(role="researcher", prompt="sampled").wait(timeout=60)
    assert [r.answered_by for r in (out1, out2)] == ["model", "model"]
    assert _row(db, out1.id)["cache_digest"] is None
    assert after_out.answered_by != "exact"  # the opted-out ones filled nothing
    assert [r.answered_by for r in (s1, s2)] == ["model", "model"]
    assert in1.answered_by == "model" and in2.answered_by == "exact" and in2.result == in1.result
    assert not_in.answered_by == "model"  # a sampled request that did not opt in is not served


def test_an_unreachable_cache_is_a_miss_never_a_refused_submit(fleet_env, start_worker, db):
    env = {**fleet_env, "TARS_CACHE_URL": "redis://127.0.0.1:1/0", "TARS_CACHE_TIMEOUT_S": "0.2"}
    start_worker(concurrency=10, env=env)
    with _client(env) as tars:
        results = [tars.submit(role="researcher", prompt=PROMPT, temperature=0).wait(timeout=60) for _ in range(2)]
    assert [r.status for r in results] == ["succeeded", "succeeded"]
    assert [r.answered_by for r in results] == ["model", "model"]


def test_the_cache_holds_at_most_its_bound_least_recently_used_trimmed_first(redis):
    cache = ResponseCache(redis_client=redis, namespace="bound", max_entries=3, max_entry_bytes=400)

    def answer(i: int) -> CachedAnswer:
        return CachedAnswer(text=f"answer {i}", stop_reason="end_turn", model="m", tier="haiku",
                            cost_usd=Decimal("0.001"), source_request_id=str(i))

    keys = [cache.key(model="m", digest=f"d{i}") for i in range(6)]
    for i in range(3):
        assert cache.put(key=keys[i], answer=answer(i), ttl_s=60)
    assert cache.get_many([keys[0]])[0].text == "answer 0"  # key 0 is now the most recently used
    for i in range(3, 5):
        cache.put(key=keys[i], answer=answer(i), ttl_s=60)
    found = cache.get_many(keys[:5])
    assert [f is not None for f in found] == [True, False, False, True, True]
    assert cache.stats()["entries"] == 3 and cache.stats()["evictions"] == 2
    assert len([k for k in redis.keys("bound:cache:e:*")]) == 3
    big = CachedAnswer(text="x" * 1000, stop_reason=None, model="m", tier="haiku", cost_usd=Decimal(0),
                       source_request_id="big")
    assert cache.put(key=keys[5], answer=big, ttl_s=60) is False
    assert cache.get_many([keys[5]]) == [None]


def test_each_tier_keeps_its_answers_for_its_own_ttl_and_a_tier_with_ttl_zero_caches_nothing(fleet_env, start_worker,
                                                                                             db, tmp_path, redis):
    """``cache_ttl_s`` is per tier: a worker's fill of a sonnet answer expires after sonnet's TTL (the
    catalog's 120 s here, not haiku's), and haiku at 0 neither fills nor serves."""
    body = DEFAULT_CATALOG_PATH.read_text().replace("cache_ttl_s = 3600", "cache_ttl_s = 0", 1)  # haiku's
    head, sonnet = body.split("[tiers.sonnet]", 1)
    catalog = tmp_path / "models.toml"
    catalog.write_text(head + "[tiers.sonnet]" + sonnet.replace("cache_ttl_s = 3600", "cache_ttl_s = 120", 1))
    env = _cache_env(fleet_env, TARS_CATALOG_PATH=str(catalog))
    start_worker(concurrency=10, env=env)
    with _client(env) as tars:
        s1 = tars.submit(role="researcher", prompt=PROMPT, temperature=0, tier="sonnet").wait(timeout=60)
        s2 = tars.get(tars.submit(role="researcher", prompt=PROMPT, temperature=0, tier="sonnet").id)
        h1 = tars.submit(role="researcher", prompt=PROMPT, temperature=0).wait(timeout=60)
        h2 = tars.submit(role="researcher", prompt=PROMPT, temperature=0).wait(timeout=60)
        cache = tars.coordinator.cache_lookup.cache
        key = cache.key(model=tars.catalog.spec("sonnet").model, digest=_row(db, s1.id)["cache_digest"])
    assert (s1.answered_by, s2.answered_by) == ("model", "exact")
    assert 0 < redis.pttl(key) <= 120_000
    assert [r.answered_by for r in (h1, h2)] == ["model", "model"]
    assert _row(db, h1.id)["cache_digest"] is None
    assert redis.keys(f"{env['TARS_NAMESPACE']}:cache:e:{tars.catalog.spec('haiku').model}:*") == []
