"""The breaker's state machine against real Redis, with the clock passed in (µs)."""

from __future__ import annotations

import pytest

from tars_tasks.errors import (
    AuthenticationFailed,
    CircuitOpen,
    PermanentProviderError,
    ProviderTimeout,
    RateLimited,
    TransientProviderError,
)
from workers.breaker import FleetBreaker, counts_as_failure, trips_at_once

T0 = 1_700_000_000_000_000
S = 1_000_000
P = {"provider": "anthropic", "model": "m"}


@pytest.fixture
def breaker(redis) -> FleetBreaker:
    return FleetBreaker(redis_client=redis, namespace="unit", failure_threshold=3, cooldown_s=10.0, probe_lease_s=5.0)


def _fail(b, n, at=0):
    return [b.record_failure(**P, reason="500", now_us=T0 + at * S) for _ in range(n)]


def test_a_closed_breaker_lets_calls_through(breaker):
    assert breaker.allow(**P, now_us=T0).probe is False


def test_it_opens_after_n_consecutive_failures(breaker):
    assert _fail(breaker, 3) == [False, False, True]
    with pytest.raises(CircuitOpen) as info:
        breaker.allow(**P, now_us=T0 + 1 * S)
    assert info.value.retry_after_s == pytest.approx(9.0)


def test_a_success_resets_the_count_of_consecutive_failures(breaker):
    _fail(breaker, 2)
    permit = breaker.allow(**P, now_us=T0)
    assert permit.failures == 2 and permit.success_matters
    breaker.record_success(**P, now_us=T0)
    assert _fail(breaker, 2) == [False, False]
    assert breaker.view(**P).state == "closed"


def test_after_the_cooldown_exactly_one_probe_is_let_through(breaker):
    _fail(breaker, 3)
    assert breaker.allow(**P, now_us=T0 + 10 * S).probe is True
    with pytest.raises(CircuitOpen):
        breaker.allow(**P, now_us=T0 + 10 * S + 1)
    assert breaker.view(**P).state == "half_open"


def test_a_successful_probe_closes_the_breaker(breaker):
    _fail(breaker, 3)
    breaker.allow(**P, now_us=T0 + 10 * S)
    breaker.record_success(**P, now_us=T0 + 11 * S)
    assert breaker.allow(**P, now_us=T0 + 11 * S).probe is False
    assert breaker.view(**P).failures == 0


def test_a_failed_probe_opens_it_for_another_cooldown(breaker):
    _fail(breaker, 3)
    breaker.allow(**P, now_us=T0 + 10 * S)
    assert breaker.record_failure(**P, reason="500", now_us=T0 + 11 * S) is True
    with pytest.raises(CircuitOpen) as info:
        breaker.allow(**P, now_us=T0 + 12 * S)
    assert info.value.retry_after_s == pytest.approx(9.0)


def test_a_probe_whose_worker_died_is_replaced_when_its_lease_expires(breaker):
    _fail(breaker, 3)
    assert breaker.allow(**P, now_us=T0 + 10 * S).probe
    assert breaker.allow(**P, now_us=T0 + 15 * S + 1).probe


def test_a_trip_opens_the_breaker_at_once(breaker):
    assert breaker.record_failure(**P, reason="auth_error", trip=True, now_us=T0) is True
    with pytest.raises(CircuitOpen):
        breaker.allow(**P, now_us=T0 + 1)
    assert breaker.view(**P).trips == 1


def test_breakers_of_different_models_are_independent(breaker):
    _fail(breaker, 3)
    assert breaker.allow(provider="anthropic", model="other", now_us=T0).probe is False


def test_all_views_lists_every_breaker_with_state(breaker):
    _fail(breaker, 3)
    breaker.record_failure(provider="openai", model="gpt", reason="500", now_us=T0)
    views = {(v.provider, v.model): v for v in breaker.all_views()}
    assert views[("anthropic", "m")].state == "open"
    assert views[("openai", "gpt")].state == "closed" and views[("openai", "gpt")].failures == 1


def test_only_server_side_failures_count_and_only_401_trips_at_once():
    assert counts_as_failure(TransientProviderError("500", status_code=500))
    assert counts_as_failure(ProviderTimeout("t"))
    assert not counts_as_failure(RateLimited("429", status_code=429))
    assert not counts_as_failure(PermanentProviderError("400", status_code=400))
    assert trips_at_once(AuthenticationFailed("401", status_code=401))
    assert not trips_at_once(PermanentProviderError("403", status_code=403))
