"""The semantic response cache end to end: a real worker answers a prompt and fills the exact
cache and the semantic bucket in one script; a paraphrase submitted afterwards is answered at
submit (``succeeded``, ``answered_by='semantic'``, $0, the dollars saved, the similarity), a
different question goes to the model — also when an embedding alone would have served it. Scoped
like the exact cache; critical mode takes the cheaper tier's semantic answer; bounded per bucket
and in all.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from config.keys import priority_list, queue_for_tier, semantic_bucket_key, semantic_index_key
from tars_tasks.db.models import ApiCall
from tars_tasks.errors import Overloaded
from tests.helpers import make_settings
from tests.semantic_support import needs_extra

pytestmark = [pytest.mark.integration, needs_extra]

ORIGINAL = "How many days are there in a leap year?"
PARAPHRASE = "How many days does a leap year have?"
DIFFERENT = "How many days are there in a regular year?"     # same topic, another question (cosine 0.77)
REVERSED = ("Convert 5 kilometers to miles.", "Convert 5 miles to kilometers.")  # cosine 0.99: the guard refuses


def _env(fleet_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**fleet_env, "TARS_CACHE_URL": fleet_env["TARS_BROKER_URL"], **extra}


def _client(env):
    from tars_tasks.client import TarsClient

    return TarsClient(settings=make_settings({**env, "TARS_SEMANTIC_CACHE": "true"}))


def _api_calls(db) -> int:
    with db.connect() as conn:
        return conn.execute(select(func.count()).select_from(ApiCall.__table__)).scalar_one()


def test_a_paraphrase_is_answered_at_submit_and_a_different_question_goes_to_the_model(fleet_env, start_worker, db):
    env = _env(fleet_env)
    start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=10, env=env)  # the worker has no semantic setting
    with _client(env) as tars:
        first = tars.submit(role="researcher", prompt=ORIGINAL, temperature=0).wait(timeout=60)
        assert (first.status, first.answered_by) == ("succeeded", "model")
        calls = _api_calls(db)
        h = tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0)
        para = tars.get(h.id)  # terminal at once: answered at submit
        assert _api_calls(db) == calls
        other = tars.submit(role="researcher", prompt=DIFFERENT, temperature=0).wait(timeout=60)
        rev0 = tars.submit(role="researcher", prompt=REVERSED[0], temperature=0).wait(timeout=60)
        rev1 = tars.submit(role="researcher", prompt=REVERSED[1], temperature=0).wait(timeout=60)
        # the paraphrase of the paraphrase's original, again: still semantic, from the same source
        again = tars.get(tars.submit(role="researcher", prompt="How many days does a leap year have ?",
                                     temperature=0).id)
        stats = tars.coordinator.cache_lookup.cache.stats()
    assert (para.status, para.answered_by, para.result) == ("succeeded", "semantic", first.result)
    assert para.cost_usd == 0 and para.attempts == 0 and para.saved_usd == first.cost_usd > 0
    assert para.model == first.model and para.tier_used == first.tier_used
    assert para.cache_similarity is not None and 0.9 <= para.cache_similarity <= 1.0
    assert (other.status, other.answered_by) == ("succeeded", "model")
    assert (rev0.answered_by, rev1.answered_by) == ("model", "model")
    assert _api_calls(db) == calls + 3
    assert again.answered_by in ("semantic", "exact")
    assert stats["semantic_hits"] >= 2 and stats["semantic_fills"] == 4 and stats["fills"] == 4


def test_semantic_answers_are_scoped_like_exact_ones_and_honour_the_opt_outs(fleet_env, start_worker, db):
    env = _env(fleet_env)
    start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=10, env=env)
    with _client(env) as tars:
        tars.submit(role="researcher", prompt=ORIGINAL, temperature=0).wait(timeout=60)
        sampled = tars.submit(role="researcher", prompt=ORIGINAL, temperature=0.7, cache=True).wait(timeout=60)
        assert sampled.answered_by == "model"  # another temperature: another bucket (and digest)
        got = {
            "other tenant": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0, tenant="other"),
            "opted out": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0, cache=False),
            "other system": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0, system="Be terse."),
            "sampled, no opt-in": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0.7),
            "sampled, opted in": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0.7, cache=True),
            "same scope": tars.submit(role="researcher", prompt=PARAPHRASE, temperature=0),
        }
        # read at once: answered at submit, or queued (None) / answered by the worker ('model') since
        by = {k: tars.get(h.id).answered_by or "queued" for k, h in got.items()}
    served = {k for k, v in by.items() if v == "semantic"}
    assert served == {"sampled, opted in", "same scope"}, by


def _seed(tars, *, tier: str, prompt: str, text: str) -> None:
    """A cached answer of ``tier`` for ``prompt`` with its embedding indexed, as a worker's fill leaves it."""
    from tars_tasks.cache import CachedAnswer
    from tars_tasks.schemas import request_columns, validate_spec

    co = tars.coordinator
    spec = validate_spec({"role": "analyst", "prompt": prompt, "tier": tier, "temperature": 0},
                         catalog=tars.catalog, max_prompt_chars=10_000)
    items = [(tier, "default", request_columns(spec, catalog=tars.catalog), None)]
    (verdict,) = co.cache_lookup.look_up(items)  # a miss: parks the embedding under the digest
    assert verdict.hit is None and verdict.digest
    model = tars.catalog.spec(tier).model
    cache = co.cache_lookup.cache
    cache.put(key=cache.key(model=model, digest=verdict.digest), digest=verdict.digest, ttl_s=60,
              answer=CachedAnswer(text=text, stop_reason="end_turn", model=model, tier=tier,
                                  cost_usd=Decimal("0.0002"), source_request_id="seed"))


def test_in_critical_mode_a_low_priority_paraphrase_takes_the_cheaper_tiers_semantic_answer(fleet_env, db, redis):
    env = _env(fleet_env, TARS_MAX_QUEUE_DEPTH="100", TARS_MODE_INTERVAL_S="0.05", TARS_MODE_MIN_DWELL_S="0.5")
    with _client(env) as tars:
        _seed(tars, tier="haiku", prompt=ORIGINAL, text="366 (from haiku)")
        key = priority_list(queue_for_tier("haiku"), 5)
        redis.rpush(key, *[b"{}"] * 90)  # 90% of the bound: critical
        time.sleep(0.1)
        h = tars.submit(role="analyst", prompt=PARAPHRASE, tier="sonnet", temperature=0, priority="low")
        got = tars.get(h.id)
        with pytest.raises(Overloaded):
            tars.submit(role="analyst", prompt=DIFFERENT, tier="sonnet", temperature=0, priority="low")
    assert (got.status, got.answered_by, got.result, got.served_mode, got.tier_used) == (
        "succeeded", "semantic", "366 (from haiku)", "critical", "haiku")


def test_the_semantic_index_is_bounded_per_bucket_and_in_all(fleet_env, db):
    env = _env(fleet_env, TARS_SEMANTIC_MAX_CANDIDATES="3", TARS_CACHE_MAX_ENTRIES="4")
    prompts = [f"Tell me a fact about the number {n}." for n in range(6)]  # one bucket: only the prompt differs
    with _client(env) as tars:
        for i, p in enumerate(prompts):
            _seed(tars, tier="haiku", prompt=p, text=f"fact {i}")
        r = redis_lib.Redis.from_url(env["TARS_CACHE_URL"])
        ns = env["TARS_NAMESPACE"]
        buckets = r.keys(semantic_bucket_key(ns, "*"))
        assert len(buckets) == 1 and r.hlen(buckets[0]) == 3  # the 3 latest fills
        assert r.zcard(semantic_index_key(ns)) == 3
        for i, p in enumerate(prompts[:2]):
            _seed(tars, tier="sonnet", prompt=p, text=f"sonnet fact {i}")  # another model: another bucket
        assert r.zcard(semantic_index_key(ns)) == 4  # the global bound (cache_max_entries)
        assert sum(r.hlen(b) for b in r.keys(semantic_bucket_key(ns, "*"))) == 4
        # the newest answer is still served for its paraphrase (numbers equal), the trimmed ones are not
        newest = tars.get(tars.submit(role="analyst", prompt="Tell me one fact about the number 5.", tier="haiku",
                                      temperature=0).id)
        oldest = tars.get(tars.submit(role="analyst", prompt="Tell me one fact about the number 0.", tier="haiku",
                                      temperature=0).id)
    assert (newest.answered_by, newest.result) == ("semantic", "fact 5")
    assert oldest.answered_by is None


def test_parked_embeddings_of_misses_never_answered_stay_within_the_bound(fleet_env, db):
    from config.keys import semantic_pending_index_key, semantic_pending_key

    env = _env(fleet_env, TARS_CACHE_MAX_ENTRIES="4")
    with _client(env) as tars:  # no worker: nothing is ever filled
        for n in range(7):
            tars.submit(role="analyst", prompt=f"What is {n} squared?", tier="haiku", temperature=0)
        r = redis_lib.Redis.from_url(env["TARS_CACHE_URL"])
        ns = env["TARS_NAMESPACE"]
        parked = r.keys(semantic_pending_key(ns, "*", "*"))
        assert len(parked) == 4 and r.zcard(semantic_pending_index_key(ns)) == 4
        assert tars.coordinator.cache_lookup.cache.stats()["semantic_misses"] == 7
