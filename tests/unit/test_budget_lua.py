"""The budget scripts on real Redis: a reservation fits or is refused atomically, settling releases
it and adds the real cost, an expired one (its worker died) is charged at its worst case, and a
late settle corrects that charge; ``reserved`` always returns to 0."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from tars_tasks.budgets import Budgets


@pytest.fixture
def budgets(redis) -> Budgets:
    b = Budgets(redis_client=redis, namespace="unit", lease_s=60)
    b.set_limit(tenant="acme", period="day", usd=Decimal("1.00"))
    return b


def _day(b: Budgets, tenant: str = "acme"):
    return b.state(tenant)[0]


def test_a_tenant_without_a_limit_is_not_tracked(budgets):
    assert budgets.reserve(tenant="globex", reservation_id="r1", usd=Decimal("5")) is None
    assert _day(budgets, "globex").reserved_usd == 0 and _day(budgets, "globex").limit_usd is None


def test_reservations_that_would_pass_the_limit_are_refused_and_settling_adds_the_real_cost(budgets):
    assert budgets.reserve(tenant="acme", reservation_id="r1", usd=Decimal("0.60")) is None
    refusal = budgets.reserve(tenant="acme", reservation_id="r2", usd=Decimal("0.50"))
    assert refusal is not None and refusal.used_usd == Decimal("0.6") and refusal.limit_usd == Decimal("1")
    assert budgets.reserve(tenant="acme", reservation_id="r2", usd=Decimal("0.40")) is None  # exactly fits
    assert _day(budgets).used_fraction == 1.0
    assert budgets.settle(tenant="acme", reservation_id="r1", usd=Decimal("0.123456789")) == "settled"
    d = _day(budgets)
    assert (d.spent_usd, d.reserved_usd) == (Decimal("0.123456789"), Decimal("0.4"))
    assert budgets.settle(tenant="acme", reservation_id="r1", usd=Decimal("0.1")) == "none"  # settled once


def test_a_retry_grows_its_reservation_and_one_settle_releases_all_of_it(budgets):
    budgets.reserve(tenant="acme", reservation_id="r1", usd=Decimal("0.2"))
    budgets.reserve(tenant="acme", reservation_id="r1", usd=Decimal("0.3"))
    assert _day(budgets).reserved_usd == Decimal("0.5")
    budgets.settle(tenant="acme", reservation_id="r1", usd=Decimal("0.25"))
    d = _day(budgets)
    assert (d.spent_usd, d.reserved_usd) == (Decimal("0.25"), 0)


def test_a_reservation_never_settled_is_charged_at_its_worst_case_and_a_late_settle_corrects_it(redis):
    b = Budgets(redis_client=redis, namespace="unit", lease_s=0.2)
    b.set_limit(tenant="acme", period="month", usd=Decimal("10"))
    b.reserve(tenant="acme", reservation_id="dead", usd=Decimal("0.7"))
    b.reserve(tenant="acme", reservation_id="slow", usd=Decimal("0.5"))
    time.sleep(0.3)  # both leases expire (a killed worker, a slow one)
    month = b.state("acme")[1]
    assert (month.spent_usd, month.reserved_usd, month.expired) == (Decimal("1.2"), 0, 2)
    assert b.settle(tenant="acme", reservation_id="slow", usd=Decimal("0.1")) == "corrected"
    month = b.state("acme")[1]
    assert (month.spent_usd, month.reserved_usd) == (Decimal("0.8"), 0)  # 0.7 worst case + 0.1 real


def test_limits_are_per_period_and_a_removed_limit_stops_refusing(budgets):
    budgets.set_limit(tenant="acme", period="month", usd=Decimal("0.5"))
    refusal = budgets.reserve(tenant="acme", reservation_id="r", usd=Decimal("0.6"))
    assert refusal is not None and refusal.period == "month"
    budgets.set_limit(tenant="acme", period="month", usd=None)
    assert budgets.reserve(tenant="acme", reservation_id="r", usd=Decimal("0.6")) is None
    assert budgets.tenants() == ["acme"]


def test_a_fleet_wide_budget_binds_every_tenant_together_and_is_the_fleets_budget_burn(redis):
    """``*``'s limits bind all tenants' calls together on top of each one's own; a refusal by either
    reserves nothing in the other; its share used is the fleet mode's ``budget_burn``; a tenant at
    its own limit does not move it."""
    from tars_tasks.budgets import FLEET

    b = Budgets(redis_client=redis, namespace="unit-fleet", lease_s=60)
    b.set_limit(tenant="small", period="day", usd=Decimal("1"))
    assert b.fleet_burn() == 0.0  # no fleet-wide budget
    assert b.reserve(tenant="small", reservation_id="s1", usd=Decimal("1")) is None
    b.settle(tenant="small", reservation_id="s1", usd=Decimal("1"))
    assert b.fleet_burn() == 0.0  # one tenant at its own limit is that tenant's business
    b.set_limit(tenant=FLEET, period="day", usd=Decimal("10"))
    assert b.reserve(tenant="a", reservation_id="a1", usd=Decimal("6")) is None  # unbudgeted tenants count too
    assert b.fleet_burn() == pytest.approx(0.6)  # in flight counts
    refusal = b.reserve(tenant="c", reservation_id="c1", usd=Decimal("5"))
    assert refusal is not None and refusal.scope == FLEET and refusal.period == "day"
    b.settle(tenant="a", reservation_id="a1", usd=Decimal("8"))
    assert b.fleet_burn() == pytest.approx(0.8)
    # a tenant's own limit refuses first: nothing is left reserved in the fleet's budget
    b.set_limit(tenant="d", period="day", usd=Decimal("0.5"))
    refusal = b.reserve(tenant="d", reservation_id="d1", usd=Decimal("1"))
    assert refusal is not None and refusal.scope == "d"
    assert b.state(FLEET)[0].reserved_usd == 0
    # the fleet refusing a retry's reservation takes back only that attempt's amount from the tenant
    assert b.reserve(tenant="e", reservation_id="e1", usd=Decimal("1")) is None
    b.set_limit(tenant="e", period="day", usd=Decimal("100"))
    assert b.reserve(tenant="e", reservation_id="e1", usd=Decimal("1")) is None
    assert b.reserve(tenant="e", reservation_id="e1", usd=Decimal("5")).scope == FLEET
    assert b.state("e")[0].reserved_usd == Decimal("1")


def test_several_tenants_states_read_in_one_pipeline_are_each_tenants_own(budgets, redis):
    from tars_tasks.budgets import FLEET

    budgets.set_limit(tenant=FLEET, period="month", usd=Decimal("10"))
    budgets.reserve(tenant="acme", reservation_id="r1", usd=Decimal("0.25"))
    budgets.reserve(tenant="globex", reservation_id="r2", usd=Decimal("0.5"))  # no limit of its own: fleet only
    one_by_one = {s: budgets.state(s) for s in ("acme", "globex", FLEET)}
    sent = []
    real = redis.pipeline

    def counting(*a, **kw):
        p = real(*a, **kw)
        sent.append(p)
        return p

    redis.pipeline = counting
    try:
        together = budgets.states(["acme", "globex", FLEET, "acme"])
    finally:
        redis.pipeline = real
    assert together == one_by_one
    assert len(sent) == 1  # one round trip for the three
    assert together[FLEET][1].reserved_usd == Decimal("0.75")  # both reservations against the fleet's month
