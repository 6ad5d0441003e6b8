"""The fleet mode across processes: several producer processes see one mode sequence, every
transition is one ``mode_changes`` row, and every request records the mode it was admitted under
(high load moves below-high priority off sonnet/opus; critical refuses uncached low priority)."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import redis as redis_lib
from sqlalchemy import text

from config.keys import priority_list, queue_for_tier
from tars_tasks.errors import Overloaded
from tests.helpers import make_settings, start_producer_script

pytestmark = pytest.mark.integration

WATCHER = r"""
import json, sys, time
import redis
from config.catalog import load_catalog
from config.settings import Settings
from tars_tasks.db.engine import get_engine
from tars_tasks.fleetmode import FleetModeSource
s = Settings()
src = FleetModeSource.for_settings(settings=s, catalog=load_catalog(), engine=get_engine(s.database_url))
r = redis.Redis.from_url(s.broker_url)
r.incr("watchers-ready")
seen = []
deadline = time.monotonic() + 120
while not r.exists("watchers-stop") and time.monotonic() < deadline:
    v = src.current()
    if not seen or seen[-1] != [v.seq, str(v.mode)]:
        seen.append([v.seq, str(v.mode)])
    time.sleep(0.01)
print(json.dumps(seen))
"""


def _until(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _env(fleet_env: dict[str, str]) -> dict[str, str]:
    return {**fleet_env, "TARS_MAX_QUEUE_DEPTH": "100", "TARS_MODE_INTERVAL_S": "0.05",
            "TARS_MODE_MIN_DWELL_S": "0.5"}


def _fill(r: redis_lib.Redis, n: int) -> None:
    """Make the haiku queue hold ``n`` messages (nothing consumes them: no workers)."""
    key = priority_list(queue_for_tier("haiku"), 5)
    r.delete(key)
    if n:
        r.rpush(key, *[b"{}"] * n)


def test_several_producer_processes_see_one_mode_sequence_and_each_transition_is_one_row(fleet_env, db, redis):
    from tars_tasks.fleetmode import ModeBook

    env = _env(fleet_env)
    procs = [start_producer_script(WATCHER, env) for _ in range(3)]
    assert _until(lambda: int(redis.get("watchers-ready") or 0) == 3, timeout=60)
    book = ModeBook(redis_client=redis, namespace=env["TARS_NAMESPACE"], settings=make_settings(env))
    # each load held until the watchers' decisions have moved the fleet's mode where it leads
    steps = [(70, "high_load"), (90, "critical"), (10, "optimal"), (90, "critical"), (0, "optimal")]
    for n, expected in steps:
        _fill(redis, n)
        assert _until(lambda expected=expected: book.read().mode == expected), (n, expected, book.read())
    redis.set("watchers-stop", 1)
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    seen = [json.loads(out) for out, _ in outs]
    by_seq: dict[int, set[str]] = {}
    for s in seen:
        assert [seq for seq, _ in s] == sorted(seq for seq, _ in s)  # never back in time
        for seq, mode in s:
            by_seq.setdefault(seq, set()).add(mode)
    assert all(len(modes) == 1 for modes in by_seq.values()), by_seq  # one mode per transition number
    with db.connect() as conn:
        rows = conn.execute(text("SELECT seq, from_mode, to_mode, reason, signals FROM mode_changes "
                                 "WHERE namespace = :ns ORDER BY seq"), {"ns": env["TARS_NAMESPACE"]}).all()
    assert [r.to_mode for r in rows] == [m for _, m in steps]  # each transition once, none in between
    assert [r.seq for r in rows] == list(range(1, len(steps) + 1))
    assert all(a.to_mode == b.from_mode for a, b in itertools.pairwise(rows))
    assert all(by_seq[r.seq] == {r.to_mode} for r in rows if r.seq in by_seq)
    assert all(r.reason and "queue_load" in r.signals for r in rows)


def test_every_request_records_the_mode_it_was_admitted_under_and_the_mode_degrades_it(fleet_env, db, redis):
    from tars_tasks.client import TarsClient

    env = _env(fleet_env)
    with TarsClient(settings=make_settings(env)) as tars:
        calm = tars.submit(role="analyst", prompt="calm", priority="low")
        _fill(redis, 70)
        time.sleep(0.1)
        busy_normal = tars.submit(role="analyst", prompt="busy", tier="sonnet")
        busy_high = tars.submit(role="analyst", prompt="busy", tier="opus", priority="high")
        busy_opus = tars.submit(role="analyst", prompt="busy", tier="opus", priority=3)
        _fill(redis, 88)
        time.sleep(0.1)
        tars.submit(role="analyst", prompt="critical", priority=5)
        with pytest.raises(Overloaded, match="critical"):
            tars.submit(role="analyst", prompt="critical and low", priority="low")
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT id, served_mode, tier_requested, tier_queued, prompt, "
                                                   "priority FROM requests"))}
    assert rows[calm.id].served_mode == "optimal"
    assert (rows[busy_normal.id].served_mode, rows[busy_normal.id].tier_queued) == ("high_load", "haiku")
    assert (rows[busy_high.id].tier_requested, rows[busy_high.id].tier_queued) == ("opus", "opus")
    assert rows[busy_opus.id].tier_queued == "sonnet"
    assert {r.served_mode for r in rows.values() if r.prompt == "critical"} == {"critical"}
    assert not [r for r in rows.values() if r.prompt == "critical and low"]  # refused: nothing written


def test_in_critical_mode_a_low_priority_request_is_answered_from_cache_even_the_cheaper_tiers(fleet_env, db,
                                                                                              redis):
    from decimal import Decimal

    from tars_tasks.cache import CachedAnswer
    from tars_tasks.client import TarsClient
    from tars_tasks.schemas import request_columns, validate_spec

    env = {**_env(fleet_env), "TARS_CACHE_URL": fleet_env["TARS_BROKER_URL"]}
    with TarsClient(settings=make_settings(env)) as tars:
        co = tars.coordinator
        spec = validate_spec({"role": "analyst", "prompt": "cached", "tier": "sonnet", "temperature": 0},
                             catalog=tars.catalog, max_prompt_chars=10_000)
        cols = request_columns(spec, catalog=tars.catalog)
        digest = co.cache_lookup.digest_for(tier="haiku", tenant="default", columns=cols, opt=None)
        cache = co.cache_lookup.cache
        cache.put(key=cache.key(model=tars.catalog.spec("haiku").model, digest=digest),
                  answer=CachedAnswer(text="from haiku", stop_reason="end_turn", model=tars.catalog.spec("haiku").model,
                                      tier="haiku", cost_usd=Decimal("0.0002"), source_request_id="x"), ttl_s=60)
        _fill(redis, 90)
        time.sleep(0.1)
        h = tars.submit(role="analyst", prompt="cached", tier="sonnet", temperature=0, priority="low")
        got = tars.get(h.id)
        with pytest.raises(Overloaded):
            tars.submit(role="analyst", prompt="not cached", tier="sonnet", temperature=0, priority="low")
    assert (got.status, got.answered_by, got.result, got.served_mode) == ("succeeded", "exact", "from haiku",
                                                                          "critical")
    assert got.saved_usd == Decimal("0.0002") and got.tier_used == "haiku"


def test_a_redis_that_lost_the_mode_numbers_again_from_one_and_its_transitions_still_get_rows(fleet_env, db,
                                                                                                redis):
    from config.catalog import load_catalog
    from tars_tasks.fleetmode import FleetModeSource, ModeBook

    settings = make_settings(_env(fleet_env))
    loads = iter([0.9, 0.9])
    book = ModeBook(redis_client=redis, namespace=settings.namespace, settings=settings)
    src = FleetModeSource(settings=settings, catalog=load_catalog(), book=book, engine=db,
                          measure=lambda: {"queue_load": next(loads)}, clock=iter(range(0, 1000, 10)).__next__)
    assert src.current().seq == 1
    redis.delete(book.key, book.log_key)  # Redis lost the mode (restart without persistence, a flush)
    time.sleep(0.01)
    assert src.current().seq == 1  # numbered from 1 again
    with db.connect() as conn:
        rows = conn.execute(text("SELECT seq, to_mode FROM mode_changes WHERE namespace = :ns ORDER BY at"),
                            {"ns": settings.namespace}).all()
    assert [(r.seq, r.to_mode) for r in rows] == [(1, "critical"), (1, "critical")]


def test_work_queued_before_the_fleet_went_to_high_load_runs_on_the_cheaper_tier(fleet_env, db, redis,
                                                                                start_worker):
    """The mode applies to queued work too (workers read it): sonnet/opus requests below high priority
    admitted in optimal mode and still queued when the fleet reaches high load run on the tier's
    fallback, one step down, and record the mode that moved them; high priority keeps its tier."""
    from tars_tasks.client import TarsClient

    env = _env(fleet_env)
    with TarsClient(settings=make_settings(env)) as tars:
        normal = [tars.submit(role="analyst", prompt=f"queued {i}", tier="sonnet") for i in range(5)]
        high = tars.submit(role="analyst", prompt="queued high", tier="opus", priority="high")
        low_opus = tars.submit(role="analyst", prompt="queued low opus", tier="opus", priority=3)
        _fill(redis, 70)  # haiku's queue at 70% of the bound (no haiku worker runs: it stays there)
        time.sleep(0.1)
        tars.submit(role="analyst", prompt="decides", tier="haiku", priority="high")  # the mode moves now
        start_worker(tiers=["sonnet", "opus"], concurrency=10, env=env)
        results = tars.wait_many([h.id for h in [*normal, high, low_opus]], timeout=60)
    assert {r.status for r in results} == {"succeeded"}
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT id, served_mode, tier_queued, tier_used FROM requests"))}
    assert {(rows[h.id].tier_queued, rows[h.id].tier_used, rows[h.id].served_mode) for h in normal} == {
        ("sonnet", "haiku", "high_load")}
    assert (rows[high.id].tier_used, rows[high.id].served_mode) == ("opus", "optimal")
    assert (rows[low_opus.id].tier_used, rows[low_opus.id].served_mode) == ("sonnet", "high_load")


def _cache_answer(tars, *, tier: str, prompt: str, text_: str, cost: str) -> None:
    """Put ``text_`` in the response cache as the answer ``tier`` gave to ``prompt`` (analyst, temperature 0)."""
    from decimal import Decimal

    from tars_tasks.cache import CachedAnswer
    from tars_tasks.schemas import request_columns, validate_spec

    co = tars.coordinator
    spec = validate_spec({"role": "analyst", "prompt": prompt, "tier": tier, "temperature": 0},
                         catalog=tars.catalog, max_prompt_chars=10_000)
    cols = request_columns(spec, catalog=tars.catalog)
    digest = co.cache_lookup.digest_for(tier=tier, tenant="default", columns=cols, opt=None)
    cache, model = co.cache_lookup.cache, tars.catalog.spec(tier).model
    cache.put(key=cache.key(model=model, digest=digest), ttl_s=60,
              answer=CachedAnswer(text=text_, stop_reason="end_turn", model=model, tier=tier,
                                  cost_usd=Decimal(cost), source_request_id="x"))


def test_a_request_moved_to_a_cheaper_tier_is_still_answered_from_its_own_tiers_cache(fleet_env, db, redis):
    """High load and critical move below-high-priority sonnet work to haiku; a sonnet answer already in
    the cache is still the request's, at $0: high load serves it instead of a haiku call, critical
    serves it instead of refusing low priority (the old code looked up only the tier it moved to:
    a haiku call, and Overloaded)."""
    from decimal import Decimal

    from tars_tasks.client import TarsClient

    env = {**_env(fleet_env), "TARS_CACHE_URL": fleet_env["TARS_BROKER_URL"]}
    with TarsClient(settings=make_settings(env)) as tars:
        _cache_answer(tars, tier="sonnet", prompt="asked of sonnet", text_="from sonnet", cost="0.003")
        _fill(redis, 70)
        time.sleep(0.1)
        busy = tars.get(tars.submit(role="analyst", prompt="asked of sonnet", tier="sonnet", temperature=0).id)
        _fill(redis, 90)
        time.sleep(0.1)
        low = tars.get(tars.submit(role="analyst", prompt="asked of sonnet", tier="sonnet", temperature=0,
                                   priority="low").id)
        with pytest.raises(Overloaded):  # nothing cached for this one: refused as before
            tars.submit(role="analyst", prompt="never asked", tier="sonnet", temperature=0, priority="low")
    for got, mode in ((busy, "high_load"), (low, "critical")):
        assert (got.status, got.answered_by, got.result, got.served_mode) == ("succeeded", "exact", "from sonnet",
                                                                              mode)
        assert got.tier_used == "sonnet" and got.cost_usd == 0 and got.saved_usd == Decimal("0.003")


def test_a_plain_celery_request_records_the_fleet_mode_its_worker_served_it_under(fleet_env, db, redis,
                                                                                  start_worker):
    """A message from a producer that has only Celery skips admission; the worker that records its row
    records the fleet's mode too (the old code left ``served_mode`` empty unless the mode moved it)."""
    import uuid

    from celery import Celery

    from tars_tasks.fleetmode import ModeBook
    from tests.faults.harness import wait_terminal

    env = {**_env(fleet_env), "TARS_MODE_MIN_DWELL_S": "600"}  # held in high load for the test
    book = ModeBook(redis_client=redis, namespace=env["TARS_NAMESPACE"], settings=make_settings(env))
    assert book.decide({"queue_load": 0.7})[0].mode == "high_load"
    stock = Celery("someone-else", broker=fleet_env["TARS_BROKER_URL"])
    rids = [str(uuid.uuid4()) for _ in range(2)]
    for rid, tier in zip(rids, ("haiku", "sonnet"), strict=True):
        stock.send_task("tars.run_request", kwargs={"role": "researcher", "prompt": "plain", "tier": tier},
                        task_id=rid, queue=f"tars.{tier}")
    start_worker(tiers=["haiku", "sonnet"], concurrency=4, env=env)
    assert wait_terminal(db, rids, timeout=60)
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT id, status, served_mode, tier_used FROM requests"))}
    assert [(rows[r].status, rows[r].served_mode) for r in rids] == [("succeeded", "high_load")] * 2
    assert [rows[r].tier_used for r in rids] == ["haiku", "haiku"]  # the sonnet one moved, as queued work does
