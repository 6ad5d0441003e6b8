"""Cost controls in a loadgen session on a real fleet (local workers, Redis, Postgres): the cache
scenario's hits and savings, a budget crossed mid-run, an overload whose fleet mode changes — and
every figure of the cost-control sections, the phases tables among them, recomputed from the
JSONL rows (tests/loadgen/recompute.py)."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
import redis as redis_lib

from loadgen.report import write_report
from loadgen.runner import Runner
from loadgen.scenarios import PRESETS, Scenario
from tars_tasks.db.engine import get_engine
from tests.helpers import empty_tables, make_settings
from tests.loadgen.test_recompute import check_report

pytestmark = pytest.mark.integration

SCENARIOS = [
    PRESETS["cache"].with_overrides(duration_s=3, warmup_s=0.5, concurrency=10, prompt_pool=50, workers=1,
                                    worker_concurrency=20),
    PRESETS["budget"].with_overrides(duration_s=3, warmup_s=0.5, concurrency=5, workers=1, worker_concurrency=20),
    # 40 queued fill the bound: the fleet goes high load, then critical, and back when the load stops
    Scenario(name="overload", title="Overload on a small bound", concurrency=60, duration_s=4, warmup_s=0.5,
             workers=1, worker_concurrency=4, requires=("degradation_modes",)),
]


@pytest.fixture(scope="module")
def session(pg_url, redis_url, tmp_path_factory):
    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    empty_tables(get_engine(pg_url))
    env = {"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url, "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
           "TARS_CACHE_URL": redis_url, "TARS_SIM_LATENCY": "uniform:50:150", "TARS_SIM_FAILURE_RATE": "0",
           "TARS_TASK_EVENTS": "false", "TARS_MAX_QUEUE_DEPTH": "40", "TARS_MODE_INTERVAL_S": "0.1",
           "TARS_MODE_MIN_DWELL_S": "0.5"}
    out = tmp_path_factory.mktemp("lg-cost")
    runner = Runner(settings=make_settings(env), out_dir=out, mode="local", worker_env=env)
    s = runner.run(SCENARIOS)
    write_report(s, command="pytest")
    yield {"session": s, "out": out, "env": env}
    r.flushdb()


def _step(session, label):
    return next(st for sc in session["session"].scenarios for st in sc.steps if st.label == label)


def test_every_cost_control_figure_is_recomputed_from_the_rows(session):
    got = check_report(session["out"])
    assert got["runs"] == 3, got


def test_the_cache_scenario_answers_repeated_prompts_from_cache_and_counts_the_savings(session):
    cc = _step(session, "cache").aggregates["cost_controls"]
    assert cc["answered_by"].get("exact", 0) > 0 and cc["hit_rate"] > 0.3
    assert float(cc["saved_usd"]) > 0
    assert cc["latency_exact_ms"]["avg"] < cc["latency_model_ms"]["avg"]


def test_the_budget_scenario_crosses_its_budget_and_never_overspends(session):
    step = _step(session, "budget")
    cc = step.aggregates["cost_controls"]
    assert cc["budget"]["refused"] > 0
    assert float(cc["budget"]["overspend_usd"]) == 0
    assert float(cc["spent_usd"]) <= 0.05


def test_the_overload_phases_come_from_the_mode_changes_rows(session):
    step = _step(session, "overload")
    cc = step.aggregates["cost_controls"]
    rows = [json.loads(x) for x in (session["out"] / cc["file"]).read_text().splitlines() if x.strip()]
    assert cc["transitions"] >= 1 and len(cc["phases"]) >= 2
    assert {p["mode"] for p in cc["phases"]} & {"high_load", "critical"}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    # high load moved sonnet work to haiku: each such success saved its tokens' sonnet-minus-haiku price
    assert cc["savings"]["degraded_requests"] > 0 and Decimal(cc["saved_degradation_usd"]) > 0
    assert sum(cc["served_mode"].values()) == sum(1 for r in step.records if r.sampled and r.submitted_at)
