"""Bundles (issue 13, ``tars_tasks.bundles``): several requests of one (tier, priority) in one broker
message, with per-request semantics kept. Real worker processes, real Redis and Postgres.

Each test first checks what is in the broker before any worker runs (the bundles formed): on
code without bundling (``submit_many`` sends one message per request) those checks fail. The
tests marked ``staged`` run with dispatch on (the default path: bundles wait in staging, and the
dispatcher moves them whole, one rate-limit slot per member); ``published`` with dispatch off.
"""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import pytest
import redis as redis_lib
from sqlalchemy import text

from config.keys import TASK_RUN_BUNDLE, TASK_RUN_REQUEST, stage_prefix
from tars_tasks.broker.presence import tier_lists
from tests.faults.harness import wait_until
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


PATHS = pytest.mark.parametrize("staged", [False, True], ids=["published", "staged"])


def _bundle_env(fleet_env: dict[str, str], *, size: int = 8, staged: bool = False, **extra: str) -> dict[str, str]:
    return {**fleet_env, "TARS_DISPATCH_ENABLED": "true" if staged else "false", "TARS_BUNDLE_MAX": str(size),
            **extra}


def _client(env):
    from tars_tasks.client import TarsClient

    return TarsClient(settings=make_settings(env))


def _messages(env, tiers=("haiku", "sonnet", "opus")) -> list[tuple[str, str, list[str]]]:
    """(list name, task name, request ids) of every message waiting in the tiers' Celery lists and,
    with dispatch on, in staging (a staged entry's tokens checked against its members)."""
    r = redis_lib.Redis.from_url(env["TARS_BROKER_URL"])
    namespace = make_settings(env).namespace
    out = []
    for key in tier_lists(tiers):
        out += [(key, *_decode(raw)) for raw in r.lrange(key, 0, -1)]
    for tier in tiers:
        for key in sorted(r.scan_iter(match=f"{stage_prefix(namespace, tier)}:q:*")):
            for entry in r.lrange(key, 0, -1):
                tokens, entry_id, body = entry.decode().split("|", 2)
                task, ids = _decode(body)
                assert len(tokens.split(",")) == len(ids)  # one reservation per member
                assert entry_id == (ids[0] if task == TASK_RUN_REQUEST else json.loads(body)["headers"]["id"])
                out.append((key.decode(), task, ids))
    r.close()
    return out


def _decode(raw: bytes | str) -> tuple[str, list[str]]:
    m = json.loads(raw)
    _args, kwargs, _embed = json.loads(base64.b64decode(m["body"]))
    task = m["headers"]["task"]
    return task, kwargs["request_ids"] if task == TASK_RUN_BUNDLE else [kwargs["request_id"]]




@PATHS
def test_submit_many_of_mixed_tiers_and_priorities_forms_one_bundle_per_tier_and_priority(
    fleet_env, start_worker, db, staged
):
    env = _bundle_env(fleet_env, size=4, staged=staged)
    specs = []
    for i in range(22):  # haiku low x6, haiku high x6, sonnet low x5, sonnet high x5 (interleaved)
        tier = "haiku" if i % 4 < 2 else "sonnet"
        specs.append({"role": "researcher", "prompt": f"q {i}", "tier": tier, "priority": ["low", "high"][i % 2]})
    specs.append({"role": "researcher", "prompt": "alone", "tier": "opus"})
    with _client(env) as tars:
        handles = tars.submit_many(specs)
        msgs = _messages(env)
        by_id = {h.id: (s["tier"], s.get("priority")) for h, s in zip(handles, specs, strict=True)}
        # every request is in exactly one message; a bundle's members share tier and priority
        assert sorted(i for _, _, ids in msgs for i in ids) == sorted(by_id)
        lists_by_group: dict[tuple, set[str]] = {}
        for key, task, ids in msgs:
            groups = {by_id[i] for i in ids}
            assert len(groups) == 1, (key, groups)
            lists_by_group.setdefault(groups.pop(), set()).add(key)
            assert len(ids) <= 4
            assert (task == TASK_RUN_BUNDLE) == (len(ids) > 1)
        # 6, 6, 5, 5 in runs of <= 4: 2 bundles each; the lone opus request is a plain single message
        assert sorted(len(ids) for _, _, ids in msgs) == [1, 1, 1, 2, 2, 4, 4, 4, 4]
        assert [t for _, t, ids in msgs if ids == [handles[-1].id]] == [TASK_RUN_REQUEST]
        # each (tier, priority) has its own priority list, as single messages would
        assert all(len(keys) == 1 for keys in lists_by_group.values())
        assert len({k for keys in lists_by_group.values() for k in keys}) == 5
        start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=4, env=env)
        results = tars.wait_many([h.id for h in handles], timeout=120)
    assert {r.status for r in results} == {"succeeded"}
    assert all(r.tier_used == by_id[r.id][0] for r in results)
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_calls")).scalar() == len(specs)


@PATHS
def test_a_worker_killed_mid_bundle_reruns_only_the_unfinished_members(fleet_env, start_worker, db, staged):
    n = 16
    env = _bundle_env(fleet_env, size=n, staged=staged, TARS_SIM_LATENCY="uniform:200:6000")
    with _client(env) as tars:
        handles = tars.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(n)])
        msgs = _messages(env)
        assert [(t, len(ids)) for _, t, ids in msgs] == [(TASK_RUN_BUNDLE, n)]  # one message for all 16
        # concurrency n: its members run at once (a worker runs at most its concurrency of requests,
        # bundle members included), so the kill finds some in flight
        victim = start_worker(tiers=["haiku"], concurrency=n, env=env)

        def finished_on_victim():
            with db.connect() as conn:
                rows = conn.execute(text("SELECT id FROM requests WHERE status = 'succeeded'")).scalars().all()
            return rows if 3 <= len(rows) <= n - 3 else None

        wait_until(finished_on_victim, timeout=60, interval=0.05)
        victim.kill()  # SIGKILL mid-bundle: the bundle is not acked
        victim.proc.wait(10)
        with db.connect() as conn:
            done_before = set(conn.execute(text("SELECT id FROM requests WHERE status = 'succeeded'")).scalars())
        assert 3 <= len(done_before) <= n - 1
        start_worker(tiers=["haiku"], concurrency=n, env=env)
        results = tars.wait_many([h.id for h in handles], timeout=120)
    assert [r.status for r in results] == ["succeeded"] * n
    with db.connect() as conn:
        calls = conn.execute(text("SELECT request_id, outcome, worker FROM api_calls")).all()
        rows = {r.id: r for r in conn.execute(text("SELECT id, attempts, cost_usd, worker FROM requests")).all()}
        billed = dict(conn.execute(text("SELECT request_id, sum(cost_usd) FROM api_calls GROUP BY request_id")).all())
    ok = [c for c in calls if c.outcome == "ok"]
    assert len(ok) == n  # every request answered once: not N + k
    assert {c.outcome for c in calls} <= {"ok", "unknown"}  # the killed in-flight calls: billed, unknown
    for rid in done_before:  # finished before the kill: never run again
        assert [c.outcome for c in calls if str(c.request_id) == rid] == ["ok"]
        assert rows[rid].attempts == 1 and rows[rid].worker.startswith(victim.name)
    rerun = {str(c.request_id) for c in calls if c.outcome == "unknown"}
    assert rerun and not rerun & done_before
    assert all(rows[rid].cost_usd == billed[rid] for rid in rows)  # totals equal the bill


@PATHS
def test_a_high_priority_request_waits_at_most_the_bundles_a_worker_holds_not_the_backlog(
    fleet_env, start_worker, db, staged
):
    size, low_n = 4, 32
    env = _bundle_env(fleet_env, size=size, staged=staged, TARS_SIM_LATENCY="fixed:400")
    with _client(env) as tars:
        low = tars.submit_many([{"role": "researcher", "prompt": f"low {i}", "priority": "low"}
                                for i in range(low_n)])
        assert sorted(len(ids) for _, _, ids in _messages(env)) == [size] * (low_n // size)
        start_worker(tiers=["haiku"], concurrency=1, env=env)

        def low_started():
            with db.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM api_calls")).scalar() > 0

        wait_until(low_started, timeout=60, interval=0.02)
        high = tars.submit(role="researcher", prompt="urgent", priority="high")
        results = tars.wait_many([h.id for h in low] + [high.id], timeout=120)
    by_start = sorted(results, key=lambda r: r.started_at)
    before_high = [r for r in by_start if r.started_at < by_start[[r.id for r in by_start].index(high.id)].started_at]
    # one slot, prefetch 2: the bundle running and at most two held behind it, never the backlog
    held = size * (1 + 2)
    assert len(before_high) <= held, len(before_high)
    assert low_n - len(before_high) >= low_n - held
    assert {r.status for r in results} == {"succeeded"}


def test_a_bundles_finished_members_free_their_slots_before_the_bundle_ends(fleet_env, start_worker, db):
    """Eight slots, all held by a bundle of eight whose calls take U(0.1, 3) s, then one request
    more: it starts once the first member has finished (not before: the slots were full) and
    before the last has (its slot was free; counted until the bundle's end, it waited for all)."""
    env = _bundle_env(fleet_env, size=8, staged=True, TARS_SIM_LATENCY="uniform:100:3000")
    with _client(env) as tars:
        bundle = tars.submit_many([{"role": "researcher", "prompt": f"b {i}"} for i in range(8)])
        assert [len(ids) for _, _, ids in _messages(env)] == [8]
        start_worker(tiers=["haiku"], concurrency=8, env=env)

        def all_in_flight():
            with db.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM api_calls")).scalar() == 8

        wait_until(all_in_flight, timeout=60, interval=0.01)
        extra = tars.submit(role="researcher", prompt="one more")
        results = {r.id: r for r in tars.wait_many([b.id for b in bundle] + [extra.id], timeout=120)}
    assert {r.status for r in results.values()} == {"succeeded"}
    members = [results[b.id] for b in bundle]
    first_done = min(r.finished_at for r in members)
    last_done = max(r.finished_at for r in members)
    assert first_done < results[extra.id].started_at < last_done


@PATHS
def test_a_budget_refusal_inside_a_bundle_fails_that_member_only_and_the_budget_holds(
    fleet_env, start_worker, db, staged
):
    from tars_tasks.budgets import Budgets
    from tars_tasks.redis_client import get_redis

    env = _bundle_env(fleet_env, size=8, staged=staged, TARS_SIM_LATENCY="uniform:50:150")
    s = make_settings(env)
    b = Budgets(redis_client=get_redis(s.shared_redis_url, settings=s), namespace=s.namespace,
                lease_s=s.budget_reservation_lease_s)
    limit = Decimal("0.05")
    b.set_limit(tenant="acme", period="day", usd=limit)
    with _client(env) as tars:
        handles = tars.submit_many([{"role": "researcher", "prompt": f"question {i} " + "words " * 200,
                                     "tenant": "acme", "max_tokens": 400} for i in range(120)])
        assert sorted(len(ids) for _, _, ids in _messages(env)) == [8] * 15
        start_worker(tiers=["haiku"], concurrency=4, env=env)
        results = tars.wait_many([h.id for h in handles], timeout=120)
    statuses = [(r.status, r.failure_reason) for r in results]
    ok, refused = statuses.count(("succeeded", None)), statuses.count(("failed", "budget"))
    assert ok + refused == 120 and ok > 0 and refused > 0
    with db.connect() as conn:
        real = conn.execute(text("SELECT coalesce(sum(cost_usd), 0) FROM api_calls")).scalar_one()
        billed_refused = conn.execute(text("SELECT count(*) FROM requests r WHERE failure_reason = 'budget' AND "
                                           "EXISTS (SELECT 1 FROM api_calls a WHERE a.request_id = r.id)")).scalar_one()
    day = b.state("acme")[0]
    assert real <= limit and day.reserved_usd == 0 and day.spent_usd == real
    assert billed_refused == 0


def test_a_cache_hit_in_a_submit_many_is_answered_at_submit_and_left_out_of_its_bundle(fleet_env, start_worker, db):
    env = _bundle_env(fleet_env, size=8, TARS_CACHE_URL=fleet_env["TARS_BROKER_URL"])
    prompt = "What is the boiling point of water at sea level?"
    worker = start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=4, env=env)
    with _client(env) as tars:
        first = tars.submit(role="researcher", prompt=prompt, temperature=0).wait(timeout=60)
        assert first.status == "succeeded" and first.answered_by == "model"
        worker.stop()
        specs = [{"role": "researcher", "prompt": f"other {i}", "temperature": 0} for i in range(5)]
        specs.insert(2, {"role": "researcher", "prompt": prompt, "temperature": 0})
        handles = tars.submit_many(specs)
        hit = tars.get(handles[2].id)
        assert hit.status == "succeeded" and hit.answered_by == "exact" and hit.attempts == 0
        msgs = _messages(env)
        assert [(t, sorted(ids)) for _, t, ids in msgs] == [
            (TASK_RUN_BUNDLE, sorted(h.id for i, h in enumerate(handles) if i != 2))]
        start_worker(tiers=["haiku", "sonnet", "opus"], concurrency=4, env=env)
        results = tars.wait_many([h.id for h in handles], timeout=60)
        tars.submit_many(specs)  # every member filled the cache: all six are hits now
    assert {r.status for r in results} == {"succeeded"}
    assert [r.answered_by for r in results].count("model") == 5
    with db.connect() as conn:
        exact = conn.execute(text("SELECT count(*) FROM requests WHERE answered_by = 'exact'")).scalar()
        calls = conn.execute(text("SELECT count(*) FROM api_calls")).scalar()
    assert exact == 1 + 6 and calls == 1 + 5
    assert _messages(env) == []


def test_bundles_of_sixteen_are_the_default(fleet_env):
    """No TARS_BUNDLE_MAX (nor dispatch setting) given: a submit_many of 40 haiku requests of one
    priority and tenant waits as bundles of 16, 16 and 8 (before the default changed: 40 singles)."""
    env = {k: v for k, v in fleet_env.items() if k not in ("TARS_BUNDLE_MAX", "TARS_DISPATCH_ENABLED")}
    with _client(env) as tars:
        tars.submit_many([{"role": "researcher", "prompt": f"d {i}", "tier": "haiku"} for i in range(40)])
    waiting = _messages(env, tiers=("haiku",))
    assert sorted(len(ids) for _key, _task, ids in waiting) == [8, 16, 16]
    assert {task for _key, task, _ids in waiting} == {TASK_RUN_BUNDLE}


def test_a_tenant_with_a_rate_limit_of_its_own_is_never_bundled(fleet_env, tmp_path):
    """A bundle is moved whole; members past the tenant's own limit would wait in worker slots and
    hold other tenants back (test_dispatch_fleet's tenant test failed so with bundles on). So a
    tenant limited on a tier is staged one request per entry there, and bundled elsewhere."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.capped]\nrpm = 30\n[tenants.opus_capped.tiers.opus]\nrpm = 5\n")
    env = {k: v for k, v in fleet_env.items() if k != "TARS_BUNDLE_MAX"} | {"TARS_TENANTS_PATH": str(tenants)}
    with _client(env) as tars:
        tars.submit_many([{"role": "researcher", "prompt": f"c {i}", "tier": "haiku", "tenant": "capped"}
                          for i in range(20)]
                         + [{"role": "researcher", "prompt": f"f {i}", "tier": "haiku", "tenant": "free"}
                            for i in range(20)]
                         + [{"role": "researcher", "prompt": f"o {i}", "tier": tier, "tenant": "opus_capped"}
                            for tier in ("haiku", "opus") for i in range(4)])
    by_tenant: dict[str, list[int]] = {}
    for key, _task, ids in _messages(env):
        tenant = key.rsplit(":", 1)[1]
        by_tenant.setdefault(tenant, []).append(len(ids))
    assert sorted(by_tenant["capped"]) == [1] * 20
    assert sorted(by_tenant["free"]) == [4, 16]
    assert sorted(by_tenant["opus_capped"]) == [1, 1, 1, 1, 4]  # alone on opus, bundled on haiku


@PATHS
def test_the_presence_search_finds_every_member_of_a_waiting_bundle(fleet_env, staged):
    """The lost-request reconciler re-sends a queued request it finds in no staging list, no queue
    and no worker's hands. A bundle's members are in its body (base64): before, the search saw only
    the bundle's own id, so every member queued longer than TARS_REQUEUE_LOST_AFTER_S was staged a
    second time (test_dispatch_fleet's SIGKILL test ended with 9 such copies left in staging)."""
    from tars_tasks.broker.presence import ids_in_broker

    env = _bundle_env(fleet_env, size=8, staged=staged)
    with _client(env) as tars:
        handles = tars.submit_many([{"role": "researcher", "prompt": f"p {i}", "tier": "haiku"} for i in range(8)])
    ids = [h.id for h in handles]
    assert [len(m) for _key, _task, m in _messages(env, tiers=("haiku",))] == [8]  # one bundle waits
    r = redis_lib.Redis.from_url(env["TARS_BROKER_URL"])
    try:
        found = ids_in_broker(r, ids=ids, tiers=["haiku"], namespace=make_settings(env).namespace)
    finally:
        r.close()
    assert found == set(ids)
