"""The multi-agent scenario runs real jobs on a local fleet (worker processes, Redis, Postgres) and every
figure of its report — the request tables and the jobs table — is recomputed from its JSONL rows."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib
from sqlalchemy import text

from loadgen.report import write_report
from loadgen.runner import Runner
from loadgen.scenarios import get_scenario
from tars_tasks.db.engine import get_engine
from tests.helpers import empty_tables, make_settings
from tests.loadgen.test_recompute import check_report

pytestmark = pytest.mark.integration


def test_the_multi_agent_scenario_runs_jobs_and_its_figures_add_up(pg_url, redis_url, tmp_path):
    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    engine = get_engine(pg_url)
    empty_tables(engine)
    env = {"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url, "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
           "TARS_SIM_LATENCY": "uniform:50:200", "TARS_SIM_FAILURE_RATE": "0.05", "TARS_TASK_EVENTS": "false"}
    sc = get_scenario("multi-agent").with_overrides(count=16, concurrency=8, workers=3, worker_concurrency=20,
                                                     reject_share=0.5)
    runner = Runner(settings=make_settings(env), out_dir=tmp_path, mode="local", worker_env=env)
    session = runner.run([sc])
    write_report(session, command="pytest")
    (step,) = session.scenarios[0].steps
    jobs = step.aggregates["jobs"]
    assert step.aggregates["valid"], step.aggregates["invalid_reasons"]
    assert jobs["jobs"] == 16 and jobs["by_status"] == {"succeeded": 16}
    assert jobs["revisions"] >= 1 and jobs["workers_seen"] == 3
    with engine.connect() as conn:
        steps = conn.execute(text("SELECT count(*) FROM requests WHERE run_id = :r"), {"r": step.run_id}).scalar()
        cost = conn.execute(text("SELECT SUM(a.cost_usd) FROM api_calls a JOIN requests q ON q.id = a.request_id "
                                 "WHERE q.run_id = :r"), {"r": step.run_id}).scalar()
    assert steps == jobs["steps"] == 16 * 5 + 2 * jobs["revisions"]
    assert str(cost) == jobs["cost_usd"]["total"]
    got = check_report(tmp_path)
    assert got["figures"] > 60, got
    r.flushdb()
