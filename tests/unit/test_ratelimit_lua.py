"""The limiter's Lua script against real Redis, with the clock passed in (µs) so the math is exact."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.ratelimit import FleetRateLimiter, LimitSpec

T0_US = 1_700_000_000_000_000
S_US = 1_000_000


@pytest.fixture
def limiter(redis) -> FleetRateLimiter:
    return FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=1.0, max_wait_s=30.0)


def _reserve(limiter, *, tokens=1, at_s=0.0, limits=LimitSpec(rpm=60, tpm=1_000_000), max_wait_s=None):
    return limiter.try_reserve(provider="p", model="m", limits=limits, tokens=tokens,
                               now_us=T0_US + int(at_s * S_US), max_wait_s=max_wait_s)


def test_requests_are_spaced_one_window_over_the_limit_apart(limiter):
    waits = [_reserve(limiter).wait_s for _ in range(5)]
    assert waits == [0.0, 1.0, 2.0, 3.0, 4.0]  # 60 RPM: one slot a second


def test_no_window_holds_more_slots_than_the_limit(limiter):
    limits = LimitSpec(rpm=120, tpm=10**9)
    slots = [_reserve(limiter, limits=limits, max_wait_s=1e6).wait_s for _ in range(500)]
    for i in range(len(slots) - 120):
        assert slots[i + 120] - slots[i] >= 60.0 - 1e-6


def test_an_idle_limiter_does_not_bank_a_burst(limiter):
    assert _reserve(limiter, at_s=0).wait_s == 0.0
    assert _reserve(limiter, at_s=100).wait_s == 0.0
    assert _reserve(limiter, at_s=100).wait_s == pytest.approx(1.0)


def test_tokens_per_minute_bound_the_slot_when_they_are_the_scarcer_limit(limiter):
    limits = LimitSpec(rpm=10_000, tpm=6_000)  # 100 tokens a second
    assert _reserve(limiter, tokens=500, limits=limits).wait_s == 0.0
    assert _reserve(limiter, tokens=500, limits=limits).wait_s == pytest.approx(5.0)
    assert _reserve(limiter, tokens=10, limits=limits).wait_s == pytest.approx(10.0)


def test_a_slot_beyond_the_max_wait_is_refused_and_nothing_is_reserved(limiter):
    for _ in range(31):
        _reserve(limiter)
    refused = _reserve(limiter, max_wait_s=30.0)
    assert not refused.granted and refused.wait_s == pytest.approx(31.0)
    again = _reserve(limiter, max_wait_s=60.0)
    assert again.granted and again.wait_s == pytest.approx(31.0)  # the refusal took no slot


def test_refunded_tokens_give_capacity_back_and_charges_take_it(limiter):
    limits = LimitSpec(rpm=10_000, tpm=6_000)
    _reserve(limiter, tokens=600, limits=limits)  # estimate: 6 s of tokens
    limiter.adjust_tokens(provider="p", model="m", limits=limits, tokens=-400, now_us=T0_US)
    assert _reserve(limiter, tokens=1, limits=limits).wait_s == pytest.approx(2.0)
    limiter.adjust_tokens(provider="p", model="m", limits=limits, tokens=300, now_us=T0_US)
    assert _reserve(limiter, tokens=1, limits=limits).wait_s == pytest.approx(5.01)


def test_a_refund_never_moves_capacity_into_the_past(limiter):
    limits = LimitSpec(rpm=10_000, tpm=6_000)
    _reserve(limiter, tokens=100, limits=limits)
    limiter.adjust_tokens(provider="p", model="m", limits=limits, tokens=-10_000, now_us=T0_US)
    assert _reserve(limiter, tokens=600, limits=limits).wait_s == pytest.approx(0.006)  # the request slot
    assert _reserve(limiter, tokens=1, limits=limits).wait_s == pytest.approx(6.006)


def test_utilisation_scales_the_rate_down(redis):
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=0.5)
    waits = [lim.try_reserve(provider="p", model="m", limits=LimitSpec(rpm=60, tpm=10**9), tokens=1,
                             now_us=T0_US).wait_s for _ in range(3)]
    assert waits == [0.0, 2.0, 4.0]


def test_a_scaled_window_keeps_the_rate_per_window(redis):
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=6.0, utilisation=1.0)
    waits = [lim.try_reserve(provider="p", model="m", limits=LimitSpec(rpm=600, tpm=10**9), tokens=1,
                             now_us=T0_US).wait_s for _ in range(3)]
    assert waits == pytest.approx([0.0, 0.01, 0.02])


def test_limits_of_different_models_are_independent(limiter):
    _reserve(limiter)
    other = limiter.try_reserve(provider="p", model="other", limits=LimitSpec(rpm=60, tpm=10**6), tokens=1,
                                now_us=T0_US)
    assert other.wait_s == 0.0


def test_acquire_sleeps_for_the_scripts_answer_instead_of_polling(redis):
    sleeps: list[float] = []
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, max_wait_s=30.0,
                           sleep=sleeps.append)
    limits = LimitSpec(rpm=60, tpm=10**9)
    for _ in range(3):
        lim.acquire(provider="p", model="m", limits=limits, tokens=1)
    assert len(sleeps) == 2 and sleeps[0] == pytest.approx(1.0, abs=0.05) and sleeps[1] == pytest.approx(2.0, abs=0.05)


def test_acquire_returns_the_wait_for_capacity_not_the_round_trips_to_redis(redis):
    import time

    sleeps: list[float] = []
    lim = FleetRateLimiter(redis_client=redis, namespace="unit-rt", window_s=60.0, max_wait_s=30.0,
                           sleep=sleeps.append)
    real = lim.try_reserve
    told: list[float] = []

    def slow(**kw):
        time.sleep(0.05)  # a loaded Redis
        grant = real(**kw)
        told.append(grant.wait_s)
        return grant

    lim.try_reserve = slow
    limits = LimitSpec(rpm=60, tpm=10**9)
    assert lim.acquire(provider="p", model="m", limits=limits, tokens=1) == 0.0  # capacity to spare
    # the next slot is under a second out: what the script said is the wait (asleep on the fake clock),
    # the 50 ms round trip is not in it
    waited = lim.acquire(provider="p", model="m", limits=limits, tokens=1)
    assert told[0] == 0.0 and 0.5 < told[1] < 1.0
    assert waited == pytest.approx(told[1], abs=0.01) and sleeps == [pytest.approx(told[1], abs=0.01)]


def test_acquire_gives_up_before_reserving_past_its_deadline(redis):
    import time

    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, sleep=lambda s: None)
    limits = LimitSpec(rpm=1, tpm=10**9)
    lim.acquire(provider="p", model="m", limits=limits, tokens=1)
    with pytest.raises(TimeoutError):
        lim.acquire(provider="p", model="m", limits=limits, tokens=1, deadline_s=time.monotonic() + 5)


def test_the_limiter_key_expires_once_idle(limiter, redis):
    _reserve(limiter)
    ttl_ms = redis.pttl(limiter.key(provider="p", model="m"))
    assert 0 < ttl_ms <= 61_000 + 1_000


def test_a_deferred_correction_rides_along_with_the_next_reservation(limiter):
    limits = LimitSpec(rpm=10_000, tpm=6_000)
    _reserve(limiter, tokens=600, limits=limits)
    limiter.adjust_tokens(provider="p", model="m", limits=limits, tokens=-400, defer=True)
    assert _reserve(limiter, tokens=1, limits=limits).wait_s == pytest.approx(2.0)  # 600-400 tokens: 2 s
    assert _reserve(limiter, tokens=1, limits=limits).wait_s == pytest.approx(2.01)  # applied once only


def test_a_reserved_slot_lets_the_caller_work_while_it_comes_due(redis):
    import time

    from workers.ratelimit import SlotMissed

    lim = FleetRateLimiter(redis_client=redis, namespace="unit-ticket", window_s=1.0, max_wait_s=30.0)
    limits = LimitSpec(rpm=10, tpm=10**9)  # a slot every 100 ms
    first = lim.reserve(provider="p", model="m", limits=limits, tokens=5)
    second = lim.reserve(provider="p", model="m", limits=limits, tokens=5)
    assert second.due - first.due == pytest.approx(0.1, abs=0.02)
    time.sleep(0.02)  # work shorter than the wait (a commit): the slot is still good
    lim.wait_for(second)
    assert time.monotonic() >= second.due
    late = lim.reserve(provider="p", model="m", limits=limits, tokens=5)
    time.sleep(late.due - time.monotonic() + 0.2)  # work that outlasted the slot by 200 ms
    with pytest.raises(SlotMissed):
        lim.wait_for(late)
    assert lim.late_slots == 1
    # the missed slot's tokens ride back with the next reservation; its request slot stays spent
    assert lim._pending_tokens == {lim.key(provider="p", model="m"): -5}


# --- further limits in the same script (a tenant's own, on top of the model's) ------------------


def test_a_further_limit_takes_the_later_slot_and_both_advance(limiter):
    """A tenant limited to 6 RPM on a 60 RPM model: its calls are 10 s apart, and each one also
    takes a model slot (another tenant's next call comes after it)."""
    tenant = (("unit:tlimit:acme", LimitSpec(rpm=6, tpm=0)),)
    waits = [limiter.try_reserve(provider="p", model="m", limits=LimitSpec(rpm=60, tpm=10**9), tokens=1,
                                 now_us=T0_US, also=tenant, max_wait_s=1e6).wait_s for _ in range(3)]
    assert waits == [0.0, 10.0, 20.0]
    # the model's own schedule advanced with each of them: the next untenanted call is 1 s after the last
    assert _reserve(limiter, limits=LimitSpec(rpm=60, tpm=10**9), max_wait_s=1e6).wait_s == pytest.approx(21.0)


def test_a_further_limit_without_a_request_limit_paces_tokens_only(limiter, redis):
    tenant = (("unit:tlimit:t", LimitSpec(rpm=0, tpm=600)),)  # 10 tokens a second
    got = [limiter.try_reserve(provider="p", model="m", limits=LimitSpec(rpm=6000, tpm=10**9), tokens=50,
                               now_us=T0_US, also=tenant).wait_s for _ in range(3)]
    assert got == [0.0, 5.0, 10.0]
    assert redis.hget("unit:tlimit:t", "r") in (None, b"0")  # no request schedule kept for it


def test_a_correction_applies_to_every_limit_of_the_call(limiter):
    model, tenant = LimitSpec(rpm=10_000, tpm=6_000), (("unit:tlimit:c", LimitSpec(rpm=0, tpm=600)),)
    limiter.try_reserve(provider="p", model="m", limits=model, tokens=60, now_us=T0_US, also=tenant)
    # reserved 60 tokens, used 30: the tenant's next slot moves from 6 s to 3 s
    limiter.adjust_tokens(provider="p", model="m", limits=model, tokens=-30, now_us=T0_US, also=tenant)
    nxt = limiter.try_reserve(provider="p", model="m", limits=model, tokens=1, now_us=T0_US, also=tenant)
    assert nxt.wait_s == pytest.approx(3.0)


def test_a_deferred_correction_no_reservation_carries_is_sent_on_its_own_after_the_flush_delay(redis):
    """A prefork child whose first attempts all hold a dispatcher's slot never reserves itself: its
    corrections must still reach Redis (before: they waited for a reservation that never came)."""
    import time

    lim = FleetRateLimiter(redis_client=redis, namespace="unit-flush", window_s=60.0, pending_flush_s=0.2)
    limits = LimitSpec(rpm=10_000, tpm=6_000)
    key = lim.key(provider="p", model="m")
    lim.try_reserve(provider="p", model="m", limits=limits, tokens=600)
    before = int(redis.hget(key, "t"))
    lim.adjust_tokens(provider="p", model="m", limits=limits, tokens=-300, defer=True)
    assert int(redis.hget(key, "t")) == before  # deferred
    time.sleep(0.25)
    lim.adjust_tokens(provider="p", model="m", limits=limits, tokens=-100, defer=True)  # the next correction
    assert int(redis.hget(key, "t")) == pytest.approx(before - 400 * 10_000, abs=2)  # both sent, 10 ms a token
    assert lim._pending_tokens == {}


def test_a_dispatcher_takes_and_returns_a_workers_pending_correction(redis):
    lim = FleetRateLimiter(redis_client=redis, namespace="unit-take", window_s=60.0)
    limits = LimitSpec(rpm=10_000, tpm=6_000)
    key = lim.key(provider="p", model="m")
    lim.adjust_tokens(provider="p", model="m", limits=limits, tokens=-7, defer=True)
    assert lim.take_pending(key) == -7 and lim.take_pending(key) == 0
    lim.return_pending(key, -7)
    assert lim.take_pending(key) == -7


# --- several reservations in one script call ("many" mode, coalescing) --------------------------



def _state(redis, keys):
    return [tuple(redis.hmget(k, "r", "t")) for k in keys]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rpm=st.sampled_from([0, 6, 60, 600, 100_000]), tpm=st.sampled_from([0, 600, 6_000, 10**9]),
       tenant_rpm=st.sampled_from([0, 30, 120]), tokens=st.lists(st.integers(0, 5_000), min_size=1, max_size=40),
       max_wait_s=st.sampled_from([0.0, 1.5, 30.0]), credit=st.integers(-2_000, 2_000))
def test_many_books_exactly_what_as_many_single_reservations_book(redis, rpm, tpm, tenant_rpm, tokens, max_wait_s,
                                                                 credit):
    """Same waits, same refusals, same state left in every key (the model's and a tenant's), as
    ``len(tokens)`` "acquire" calls at the same clock, a pending correction included."""
    limits = [("model", LimitSpec(rpm=rpm, tpm=tpm)), ("tenant", LimitSpec(rpm=tenant_rpm, tpm=0))]
    outs = []
    for run in ("single", "many"):
        keys = [f"unit:many:{run}:{name}" for name, _ in limits]
        redis.delete(*keys)
        lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=0.98,
                               max_wait_s=max_wait_s)
        for k, (_, spec) in zip(keys, limits, strict=True):
            lim._defer(k, spec, credit)
        kl = [(k, spec) for k, (_, spec) in zip(keys, limits, strict=True)]
        if run == "single":
            waits = []
            for t in tokens:
                k_, args, _ = lim._args(kl, mode="acquire", requests=1, tokens=t, wait_cap_us=max_wait_s * S_US,
                                        now_us=T0_US)
                granted, wait_us = lim._script(keys=k_, args=args)
                if not int(granted):
                    break
                waits.append(int(wait_us))
        else:
            k_, args, _ = lim._args(kl, mode="many", requests=len(tokens), tokens=0, wait_cap_us=max_wait_s * S_US,
                                    now_us=T0_US)
            waits = [int(w) for w in lim._script(keys=k_, args=[*args, *tokens])]
        outs.append((waits, _state(redis, keys)))
        redis.delete(*keys)
    assert outs[0] == outs[1]


def test_reservations_made_together_share_one_script_call_and_keep_their_spacing(redis):
    """Twenty threads reserve on one key at once: one script call (the first waits for the
    others), and their slots are one request interval apart, as twenty calls one by one leave them."""
    redis.delete("unit:ratelimit:p:m")
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=1.0, max_wait_s=30.0,
                           coalesce_s=0.3)
    limits, n = LimitSpec(rpm=600, tpm=10**9), 20  # a slot every 0.1 s
    start, dues, lock = threading.Barrier(n), [], threading.Lock()

    def one():
        start.wait()
        ticket = lim.reserve(provider="p", model="m", limits=limits, tokens=10)
        with lock:
            dues.append(ticket.due)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lim.script_calls == 1
    gaps = [b - a for a, b in itertools.pairwise(sorted(dues))]
    assert len(dues) == n and all(abs(g - 0.1) < 0.01 for g in gaps), gaps


def test_without_coalescing_every_reservation_is_a_script_call_of_its_own(redis):
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=1.0, max_wait_s=30.0)
    for _ in range(3):
        lim.reserve(provider="p", model="m2", limits=LimitSpec(rpm=10**6, tpm=10**9), tokens=1)
    assert lim.script_calls == 3


def test_a_coalesced_reservation_beyond_the_max_wait_falls_back_to_the_single_path(redis):
    """Booked members get their slots; the one beyond the max wait is not booked by the shared
    call and reserves on its own (sleeping until its slot is within reach)."""
    redis.delete("unit:ratelimit:p:m3")
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=1.0, max_wait_s=0.15,
                           coalesce_s=0.0, sleep=sleep)
    limits = LimitSpec(rpm=600, tpm=10**9)  # 0.1 s apart: slots at 0, 0.1, then 0.2 > 0.15
    for _ in range(2):
        lim.reserve(provider="p", model="m3", limits=limits, tokens=1)
    third = lim.reserve(provider="p", model="m3", limits=limits, tokens=1)
    assert sleeps and third.slept_s > 0  # the fallback slept until the slot was within the max wait


@pytest.mark.parametrize("failure", ["interrupted", "redis_down"])
def test_when_the_shared_call_fails_its_members_reserve_alone_or_see_the_redis_error(redis, failure):
    """The first member's own interruption (a time limit) is not the others' business: they
    reserve alone. An unreachable Redis is every member's (each then retries as the call path does)."""
    redis.delete("unit:ratelimit:p:m4")
    lim = FleetRateLimiter(redis_client=redis, namespace="unit", window_s=60.0, utilisation=1.0, max_wait_s=30.0,
                           coalesce_s=0.3)
    error = RuntimeError("soft time limit") if failure == "interrupted" else redis_lib.ConnectionError("down")

    def fail_once(**kw):
        lim._try_reserve_many = real
        raise error

    real, lim._try_reserve_many = lim._try_reserve_many, fail_once
    n = 6
    start, got, lock = threading.Barrier(n), [], threading.Lock()

    def one():
        start.wait()
        try:
            out = lim.reserve(provider="p", model="m4", limits=LimitSpec(rpm=6000, tpm=10**9), tokens=1)
        except Exception as exc:  # the test sorts them below
            out = exc
        with lock:
            got.append(out)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [g for g in got if isinstance(g, Exception)]
    assert len(got) == n
    if failure == "interrupted":
        assert errors == [error]  # the first member only; the other five reserved alone
    else:
        assert len(errors) == n and all(e is error for e in errors)
