"""The stage and dispatch scripts against real Redis, with the clock passed in (µs) so the
schedule is exact. Order and counts only: which entries move, in what order, how many per window."""

from __future__ import annotations

from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from config.catalog import load_catalog
from config.keys import queue_for_tier, stage_prefix
from config.tenants import TenantConfig, TenantLimits, TenantSpec, load_tenants
from tars_tasks.errors import InvalidRequest
from workers.dispatch import (
    PRIORITIES,
    Dispatcher,
    LimitWindow,
    StagedMessage,
    Staging,
    celery_list,
)
from workers.ratelimit import FleetRateLimiter, LimitSpec

T0_US = 1_700_000_000_000_000
S_US = 1_000_000
NS = "unit"


def _catalog(*, rpm: int = 6000, tpm: int = 10**9):
    cat = load_catalog()
    tiers = {t: s.model_copy(update={"rpm": rpm, "tpm": tpm}) for t, s in cat.tiers.items()}
    return cat.model_copy(update={"tiers": tiers})


def _setup(redis, *, rpm: int = 6000, tpm: int = 10**9, tenants: TenantConfig | None = None,
           window_s: float = 60.0, horizon_s: float = 0.05) -> tuple[Staging, Dispatcher]:
    d = Dispatcher(redis_client=redis, namespace=NS, catalog=_catalog(rpm=rpm, tpm=tpm),
                   tenants=tenants or TenantConfig(), limits=LimitWindow(window_s=window_s, utilisation=1.0),
                   horizon_s=horizon_s)
    d.publish_tenant_config()
    return Staging(redis_client=redis, namespace=NS), d


def _msgs(tenant: str, n: int, *, priority: int = 5, tier: str = "haiku", tokens: int = 10, start: int = 0,
          tag: str = "") -> list[StagedMessage]:
    return [StagedMessage(id=f"{tag}{tenant}-{priority}-{i}", tier=tier, priority=priority, tenant=tenant,
                          tokens=tokens, body=f'{{"body": "{tag}{tenant}-{priority}-{i}"}}')
            for i in range(start, start + n)]


def _run(d: Dispatcher, *, tier: str = "haiku", from_s: float, to_s: float, step_s: float, max_moves: int = 50,
         max_ready: int | None = None) -> list[tuple[float, object]]:
    """Step the clock from ``from_s`` to ``to_s``; every moved reservation with its slot (s from T0)."""
    out = []
    steps = round((to_s - from_s) / step_s)
    for k in range(steps):
        now = T0_US + round((from_s + k * step_s) * S_US)
        res = d.dispatch(tier=tier, max_moves=max_moves, max_ready=max_ready, now_us=now)
        out += [((r.slot_us - T0_US) / S_US, r) for r in res.moved]
    return out


def _celery_ids(redis, tier: str = "haiku") -> list[str]:
    """Bodies in the tier's Celery lists in the order kombu would consume them (BRPOP: oldest
    first, and priority lists in kombu's order), as entry ids."""
    import json

    out = []
    for p in sorted(PRIORITIES, reverse=True):
        for raw in reversed(redis.lrange(celery_list(queue_for_tier(tier), p), 0, -1)):
            out.append(json.loads(raw)["body"])
    return out


def _max_in_window(times: list[float], window_s: float) -> int:
    """Most slots in any half-open window ``(t - window_s, t]`` (computed in whole µs)."""
    times = sorted(round(t * S_US) for t in times)
    w = round(window_s * S_US)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - w:
            j += 1
        best = max(best, i - j + 1)
    return best


# --- mapping, staging ---------------------------------------------------------------------------


def test_the_celery_list_of_a_priority_is_the_one_kombu_publishes_to():
    from tars_tasks.celery_app import make_app
    from tests.helpers import make_settings

    app = make_app(make_settings({"TARS_BROKER_URL": "redis://127.0.0.1:6379/0"}))
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for p in PRIORITIES:
            from tars_tasks.celery_app import redis_priority

            assert celery_list("tars.haiku", p) == channel._q_for_pri("tars.haiku", redis_priority(p))
    assert celery_list("tars.haiku", 5) == "tars.haiku"
    assert celery_list("tars.haiku", 0) == "tars.haiku\x06\x169"


def test_bad_entries_are_refused_and_nothing_of_the_call_is_staged(redis):
    staging, _ = _setup(redis)
    good = _msgs("a", 3)
    for bad in (StagedMessage(id="x", tier="nope", priority=5, tenant="a", tokens=1, body="b"),
                StagedMessage(id="x", tier="haiku", priority=10, tenant="a", tokens=1, body="b"),
                StagedMessage(id="x", tier="haiku", priority=5, tenant="a:b", tokens=1, body="b"),
                StagedMessage(id="x|y", tier="haiku", priority=5, tenant="a", tokens=1, body="b"),
                StagedMessage(id="x", tier="haiku", priority=5, tenant="a", tokens=-1, body="b")):
        with pytest.raises(InvalidRequest):
            staging.stage([*good, bad])
    assert staging.staged_count(tier="haiku") == 0 and not redis.keys(f"{stage_prefix(NS, 'haiku')}*")


def test_staging_counts_per_tier_priority_and_tenant(redis):
    staging, _ = _setup(redis)
    staging.stage(_msgs("a", 3, priority=9) + _msgs("b", 2, priority=9) + _msgs("a", 4, priority=0)
                  + _msgs("a", 5, tier="opus"))
    assert staging.staged_count(tier="haiku") == 9 and staging.staged_count(tier="opus") == 5
    assert staging.staged_by_priority(tier="haiku") == {9: {"a": 3, "b": 2}, 0: {"a": 4}}


def test_stage_splits_large_calls_and_keeps_their_order(redis):
    staging, d = _setup(redis, rpm=10**8)
    staging.stage(_msgs("a", 1234))
    assert staging.staged_count(tier="haiku") == 1234
    _run(d, from_s=0, to_s=1, step_s=0.05, max_moves=200)
    assert _celery_ids(redis) == [m.id for m in _msgs("a", 1234)]


# --- the dispatch step -----------------------------------------------------------------------------


def test_a_moved_message_is_the_staged_body_in_its_prioritys_celery_list_and_its_reservation_is_returned(redis):
    staging, d = _setup(redis, rpm=60)
    staging.stage([StagedMessage(id="r1", tier="haiku", priority=2, tenant="acme", tokens=77, body='{"x": 1}')])
    res = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US)
    assert [(r.id, r.tenant, r.priority, r.tokens, r.slot_us) for r in res.moved] == [("r1", "acme", 2, 77, T0_US)]
    assert res.at_us == T0_US and res.staged == 0 and res.reason == "empty"
    assert redis.lrange(celery_list("tars.haiku", 2), 0, -1) == [b'{"x": 1}']
    # staging leaves no keys behind but the count and the moved messages' slots (for their workers)
    assert {k.decode() for k in redis.keys(f"{stage_prefix(NS, 'haiku')}*")} == {
        f"{stage_prefix(NS, 'haiku')}:count", f"{stage_prefix(NS, 'haiku')}:slots"}
    slots = {k.decode(): int(v) for k, v in redis.hgetall(f"{stage_prefix(NS, 'haiku')}:slots").items()}
    assert slots == {r.id: r.slot_us for r in res.moved}


def test_nothing_moves_when_the_models_next_slot_is_beyond_the_horizon(redis):
    staging, d = _setup(redis, rpm=60, horizon_s=0.05)  # one slot a second
    staging.stage(_msgs("a", 5))
    first = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US)
    assert len(first.moved) == 1 and first.reason == "model_limit" and first.wait_s == pytest.approx(1.0)
    early = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US + 900_000)
    assert early.moved == [] and early.reason == "model_limit" and early.wait_s == pytest.approx(0.1)
    in_horizon = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US + 960_000)
    assert [r.slot_us - T0_US for r in in_horizon.moved] == [1_000_000]  # reserved at the slot, 40 ms ahead
    assert in_horizon.staged == 3


def test_dispatch_and_worker_acquires_share_one_model_limit(redis):
    staging, d = _setup(redis, rpm=60)
    limiter = FleetRateLimiter(redis_client=redis, namespace=NS, window_s=60.0, utilisation=1.0)
    spec = d.catalog.spec("haiku")
    assert d.model_key("haiku") == limiter.key(provider=spec.provider, model=spec.model)
    limits = LimitSpec(rpm=60, tpm=10**9)
    for _ in range(3):  # a retrying worker took the slots at 0, 1 and 2 s
        limiter.try_reserve(provider=spec.provider, model=spec.model, limits=limits, tokens=1, now_us=T0_US)
    staging.stage(_msgs("a", 2))
    blocked = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US)
    assert blocked.moved == [] and blocked.wait_s == pytest.approx(3.0)
    moved = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US + 3 * S_US)
    assert [r.slot_us for r in moved.moved] == [T0_US + 3 * S_US]
    after = limiter.try_reserve(provider=spec.provider, model=spec.model, limits=limits, tokens=1, now_us=T0_US)
    assert after.wait_s == pytest.approx(4.0)  # the worker's next call comes after dispatch's reservation


def test_model_tokens_per_minute_bound_dispatch_when_they_are_the_scarcer_limit(redis):
    staging, d = _setup(redis, rpm=10_000, tpm=6_000)  # 100 tokens a second
    staging.stage(_msgs("a", 4, tokens=500))
    moved = _run(d, from_s=0, to_s=20, step_s=0.01)
    assert [round(t, 3) for t, _ in moved] == [0.0, 5.0, 10.0, 15.0]


def test_a_deferred_token_correction_of_the_workers_limiter_rides_along(redis):
    staging, d = _setup(redis, rpm=10_000, tpm=6_000)
    limiter = FleetRateLimiter(redis_client=redis, namespace=NS, window_s=60.0, utilisation=1.0)
    d.limiter = limiter
    spec = d.catalog.spec("haiku")
    staging.stage(_msgs("a", 2, tokens=600))
    d.dispatch(tier="haiku", max_moves=1, now_us=T0_US)  # 600 tokens: next slot at 6 s
    limiter.adjust_tokens(provider=spec.provider, model=spec.model, limits=LimitSpec(rpm=10_000, tpm=6_000),
                          tokens=-400, defer=True)  # the call used 200: 4 s back
    res = d.dispatch(tier="haiku", max_moves=1, now_us=T0_US + 2 * S_US)
    assert [r.slot_us for r in res.moved] == [T0_US + 2 * S_US] and not limiter._pending_tokens


def test_the_ready_depth_cap_counts_every_priority_list_of_the_tier(redis):
    staging, d = _setup(redis)
    redis.lpush("tars.haiku", "already-1")
    redis.lpush(celery_list("tars.haiku", 7), "already-2", "already-3")
    redis.lpush("tars.sonnet", "other-tier")  # not this tier's
    staging.stage(_msgs("a", 20))
    res = d.dispatch(tier="haiku", max_moves=50, max_ready=8, now_us=T0_US)
    assert len(res.moved) == 5 and res.reason == "ready_cap"
    again = d.dispatch(tier="haiku", max_moves=50, max_ready=8, now_us=T0_US + S_US)
    assert again.moved == [] and again.reason == "ready_cap" and again.staged == 15
    redis.delete(celery_list("tars.haiku", 7))
    assert len(d.dispatch(tier="haiku", max_moves=50, max_ready=8, now_us=T0_US + 2 * S_US).moved) == 2
    assert len(d.dispatch(tier="haiku", max_moves=3, max_ready=None, now_us=T0_US + 3 * S_US).moved) == 3


def test_the_ready_depth_cap_counts_only_messages_served_before_the_entry(redis):
    """A backlog of plain-Celery messages at normal priority (they never went through staging)
    does not keep a staged high-priority entry out of its list; it does keep a low one out."""
    staging, d = _setup(redis)
    redis.lpush("tars.haiku", *[f"plain-{i}" for i in range(20)])  # TARS 5: the bare list
    staging.stage(_msgs("a", 3, priority=9) + _msgs("a", 3, priority=0))
    res = d.dispatch(tier="haiku", max_moves=50, max_ready=2, now_us=T0_US)
    assert [r.priority for r in res.moved] == [9, 9] and res.reason == "ready_cap"
    assert redis.llen(celery_list("tars.haiku", 9)) == 2
    redis.delete("tars.haiku", celery_list("tars.haiku", 9))
    res = d.dispatch(tier="haiku", max_moves=50, max_ready=3, now_us=T0_US + S_US)
    assert [r.priority for r in res.moved] == [9, 0, 0]


# --- priority ---------------------------------------------------------------------------------------


def test_high_priority_entries_go_before_the_low_backlog_under_a_binding_limit(redis):
    """Issue 9's experiment, in order only: a low backlog drains one slot a second; 10 high
    entries staged later go out in the next 10 slots, none after a low one."""
    staging, d = _setup(redis, rpm=60)
    staging.stage(_msgs("bulk", 300, priority=0))
    before = _run(d, from_s=0, to_s=8, step_s=0.02)
    staging.stage(_msgs("vip", 10, priority=9))
    after = [r for _, r in _run(d, from_s=8, to_s=40, step_s=0.02)]
    assert len(before) in (8, 9) and all(r.priority == 0 for _, r in before)  # slots 0..7 s (and 8 s, in the horizon)
    n = 10
    high_before_next_low_n = sum(1 for r in after[: 10 + n] if r.priority == 9)
    assert high_before_next_low_n >= 9
    assert [r.priority for r in after[:10]] == [9] * 10  # in fact all of them, first


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("stage"), st.sampled_from("abc"), st.integers(0, 9), st.integers(1, 6)),
    st.tuples(st.just("dispatch"), st.integers(1, 8)),
), min_size=1, max_size=40))
def test_every_move_takes_the_highest_staged_priority_and_keeps_each_lists_order(redis, ops):
    redis.flushdb()
    staging, d = _setup(redis)
    staged: dict[tuple[int, str], deque[str]] = {}
    n_staged = 0
    clock = T0_US
    for op in ops:
        if op[0] == "stage":
            _, tenant, prio, n = op
            msgs = _msgs(tenant, n, priority=prio, start=n_staged)
            n_staged += n
            staging.stage(msgs)
            staged.setdefault((prio, tenant), deque()).extend(m.id for m in msgs)
        else:
            clock += S_US
            for r in d.dispatch(tier="haiku", max_moves=op[1], now_us=clock).moved:
                top = max(p for (p, _), q in staged.items() if q)
                assert r.priority == top
                assert staged[(r.priority, r.tenant)].popleft() == r.id  # FIFO per (priority, tenant)
    left = sum(len(q) for q in staged.values())
    assert staging.staged_count(tier="haiku") == left
    assert len(_celery_ids(redis)) + left == n_staged


# --- fairness -------------------------------------------------------------------------------------


def test_a_flooding_tenant_does_not_starve_a_small_one_with_equal_weights(redis):
    staging, d = _setup(redis, rpm=60)
    staging.stage(_msgs("big", 1000))
    _run(d, from_s=0, to_s=30, step_s=0.02)  # big has the fleet to itself for 30 slots
    staging.stage(_msgs("small", 10))
    after = [r.tenant for _, r in _run(d, from_s=30, to_s=60, step_s=0.02)]
    assert Counter(after[:20]) == {"big": 10, "small": 10}  # half the capacity each while both have work
    assert all(t == "big" for t in after[20:])


@pytest.mark.parametrize(("weights", "expected"), [
    ({"a": 3, "b": 1}, {"a": 300, "b": 100}),
    ({"a": 1, "b": 1, "c": 2}, {"a": 100, "b": 100, "c": 200}),
    ({"a": 0.5, "b": 1}, {"a": 133, "b": 267}),
])
def test_shares_of_the_dispatched_sequence_follow_the_weights(redis, weights, expected):
    tenants = TenantConfig(tenants={t: TenantSpec(weight=w) for t, w in weights.items()})
    staging, d = _setup(redis, tenants=tenants)
    for t in weights:
        staging.stage(_msgs(t, 1000))
    seq = [r.tenant for _, r in _run(d, from_s=0, to_s=40, step_s=0.01, max_moves=1)][:400]
    counts = Counter(seq)
    for t, n in expected.items():
        assert abs(counts[t] - n) <= 2, counts
    # and at every prefix, no tenant is ahead of its share by more than its quantum
    total_w = sum(weights.values())
    seen: Counter = Counter()
    for i, t in enumerate(seq, 1):
        seen[t] += 1
        for u, w in weights.items():
            assert abs(seen[u] - i * w / total_w) <= max(weights.values()) + 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=st.lists(st.sampled_from([0.25, 0.5, 1, 1.5, 2, 3, 5]), min_size=2, max_size=4),
       batch=st.integers(1, 7))
def test_weighted_shares_hold_for_any_weights_and_batch_size(redis, weights, batch):
    redis.flushdb()
    names = [f"t{i}" for i in range(len(weights))]
    tenants = TenantConfig(tenants={n: TenantSpec(weight=w) for n, w in zip(names, weights, strict=True)})
    staging, d = _setup(redis, tenants=tenants)
    for n in names:
        staging.stage(_msgs(n, 300))
    seq: list[str] = []
    clock = T0_US
    while len(seq) < 200:
        clock += S_US
        seq += [r.tenant for r in d.dispatch(tier="haiku", max_moves=batch, now_us=clock).moved]
    seq = seq[:200]
    total_w = sum(weights)
    for n, w in zip(names, weights, strict=True):
        assert abs(seq.count(n) - 200 * w / total_w) <= max(weights) + 2, (weights, Counter(seq))


def test_weights_apply_within_one_priority_only(redis):
    tenants = TenantConfig(tenants={"heavy": TenantSpec(weight=10)})
    staging, d = _setup(redis, tenants=tenants)
    staging.stage(_msgs("heavy", 50, priority=1) + _msgs("light", 5, priority=8))
    seq = [r.tenant for _, r in _run(d, from_s=0, to_s=1, step_s=0.1, max_moves=5)]
    assert seq[:5] == ["light"] * 5


# --- tenant limits -----------------------------------------------------------------------------------


def test_a_tenants_own_limit_is_never_exceeded_while_another_tenant_keeps_flowing(redis):
    # window 1 s: the model allows 200 a window, tenant "capped" 10 a window
    tenants = TenantConfig(tenants={"capped": TenantSpec(rpm=10)})
    staging, d = _setup(redis, rpm=200, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("capped", 500) + _msgs("free", 2000))
    moved = _run(d, from_s=0, to_s=5, step_s=0.005, max_moves=5)
    capped = [t for t, r in moved if r.tenant == "capped"]
    free = [t for t, r in moved if r.tenant == "free"]
    assert _max_in_window(capped, 1.0) <= 10
    assert _max_in_window(capped + free, 1.0) <= 200
    assert len(capped) >= 5 * 10 - 1
    assert len(free) >= 5 * 190 - 10  # the capped tenant's unused share went to the other
    capped_ids = [r.id for _, r in moved if r.tenant == "capped"]
    assert capped_ids == [m.id for m in _msgs("capped", len(capped_ids))]  # waited in order


def test_a_tenant_at_its_limit_consumes_none_of_the_models_capacity(redis):
    tenants = TenantConfig(tenants={"capped": TenantSpec(rpm=5)})
    staging, d = _setup(redis, rpm=20, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("capped", 500, priority=9) + _msgs("free", 500, priority=0))
    moved = _run(d, from_s=0, to_s=10, step_s=0.005, max_moves=5)
    per_s = Counter(int(t) for t, _ in moved)
    capped_per_s = Counter(int(t) for t, r in moved if r.tenant == "capped")
    assert all(per_s[s] >= 19 for s in range(1, 9)), per_s  # the model's 20 a second are all used
    assert _max_in_window([t for t, r in moved if r.tenant == "capped"], 1.0) <= 5
    assert all(capped_per_s[s] >= 4 for s in range(1, 9))  # and the limited tenant still gets its 5


def test_a_tenants_tokens_per_minute_are_a_limit_too(redis):
    tenants = TenantConfig(tenants={"t": TenantSpec(tpm=1000)})
    staging, d = _setup(redis, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("t", 50, tokens=250))
    moved = [t for t, _ in _run(d, from_s=0, to_s=5, step_s=0.005)]
    assert _max_in_window(moved, 1.0) <= 4 and len(moved) >= 19


def test_a_limit_per_tenant_and_tier_binds_on_that_tier_only(redis):
    tenants = TenantConfig(tenants={"acme": TenantSpec(rpm=1000, tiers={"opus": TenantLimits(rpm=4)})})
    staging, d = _setup(redis, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("acme", 200, tier="opus") + _msgs("acme", 200, tier="haiku") + _msgs("other", 200, tier="opus"))
    opus, haiku = [], []
    for k in range(600):  # both tiers dispatched on one clock
        opus += _run(d, tier="opus", from_s=k * 0.005, to_s=(k + 1) * 0.005, step_s=0.005)
        haiku += _run(d, tier="haiku", from_s=k * 0.005, to_s=(k + 1) * 0.005, step_s=0.005)
    acme_opus = [t for t, r in opus if r.tenant == "acme"]
    assert _max_in_window(acme_opus, 1.0) <= 4 and len(acme_opus) >= 11
    assert len([1 for _, r in opus if r.tenant == "other"]) == 200  # another tenant on opus is not held up
    assert len(haiku) == 200  # acme's haiku work has no such limit


def test_default_tenant_limits_apply_to_every_tenant_not_named(redis):
    tenants = TenantConfig(defaults=TenantSpec(rpm=3), tenants={"vip": TenantSpec()})
    staging, d = _setup(redis, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("anon1", 50) + _msgs("anon2", 50) + _msgs("vip", 50))
    moved = _run(d, from_s=0, to_s=4, step_s=0.01)
    by = Counter(r.tenant for _, r in moved)
    assert by["vip"] == 50 and by["anon1"] <= 3 * 4 + 1 and by["anon2"] <= 3 * 4 + 1
    for anon in ("anon1", "anon2"):
        assert _max_in_window([t for t, r in moved if r.tenant == anon], 1.0) <= 3


def test_all_tenants_at_their_limits_is_reported_with_the_wait(redis):
    tenants = TenantConfig(defaults=TenantSpec(rpm=60))
    staging, d = _setup(redis, tenants=tenants)
    staging.stage(_msgs("a", 3) + _msgs("b", 3, priority=2))
    first = d.dispatch(tier="haiku", max_moves=10, now_us=T0_US)
    assert Counter(r.tenant for r in first.moved) == {"a": 1, "b": 1}
    assert first.reason == "tenant_limit" and first.wait_s == pytest.approx(1.0)


# --- configuration -------------------------------------------------------------------------------


def test_the_tenants_file_is_read_and_checked(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text("[defaults]\nrpm = 100\n[tenants.acme]\nweight = 3\ntpm = 5000\n"
                    "[tenants.acme.tiers.opus]\nrpm = 5\n")
    cfg = load_tenants(path)
    assert cfg.spec("acme").weight == 3 and cfg.spec("acme").tiers["opus"].rpm == 5
    assert cfg.spec("someone").rpm == 100
    assert cfg.redis_fields()["rpm:acme:opus"] == "5"
    path.write_text("[tenants.acme.tiers.gpt]\nrpm = 5\n")
    with pytest.raises(ValueError, match="unknown tier 'gpt'"):
        load_tenants(path)
    path.write_text("[tenants.acme]\nweight = 0\n")
    with pytest.raises(ValueError):
        load_tenants(path)
    assert load_tenants(None) == TenantConfig()


def test_a_tenant_at_its_limit_is_parked_until_its_slot_and_then_rejoins_the_round(redis):
    from config.keys import stage_parked_key, stage_ring_key

    tenants = TenantConfig(tenants={"capped": TenantSpec(rpm=60)})
    staging, d = _setup(redis, tenants=tenants)
    staging.stage(_msgs("capped", 3) + _msgs("free", 100))
    first = d.dispatch(tier="haiku", max_moves=4, now_us=T0_US)
    assert [r.tenant for r in first.moved] == ["capped", "free", "free", "free"]
    parked = redis.zrange(stage_parked_key(NS, "haiku"), 0, -1, withscores=True)
    assert parked == [(b"5:capped", float(T0_US + S_US))]  # out of the round until its next slot
    assert redis.lrange(stage_ring_key(NS, "haiku", 5), 0, -1) == [b"free"]
    assert staging.staged_by_priority(tier="haiku") == {5: {"capped": 2, "free": 97}}
    early = d.dispatch(tier="haiku", max_moves=4, now_us=T0_US + S_US - 10_000)
    assert {r.tenant for r in early.moved} == {"free"}  # its slot is not before the model's next one
    later = d.dispatch(tier="haiku", max_moves=4, now_us=T0_US + S_US)
    assert [r.tenant for r in later.moved] == ["free", "capped", "free"]  # back, at the tail
    assert [r.id for r in later.moved if r.tenant == "capped"] == ["capped-5-1"]
    slots = [r.slot_us - T0_US for r in early.moved + later.moved]
    assert slots == [990_000, 1_000_000, 1_010_000, 1_020_000, 1_030_000, 1_040_000, 1_050_000]  # no hole


def test_one_step_does_bounded_work_even_when_a_thousand_tenants_hit_their_limits_at_once(redis):
    tenants = TenantConfig(defaults=TenantSpec(rpm=1), tenants={"free": TenantSpec()})
    staging, d = _setup(redis, tenants=tenants, rpm=10**8)
    staging.stage([m for i in range(1000) for m in _msgs(f"t{i}", 2)] + _msgs("free", 500))
    assert len(d.dispatch(tier="haiku", max_moves=1001, now_us=T0_US).moved) == 1001  # each takes its one slot
    steps = []
    while sum(len(s.moved) for s in steps) < 100:
        steps.append(d.dispatch(tier="haiku", max_moves=10, now_us=T0_US + 1000))
        assert len(steps) < 50
    assert all(r.tenant == "free" for s in steps for r in s.moved)
    assert steps[0].reason == "batch" and len(steps[0].moved) < 10  # stopped early: parking is spread out
    assert all(len(s.moved) == 10 for s in steps[6:])  # then the parked tenants cost nothing


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(capped_rpm=st.integers(1, 40), tier_rpm=st.integers(1, 40), model_rpm=st.integers(45, 400),
       step_ms=st.integers(1, 30), moves=st.integers(1, 10))
def test_no_limit_is_ever_exceeded_in_any_window_for_any_limits_and_ticks(redis, capped_rpm, tier_rpm, model_rpm,
                                                                          step_ms, moves):
    redis.flushdb()
    tenants = TenantConfig(tenants={"capped": TenantSpec(rpm=capped_rpm, tiers={"haiku": TenantLimits(rpm=tier_rpm)})})
    staging, d = _setup(redis, rpm=model_rpm, tenants=tenants, window_s=1.0)
    staging.stage(_msgs("capped", 300) + _msgs("free", 2000))
    moved = _run(d, from_s=0, to_s=3, step_s=step_ms / 1000, max_moves=moves)
    capped = [t for t, r in moved if r.tenant == "capped"]
    assert _max_in_window(capped, 1.0) <= min(capped_rpm, tier_rpm)
    assert _max_in_window([t for t, _ in moved], 1.0) <= model_rpm
    # the free tenant kept flowing: it got all the capacity the capped one could not use (the
    # capacity: the model's limit, or what `moves` per tick can carry, whichever is less)
    free = len(moved) - len(capped)
    capacity_per_s = min(model_rpm, moves * 1000 / step_ms)
    expected = 3 * (capacity_per_s - min(capped_rpm, tier_rpm))
    assert free >= expected - model_rpm * (step_ms / 1000 + 0.05) * 3 - 3 * moves - 2, (free, expected)


def test_asking_for_no_moves_moves_nothing_and_says_the_ready_lists_are_full(redis):
    staging, d = _setup(redis)
    staging.stage(_msgs("a", 2))
    res = d.dispatch(tier="haiku", max_moves=0, now_us=T0_US)
    assert res.moved == [] and res.reason == "ready_cap" and res.staged == 2


# --- bundles (tars_tasks.bundles): one entry, one slot per member --------------------------------


def _bundles(tenant: str, sizes: list[int], *, tokens: int = 10, priority: int = 5) -> list[StagedMessage]:
    out = []
    for i, k in enumerate(sizes):
        member_tokens = tuple(tokens + j for j in range(k)) if k > 1 else ()
        out.append(StagedMessage(id=f"{tenant}-b{i}", tier="haiku", priority=priority, tenant=tenant,
                                 tokens=sum(member_tokens) if k > 1 else tokens, body=f'{{"body": "{tenant}-b{i}"}}',
                                 member_tokens=member_tokens))
    return out


def _member_slots(redis, moved) -> dict[str, list[float | None]]:
    """Every moved entry's recorded slots (s from T0; None: not reserved, the worker acquires), one
    per member, from the dispatcher's record."""
    key = f"{stage_prefix(NS, 'haiku')}:slots"
    return {r.id: [(int(v) - T0_US) / S_US if int(v) else None for v in redis.hget(key, r.id).decode().split(",")]
            for _, r in moved}


def test_a_staged_bundle_moves_whole_and_reserves_each_member_the_slot_single_moves_would_get(redis):
    staging, d = _setup(redis, rpm=60, window_s=1.0)  # a slot every 1/60 s; the horizon 50 ms
    staging.stage(_bundles("a", [4, 1, 3]))
    assert staging.staged_count(tier="haiku") == 8  # the count is of requests, not entries
    res = d.dispatch(tier="haiku", max_moves=50, now_us=T0_US)
    assert [(r.id, r.requests) for r in res.moved] == [("a-b0", 4)]  # the rest is beyond the horizon
    slots = _member_slots(redis, [(0, r) for r in res.moved])["a-b0"]
    assert [round(s * 60, 3) for s in slots] == [0, 1, 2, 3]  # spaced as four single moves
    assert res.staged == 4 and res.moved[0].tokens == 10 + 11 + 12 + 13
    moved = _run(d, from_s=0.001, to_s=0.2, step_s=0.001)
    assert [(r.id, r.requests) for _, r in moved] == [("a-b1", 1), ("a-b2", 3)]
    later = _member_slots(redis, moved)
    assert round(later["a-b1"][0] * 60, 3) == 4 and [round(s * 60, 3) for s in later["a-b2"]] == [5, 6, 7]
    assert staging.staged_count(tier="haiku") == 0
    assert _celery_ids(redis) == ["a-b0", "a-b1", "a-b2"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(capped_rpm=st.integers(1, 40), model_rpm=st.integers(45, 400), step_ms=st.integers(1, 30),
       moves=st.integers(1, 40), sizes=st.lists(st.integers(1, 16), min_size=5, max_size=40))
@example(capped_rpm=1, model_rpm=45, step_ms=1, moves=1, sizes=[4, 1, 1, 1, 1])
def test_no_limit_is_exceeded_in_any_window_when_bundles_are_staged(redis, capped_rpm, model_rpm, step_ms, moves,
                                                                    sizes):
    redis.flushdb()
    tenants = TenantConfig(tenants={"capped": TenantSpec(rpm=capped_rpm)})
    staging, d = _setup(redis, rpm=model_rpm, tenants=tenants, window_s=1.0)
    staging.stage(_bundles("capped", sizes) + _bundles("free", sizes * 5))
    moved = _run(d, from_s=0, to_s=3, step_s=step_ms / 1000, max_moves=moves)
    slots = _member_slots(redis, moved)
    member_times = {t: [s for _, r in moved if r.tenant == t for s in slots[r.id] if s is not None]
                    for t in ("capped", "free")}
    assert all(len(slots[r.id]) == r.requests and slots[r.id][0] is not None for _, r in moved)
    # a member left unreserved leaves the rest of its bundle unreserved (the worker acquires for them)
    assert all(None not in s[: s.index(None)] and set(s[s.index(None):]) == {None} for s in slots.values()
               if None in s)
    assert all(None not in slots[r.id] for _, r in moved if r.tenant == "free")  # no limit of its own
    assert _max_in_window(member_times["capped"], 1.0) <= capped_rpm
    assert _max_in_window(member_times["capped"] + member_times["free"], 1.0) <= model_rpm
    assert all(s >= t - 1e-6 for t, r in moved for s in slots[r.id] if s is not None)  # never before its first
    total = sum(sizes) * 6
    assert staging.staged_count(tier="haiku") == total - sum(r.requests for _, r in moved)
    # it kept moving: the capped tenant's bundles made no holes in the model's schedule
    assert sum(r.requests for _, r in moved) >= min(total, 3 * min(model_rpm, moves * 1000 / step_ms)) * 0.5
