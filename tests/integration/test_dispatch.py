"""Dispatch with real processes on real Redis: concurrent dispatchers share the limits exactly,
and a dispatcher SIGKILLed at any moment loses and duplicates nothing.

Each dispatcher process runs the same loop a worker's dispatcher would (``Dispatcher.dispatch``
on Redis' clock) and prints what it moved; the test checks the union.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
from collections import Counter

import pytest

from config.keys import queue_for_tier, stage_parked_key, stage_queue_key, stage_ring_key
from tests.helpers import start_producer_script
from workers.dispatch import PRIORITIES, StagedMessage, Staging, celery_list

pytestmark = pytest.mark.integration

TIER = "haiku"

#: argv: redis url, namespace, model rpm, window s, seconds to run, max moves per step, sleep s between steps,
#: json of {tenant: rpm}.
DISPATCHER_CHILD = r"""
import json, sys, time
import redis
from config.catalog import load_catalog
from config.tenants import TenantConfig, TenantSpec
from workers.dispatch import Dispatcher, LimitWindow

url, ns, rpm, window_s, run_s, moves, pause_s, caps = sys.argv[1:9]
cat = load_catalog()
cat = cat.model_copy(update={"tiers": {t: s.model_copy(update={"rpm": int(rpm), "tpm": 10**12})
                                       for t, s in cat.tiers.items()}})
tenants = TenantConfig(tenants={t: TenantSpec(rpm=r) for t, r in json.loads(caps).items()})
d = Dispatcher(redis_client=redis.Redis.from_url(url), namespace=ns, catalog=cat, tenants=tenants,
               limits=LimitWindow(window_s=float(window_s), utilisation=1.0), horizon_s=0.05)
d.publish_tenant_config()
print("ready", flush=True)
out, steps = [], 0
deadline = time.monotonic() + float(run_s)
while time.monotonic() < deadline:
    res = d.dispatch(tier="haiku", max_moves=int(moves))
    steps += 1
    out += [[r.id, r.tenant, r.slot_us] for r in res.moved]
    time.sleep(float(pause_s))
print(json.dumps({"moved": out, "steps": steps}), flush=True)
"""


def _stage(redis, ns: str, *, tenants: dict[str, int], start: int = 0) -> list[str]:
    """Stage ``tenants[t]`` entries per tenant, priorities cycling 0..9; returns their ids."""
    msgs = [StagedMessage(id=f"{t}-{start + i}", tier=TIER, priority=(start + i) % 10, tenant=t, tokens=5,
                          body=json.dumps({"id": f"{t}-{start + i}"}))
            for t, n in tenants.items() for i in range(n)]
    Staging(redis_client=redis, namespace=ns).stage(msgs)
    return [m.id for m in msgs]


def _in_celery(redis) -> list[str]:
    lists = {celery_list(queue_for_tier(TIER), p) for p in PRIORITIES}
    return [json.loads(raw)["id"] for name in lists for raw in redis.lrange(name, 0, -1)]


def _still_staged(redis, ns: str, tenants) -> list[str]:
    out = []
    for p in PRIORITIES:
        for t in tenants:
            out += [raw.decode().split("|", 2)[1] for raw in redis.lrange(stage_queue_key(ns, TIER, p, t), 0, -1)]
    return out


def _assert_rings_consistent(redis, ns: str, tenants) -> None:
    """Every tenant with staged work is in its priority's ring or parked set exactly once, and no other."""
    parked = [x.decode().split(":", 1) for x in redis.zrange(stage_parked_key(ns, TIER), 0, -1)]
    for p in PRIORITIES:
        ring = Counter(x.decode() for x in redis.lrange(stage_ring_key(ns, TIER, p), 0, -1))
        ring.update(t for q, t in parked if int(q) == p)
        with_work = {t for t in tenants if redis.llen(stage_queue_key(ns, TIER, p, t))}
        assert set(ring) == with_work and all(n == 1 for n in ring.values()), (p, ring, with_work)


def test_four_concurrent_dispatchers_never_overlap_a_reservation_of_the_model_or_a_tenant(redis, redis_url):
    ns = "disp4"
    window_s, model_rpm, capped_rpm = 2.0, 200, 20  # the model: one slot per 10 ms; "capped": one per 100 ms
    ids = _stage(redis, ns, tenants={"free": 1500, "capped": 300})
    caps = json.dumps({"capped": capped_rpm})
    kids = [start_producer_script(DISPATCHER_CHILD, {}, args=[redis_url, ns, str(model_rpm), str(window_s), "4",
                                                              "7", "0.003", caps]) for _ in range(4)]
    results = []
    for k in kids:
        out, err = k.communicate(timeout=90)
        assert k.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    moved = [m for r in results for m in r["moved"]]
    assert all(r["moved"] for r in results)  # all four took part

    moved_ids = [m[0] for m in moved]
    assert len(moved_ids) == len(set(moved_ids))  # no entry moved twice
    assert Counter(_in_celery(redis)) == Counter(moved_ids)  # and what was moved is what the queues hold
    assert sorted(moved_ids + _still_staged(redis, ns, ["free", "capped"])) == sorted(ids)

    model_gap_us = window_s * 1e6 / model_rpm
    slots = sorted(m[2] for m in moved)
    assert len(slots) > 4 * 0.5 / (model_gap_us / 1e6)  # the run went through a few hundred slots
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= model_gap_us, "two dispatchers reserved overlapping model slots"
    capped = sorted(m[2] for m in moved if m[1] == "capped")
    capped_gaps = [b - a for a, b in itertools.pairwise(capped)]
    assert len(capped) >= 20 and min(capped_gaps) >= window_s * 1e6 / capped_rpm
    # the capped tenant waited for its own limit, in order: its entries left staging oldest first
    order = [int(m[0].split("-")[1]) for m in sorted(moved, key=lambda m: m[2]) if m[1] == "capped"]
    staged_order = [int(i.split("-")[1]) for i in ids if i.startswith("capped")]
    by_prio = {p: [i for i in staged_order if i % 10 == p] for p in PRIORITIES}
    for p, seq in by_prio.items():
        got = [i for i in order if i % 10 == p]
        assert got == seq[: len(got)]
    _assert_rings_consistent(redis, ns, ["free", "capped"])


def test_a_dispatcher_killed_again_and_again_mid_dispatch_loses_and_duplicates_nothing(redis, redis_url):
    ns = "dispkill"
    tenants = ["a", "b", "c"]
    ids = _stage(redis, ns, tenants={t: 1500 for t in tenants})
    staging = Staging(redis_client=redis, namespace=ns)
    rng = random.Random(9)
    kills = 0
    moved_before = 0
    for round_ in range(12):
        # 1000 moves a second at most (window 1 s), up to 11 per step, no pause: the kill lands mid-loop
        kid = start_producer_script(DISPATCHER_CHILD, {}, args=[redis_url, ns, "1000", "1", "60", "11", "0", "{}"])
        assert kid.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        ids += _stage(redis, ns, tenants={t: 20 for t in tenants}, start=10_000 + 100 * round_)  # staging goes on
        time.sleep(rng.uniform(0.0, 0.2))
        kid.send_signal(signal.SIGKILL)
        kid.communicate(timeout=30)
        assert kid.returncode == -signal.SIGKILL
        kills += 1
        now_moved = len(_in_celery(redis))
        assert now_moved > moved_before  # it was killed while it was dispatching
        moved_before = now_moved

    in_celery, staged = _in_celery(redis), _still_staged(redis, ns, tenants)
    assert kills == 12 and staged  # killed before it could finish
    assert len(in_celery) == len(set(in_celery))  # nothing duplicated
    assert sorted(in_celery + staged) == sorted(ids)  # nothing lost: staged = dispatched + still staged
    assert staging.staged_count(tier=TIER) == len(staged)
    _assert_rings_consistent(redis, ns, tenants)
