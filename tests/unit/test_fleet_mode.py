"""The fleet mode's decision script on real Redis: the seed's triggers, hysteresis (leave below a
lower threshold, a minimum dwell), one numbered sequence of transitions whoever decides."""

from __future__ import annotations

import itertools

import pytest

from config.settings import Settings
from tars_tasks.admission import Mode, mode_for
from tars_tasks.fleetmode import FleetMode, ModeBook, dominant

SETTINGS = Settings(_env_file=None, degrade_high_load_at=0.6, degrade_critical_at=0.85, mode_leave_margin=0.1,
                    mode_min_dwell_s=10.0)


@pytest.fixture
def book(redis) -> ModeBook:
    return ModeBook(redis_client=redis, namespace="unit", settings=SETTINGS)


def _run(book: ModeBook, loads: list[float], *, step_ms: int = 1000) -> list[tuple[int, FleetMode]]:
    """Decide once per load, ``step_ms`` apart; the transitions as (time ms, new mode)."""
    changes = []
    for i, load in enumerate(loads):
        t = 1_000_000 + i * step_ms
        view, changed = book.decide({"queue_load": load}, now_ms=t)
        if changed:
            changes.append((t, view.mode))
    return changes


def test_the_modes_are_entered_at_the_seeds_triggers(book):
    assert _run(book, [0.1, 0.59, 0.6, 0.84, 0.85]) == [(1_002_000, FleetMode.HIGH_LOAD),
                                                         (1_004_000, FleetMode.CRITICAL)]


def test_a_load_oscillating_around_a_trigger_changes_the_mode_once_not_on_every_swing(book):
    loads = [0.58, 0.62] * 100  # +-2% around the 60% trigger, one sample a second for 200 s
    flaps_without_hysteresis = sum(1 for a, b in itertools.pairwise(loads)
                                   if mode_for(a, settings=SETTINGS) != mode_for(b, settings=SETTINGS))
    assert flaps_without_hysteresis == 199  # what the per-producer rule did
    assert _run(book, loads) == [(1_001_000, FleetMode.HIGH_LOAD)]
    assert book.read().mode is FleetMode.HIGH_LOAD


def test_a_wide_oscillation_is_held_for_the_minimum_dwell_before_each_step_down(book):
    loads = [0.9, 0.3] * 50  # 0.9 enters critical at once; 0.3 is below every leave threshold
    changes = _run(book, loads)
    ups = [t for t, m in changes if m is FleetMode.CRITICAL]
    downs = [t for t, m in changes if m is FleetMode.OPTIMAL]
    assert len(changes) <= 2 * (100 // 10) + 1
    for down in downs:  # every step down came at least the dwell after the step up before it
        up = max(t for t in ups if t < down)
        assert down - up >= SETTINGS.mode_min_dwell_s * 1000


def test_critical_steps_down_through_high_load_at_the_lower_leave_thresholds(book):
    changes = _run(book, [0.9] + [0.8] * 15 + [0.7] * 15 + [0.55] * 15 + [0.45] * 15)
    assert [m for _, m in changes] == [FleetMode.CRITICAL, FleetMode.HIGH_LOAD, FleetMode.OPTIMAL]
    # 0.8 (>= 0.75) holds critical; 0.7 leaves it; 0.55 (>= 0.50) holds high load; 0.45 leaves it
    assert changes[1][0] == 1_000_000 + 16 * 1000
    assert changes[2][0] == 1_000_000 + 46 * 1000


def test_every_decider_shares_one_numbered_sequence_of_transitions(redis):
    books = [ModeBook(redis_client=redis, namespace="unit", settings=SETTINGS) for _ in range(3)]
    t = 1_000_000
    for i in range(60):  # three deciders measuring different loads, interleaved
        for j, b in enumerate(books):
            load = [0.95, 0.2, 0.65][(i + j) % 3]
            b.decide({"queue_load": load, "limiter_backlog": 0.0}, now_ms=t)
            t += 400
    log = books[0].transitions()
    assert [tr.seq for tr in log] == list(range(1, len(log) + 1))
    assert all(a.to_mode == b.from_mode for a, b in itertools.pairwise(log))
    assert books[1].read().mode == log[-1].to_mode and books[2].read().seq == len(log)


def test_the_mode_follows_its_largest_signal_and_names_it():
    assert dominant({"queue_load": 0.2, "limiter_backlog": 0.9, "breakers_open": 0.33}) == ("limiter_backlog", 0.9)


def test_a_transition_says_why(book):
    view, changed = book.decide({"queue_load": 0.1, "breakers_open": 0.67}, now_ms=5_000)
    assert changed and view.mode is FleetMode.HIGH_LOAD
    (tr,) = book.transitions()
    assert (tr.from_mode, tr.to_mode) == ("optimal", "high_load")
    assert tr.reason.startswith("breakers_open 0.670 >= high_load trigger 0.60")
    assert tr.signals == {"queue_load": 0.1, "breakers_open": 0.67}
    assert Mode(view.mode) is Mode.HIGH_LOAD


def test_the_fleet_goes_critical_when_most_of_its_fleet_wide_budget_is_gone(redis):
    """``budget_burn`` is measured (it was always 0): 90% of the fleet-wide day budget spent drives
    the mode past the critical trigger; a tenant's own budget spent does not."""
    from decimal import Decimal

    from config.catalog import load_catalog
    from tars_tasks.budgets import FLEET, Budgets
    from tars_tasks.fleetmode import measure_signals

    settings = Settings(_env_file=None, namespace="unit-burn-mode", max_queue_depth=0)
    b = Budgets(redis_client=redis, namespace=settings.namespace)
    b.set_limit(tenant="solo", period="day", usd=Decimal("1"))
    assert b.reserve(tenant="solo", reservation_id="s", usd=Decimal("1")) is None
    b.settle(tenant="solo", reservation_id="s", usd=Decimal("1"))
    assert measure_signals(settings=settings, catalog=load_catalog(), broker=None, state=redis)["budget_burn"] == 0
    b.set_limit(tenant=FLEET, period="day", usd=Decimal("10"))  # tracked from now on
    assert b.reserve(tenant="acme", reservation_id="r", usd=Decimal("9")) is None
    b.settle(tenant="acme", reservation_id="r", usd=Decimal("9"))
    signals = measure_signals(settings=settings, catalog=load_catalog(), broker=None, state=redis)
    assert signals["budget_burn"] == pytest.approx(0.9)
    view, changed = ModeBook(redis_client=redis, namespace=settings.namespace, settings=SETTINGS).decide(
        signals, now_ms=1_000_000)
    assert changed and view.mode == FleetMode.CRITICAL


def test_the_limiter_backlog_and_open_breakers_are_measured_from_the_limiters_and_breakers_own_state(redis):
    """The two signals read what the fleet limiter and the fleet breaker write (the other tests hand the
    script their values): the limiter booked 19 s ahead of a 30 s max wait is a 0.63 backlog, one of three
    tiers' breakers open is 0.33 — each past the high-load trigger — and a closed breaker counts nothing."""
    from config.catalog import load_catalog
    from tars_tasks.fleetmode import measure_signals
    from workers.breaker import FleetBreaker
    from workers.ratelimit import FleetRateLimiter, LimitSpec

    settings = Settings(_env_file=None, namespace="unit-signals", max_queue_depth=0, ratelimit_max_wait_s=30.0,
                        budgets_enabled=False)
    catalog = load_catalog()
    haiku, sonnet = catalog.spec("haiku"), catalog.spec("sonnet")
    assert measure_signals(settings=settings, catalog=catalog, broker=None, state=redis) == {
        "queue_load": 0.0, "limiter_backlog": 0.0, "breakers_open": 0.0, "budget_burn": 0.0}
    limiter = FleetRateLimiter(redis_client=redis, namespace=settings.namespace, max_wait_s=30.0)
    for _ in range(19):  # 60 a minute: one slot a second, the next free one 19 s from now
        assert limiter.try_reserve(provider=haiku.provider, model=haiku.model, limits=LimitSpec(rpm=60, tpm=10**9),
                                   tokens=1).granted
    breaker = FleetBreaker(redis_client=redis, namespace=settings.namespace, cooldown_s=60)
    assert breaker.record_failure(provider=sonnet.provider, model=sonnet.model, reason="test", trip=True)
    signals = measure_signals(settings=settings, catalog=catalog, broker=None, state=redis)
    assert signals["limiter_backlog"] == pytest.approx(19 / 30, abs=0.02)
    assert signals["breakers_open"] == pytest.approx(1 / 3, abs=0.001)
    breaker.reset(provider=sonnet.provider, model=sonnet.model)
    assert measure_signals(settings=settings, catalog=catalog, broker=None, state=redis)["breakers_open"] == 0.0
