"""Budgets with real workers, Redis and Postgres: several workers never spend a tenant's budget
beyond what its reservations covered, queued work that meets a spent budget fails ``budget``,
new submits raise ``BudgetExceeded`` with nothing written, and a worker killed between reserving
and settling leaves the budget consistent (nothing left reserved, nothing under-counted)."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from sqlalchemy import text

from tars_tasks.budgets import Budgets
from tars_tasks.errors import BudgetExceeded
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


def _budgets(env, **kw) -> Budgets:
    from tars_tasks.redis_client import get_redis

    s = make_settings(env)
    return Budgets(redis_client=get_redis(s.shared_redis_url, settings=s), namespace=s.namespace,
                   lease_s=kw.get("lease_s", s.budget_reservation_lease_s))


def _spent_by_tenant(db, tenant: str) -> Decimal:
    with db.connect() as conn:
        return conn.execute(text("SELECT coalesce(sum(a.cost_usd), 0) FROM api_calls a JOIN requests r "
                                 "ON r.id = a.request_id WHERE r.tenant = :t"), {"t": tenant}).scalar_one()


def test_several_workers_never_spend_a_budget_beyond_its_reservations(fleet_env, start_worker, db):
    from tars_tasks.client import TarsClient

    env = {**fleet_env, "TARS_SIM_LATENCY": "uniform:50:150"}
    limit = Decimal("0.05")
    b = _budgets(env)
    b.set_limit(tenant="acme", period="day", usd=limit)
    for _ in range(3):
        start_worker(tiers=["haiku"], concurrency=20, env=env)
    with TarsClient(settings=make_settings(env)) as tars:
        # each haiku call costs about $0.0005-0.002 and reserves its worst case: ~0.05/0.0024 fit at once
        handles = tars.submit_many([{"role": "researcher", "prompt": f"question {i} " + "words " * 200,
                                     "tenant": "acme", "max_tokens": 400} for i in range(120)])
        results = tars.wait_many([h.id for h in handles], timeout=120)
        other = tars.submit(role="researcher", prompt="someone else", tenant="globex").wait(timeout=60)
        with pytest.raises(BudgetExceeded) as info:
            for _ in range(50):  # the last settles bring it to the limit's edge, then past the soft share
                tars.submit(role="researcher", prompt="more", tenant="acme", max_tokens=400).wait(timeout=60)
    assert info.value.tenant == "acme" and info.value.period.startswith("day:")
    statuses = [(r.status, r.failure_reason) for r in results]
    ok = statuses.count(("succeeded", None))
    refused = statuses.count(("failed", "budget"))
    assert ok + refused == 120 and ok > 0 and refused > 0
    assert other.status == "succeeded"  # another tenant is not limited
    real = _spent_by_tenant(db, "acme")
    day = b.state("acme")[0]
    assert day.reserved_usd == 0  # every reservation settled
    assert day.spent_usd == real  # the budget's spend is the bill
    # never beyond the limit: every call was sent inside a granted worst-case reservation
    assert real <= limit, (real, limit)
    with db.connect() as conn:
        refused_rows = conn.execute(text("SELECT count(*) FROM requests r WHERE failure_reason = 'budget' AND "
                                         "EXISTS (SELECT 1 FROM api_calls a WHERE a.request_id = r.id)")).scalar_one()
    assert refused_rows == 0  # refused before any attempt: nothing billed


def test_a_fleet_wide_budget_binds_all_tenants_together_across_workers(fleet_env, start_worker, db):
    """``tars budget set '*'``: tenants with no budget of their own share the fleet's; several workers
    never spend it beyond its reservations; once spent, every tenant's submit is refused naming the
    fleet; the fleet's spend is the bill."""
    from tars_tasks.budgets import FLEET
    from tars_tasks.client import TarsClient

    env = {**fleet_env, "TARS_SIM_LATENCY": "uniform:50:150"}
    limit = Decimal("0.04")
    b = _budgets(env)
    b.set_limit(tenant=FLEET, period="day", usd=limit)
    for _ in range(2):
        start_worker(tiers=["haiku"], concurrency=20, env=env)
    with TarsClient(settings=make_settings(env)) as tars:
        handles = tars.submit_many([{"role": "researcher", "prompt": f"question {i} " + "words " * 200,
                                     "tenant": ("acme", "globex")[i % 2], "max_tokens": 400} for i in range(120)])
        results = tars.wait_many([h.id for h in handles], timeout=120)
        refusals = []
        for tenant in ("acme", "globex", "initech"):
            with pytest.raises(BudgetExceeded) as info:
                for _ in range(50):
                    tars.submit(role="researcher", prompt="more", tenant=tenant, max_tokens=400).wait(timeout=60)
            refusals.append(str(info.value))
    assert all(r.startswith("the fleet has spent its day:") for r in refusals), refusals
    statuses = [(r.status, r.failure_reason) for r in results]
    assert statuses.count(("succeeded", None)) > 0 and statuses.count(("failed", "budget")) > 0
    with db.connect() as conn:
        real = conn.execute(text("SELECT coalesce(sum(cost_usd), 0) FROM api_calls")).scalar_one()
    day = b.state(FLEET)[0]
    assert day.reserved_usd == 0 and day.spent_usd == real  # every reservation settled; its spend is the bill
    assert real <= limit, (real, limit)


def test_past_the_soft_threshold_a_tenants_sonnet_work_moves_to_the_cheaper_tier_and_a_worker_runs_it_there(
        fleet_env, start_worker, db):
    """80% (the default ``budget_soft_fraction``) of a tenant's day spent: its below-limit sonnet work is
    queued on haiku and answered there; just below it, and for another tenant, sonnet stays sonnet."""
    from tars_tasks.client import TarsClient

    b = _budgets(fleet_env)
    for tenant, spent in (("acme", "0.80"), ("initech", "0.79")):
        b.set_limit(tenant=tenant, period="day", usd=Decimal("1"))
        assert b.reserve(tenant=tenant, reservation_id=f"{tenant}-r", usd=Decimal(spent)) is None
        b.settle(tenant=tenant, reservation_id=f"{tenant}-r", usd=Decimal(spent))
    start_worker(tiers=["haiku", "sonnet"], concurrency=10, env=fleet_env)
    with TarsClient(settings=make_settings(fleet_env)) as tars:
        handles = {t: tars.submit(role="engineer", prompt="write a parser", tenant=t, max_tokens=200)
                   for t in ("acme", "initech", "globex")}
        done = {t: tars.wait(h.id, timeout=60) for t, h in handles.items()}
    assert handles["acme"].tier == "haiku"
    assert {t: (r.status, r.tier_used) for t, r in done.items()} == {
        "acme": ("succeeded", "haiku"), "initech": ("succeeded", "sonnet"), "globex": ("succeeded", "sonnet")}
    with db.connect() as conn:
        rows = dict(conn.execute(text("SELECT tenant, tier_requested || '>' || tier_queued FROM requests")).all())
    assert rows == {"acme": "sonnet>haiku", "initech": "sonnet>sonnet", "globex": "sonnet>sonnet"}
    assert b.state("acme")[0].spent_usd == Decimal("0.80") + _spent_by_tenant(db, "acme")  # its call was settled


def test_a_worker_killed_between_reserving_and_settling_leaves_the_budget_consistent(fleet_env, start_worker, db):
    from tars_tasks.client import TarsClient

    env = {**fleet_env, "TARS_SIM_LATENCY": "fixed:3000", "TARS_BUDGET_RESERVATION_LEASE_S": "4"}
    b = _budgets(env, lease_s=4)
    b.set_limit(tenant="acme", period="month", usd=Decimal("100"))
    victim = start_worker(tiers=["haiku"], concurrency=20, env=env)
    with TarsClient(settings=make_settings(env)) as tars:
        handles = tars.submit_many([{"role": "researcher", "prompt": f"q{i}", "tenant": "acme"} for i in range(10)])
        # every call reserved (the calls take 3 s): the reservation stops growing, whether the ten
        # came as ten messages or as one bundle whose members reserve one after another
        deadline, last = time.monotonic() + 30, Decimal(-1)
        while time.monotonic() < deadline:
            now = b.state("acme")[1].reserved_usd
            if now > 0 and now == last:
                break
            last = now
            time.sleep(0.3)
        reserved_at_kill = b.state("acme")[1].reserved_usd
        assert reserved_at_kill > 0
        victim.kill()  # SIGKILL mid call: reserved, never settled
        start_worker(tiers=["haiku"], concurrency=20, env={**env, "TARS_SIM_LATENCY": "uniform:20:60"})
        results = tars.wait_many([h.id for h in handles], timeout=120)
    assert [r.status for r in results] == ["succeeded"] * 10
    deadline = time.monotonic() + 30
    while b.state("acme")[1].reserved_usd != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the dead worker's leases expire; the next script charges them
    month = b.state("acme")[1]
    billed = _spent_by_tenant(db, "acme")  # includes the killed attempts' estimates ("outcome unknown")
    assert month.reserved_usd == 0
    assert month.expired >= 1
    assert month.spent_usd >= billed  # never under-counted
    assert month.spent_usd <= billed + reserved_at_kill  # over by at most what the dead worker had reserved


def test_budget_set_and_show_and_the_budget_in_status_and_metrics(fleet_env, db, redis):
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**os.environ, **fleet_env}

    def tars(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert (out.returncode == 0) == ok, out.stderr
        return out

    tars("budget", "set", "acme", "--day", "2.5", "--month", "40")
    bad = tars("budget", "set", "acme", "--day", "-1", ok=False)
    assert bad.returncode == 2 and "--day" in bad.stderr and len(bad.stderr.strip().splitlines()[-1]) < 200
    b = _budgets(fleet_env)
    b.reserve(tenant="acme", reservation_id="r1", usd=Decimal("0.5"))
    b.settle(tenant="acme", reservation_id="r1", usd=Decimal("0.25"))
    shown = json.loads(tars("budget", "show", "--json").stdout)
    day, month = shown["acme"]
    assert (day["limit_usd"], day["spent_usd"], day["reserved_usd"]) == ("2.5", "0.25", "0")
    assert month["limit_usd"] == "40" and day["used"] == 0.1
    status = json.loads(tars("status", "--json").stdout)
    assert status["budgets"]["acme"][0]["spent_usd"] == "0.25"
    assert status["fleet_mode"] == {} or status["fleet_mode"]["mode"] == "optimal"
    assert "saved_usd" in status["cache"]
    metrics = tars("metrics", "show").stdout
    assert 'tars_budget_usd{measure="spent",period="day",tenant="acme"} 0.25' in metrics
    assert 'tars_budget_usd{measure="limit",period="month",tenant="acme"} 40.0' in metrics
    tars("budget", "set", "acme", "--clear")
    assert json.loads(tars("budget", "show", "--json").stdout) == {}


def test_a_tenants_budget_applies_to_every_step_of_its_jobs(fleet_env, start_worker, db):
    """A job's steps are the tenant's requests: jobs run one after another until the budget no
    longer fits; a step that no longer fits fails with reason ``budget`` (no attempt, $0) and its
    job with it; then a new job is refused (BudgetExceeded) before anything is written; the
    budget's spend equals the jobs' bill and stays within the limit."""
    from tars_tasks.client import TarsClient

    env = {**fleet_env, "TARS_SIM_LATENCY": "uniform:20:60"}
    b = _budgets(env)
    limit = Decimal("0.08")
    b.set_limit(tenant="acme", period="day", usd=limit)
    start_worker(tiers=["haiku", "sonnet"], concurrency=20, env=env)
    ended = []
    with TarsClient(settings=make_settings(env)) as tars:
        with pytest.raises(BudgetExceeded):
            for i in range(100):  # each job: three researchers, a writer, a validator
                job = tars.submit_job(template="research-write-validate", tenant="acme",
                                      input={"question": f"q{i} " + "words " * 300, "topics": ["a", "b", "c"]})
                ended.append(tars.wait_job(job.id, timeout=60))
        before = _scalar_jobs(db)
        with pytest.raises(BudgetExceeded):
            tars.submit_job(template="research-write-validate", tenant="acme",
                            input={"question": "one more " + "words " * 300, "topics": ["a", "b", "c"]})
        assert _scalar_jobs(db) == before  # refused: nothing written
        other = tars.submit_job(template="research-write-validate", tenant="globex",
                                input={"question": "another tenant", "topics": ["a"]})
        assert tars.wait_job(other.id, timeout=60).status == "succeeded"
    assert [j.status for j in ended].count("succeeded") >= 1
    for j in ended:
        if j.status != "succeeded":
            assert j.status == "failed" and "budget" in (j.error or ""), (j.status, j.error)
    with db.connect() as conn:
        billed_refusals = conn.execute(text(
            "SELECT count(*) FROM requests r WHERE r.failure_reason = 'budget' AND "
            "EXISTS (SELECT 1 FROM api_calls a WHERE a.request_id = r.id)")).scalar_one()
        unmoded = conn.execute(text("SELECT count(*) FROM requests WHERE served_mode IS NULL")).scalar_one()
    assert billed_refusals == 0
    assert unmoded == 0  # every step records the fleet mode it was admitted under
    day = b.state("acme")[0]
    assert day.reserved_usd == 0
    assert day.spent_usd == _spent_by_tenant(db, "acme") <= limit


def _scalar_jobs(db) -> tuple[int, int]:
    with db.connect() as conn:
        return (conn.execute(text("SELECT count(*) FROM jobs")).scalar_one(),
                conn.execute(text("SELECT count(*) FROM requests")).scalar_one())
