"""The loadgen ``batch`` scenario on a real local fleet: loadgen starts ``tars mock-llm`` (both batch
APIs, a 2 s batch delay), a worker process whose catalog points every tier at it over HTTP and one
``tars batch-runner``; the same requests go once interactive and once through the batch lane. Every
figure of the report — the lanes table, the ratio, the dollars saved by the batch lane, the prices —
is recomputed from the JSONL rows by tests/loadgen/recompute.py."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
import redis as redis_lib
from sqlalchemy import text

from loadgen.report import write_report
from loadgen.runner import Runner
from loadgen.scenarios import PRESETS
from tars_tasks.db.engine import get_engine
from tests.helpers import empty_tables, make_settings
from tests.loadgen.test_recompute import check_report

pytestmark = pytest.mark.integration

N = 24  # 12 requests of the mix, each sent interactive and batch


@pytest.fixture(scope="module")
def session(pg_url, redis_url, tmp_path_factory):
    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    engine = get_engine(pg_url)
    empty_tables(engine)
    env = {"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url, "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
           "TARS_TASK_EVENTS": "false"}
    out = tmp_path_factory.mktemp("lg-batch")
    runner = Runner(settings=make_settings(env), out_dir=out, mode="local", worker_env=env)
    sc = PRESETS["batch"].with_overrides(count=N, concurrency=N, worker_concurrency=20)
    s = runner.run([sc])
    write_report(s, command="pytest")
    with engine.connect() as conn:
        batches = [dict(b._mapping) for b in conn.execute(text(
            "SELECT tier, provider, state, request_count FROM provider_batches ORDER BY tier"))]
    yield {"session": s, "out": out, "batches": batches, "step": s.scenarios[0].steps[0]}
    r.flushdb()


def test_every_figure_of_the_batch_report_is_recomputed_from_the_rows(session):
    got = check_report(session["out"])
    assert got["runs"] == 1, got


def test_the_same_requests_went_once_per_lane_and_the_batch_lane_costs_the_batch_price(session):
    step = session["step"]
    cc = step.aggregates["cost_controls"]
    inter, bat = cc["lanes"]["rows"]
    assert (inter["lane"], bat["lane"]) == ("interactive", "batch")
    assert inter["requests"] == bat["requests"] == N // 2
    assert inter["succeeded"] == bat["succeeded"] == N // 2
    assert bat["batch_calls"] == N // 2 and inter["batch_calls"] == 0  # every batch request answered by a batch
    assert inter["tokens"] == bat["tokens"]  # same prompts, same max_tokens, the mock's fixed 200 output tokens
    assert abs(Decimal(cc["lanes"]["ratio"]) - Decimal("0.5")) < Decimal("1e-6")
    assert Decimal(cc["saved_batch_usd"]) == Decimal(inter["usd"]) - Decimal(bat["usd"])
    # the provider batches: done, one per tier the mix used, their members the batch-lane requests
    assert {b["state"] for b in session["batches"]} == {"done"}
    assert {b["provider"] for b in session["batches"]} == {"anthropic"}
    assert sum(b["request_count"] for b in session["batches"]) == N // 2
    assert step.aggregates["not_exercised"] == [] and step.aggregates["valid"]
    rows = [json.loads(x) for x in (session["out"] / f"requests-{step.run_id}.jsonl").read_text().splitlines()]
    assert sorted(r["lane"] for r in rows) == ["batch"] * (N // 2) + ["interactive"] * (N // 2)


def test_the_batch_lane_latency_shows_the_batch_delay(session):
    cc = session["step"].aggregates["cost_controls"]
    inter, bat = cc["lanes"]["rows"]
    delay_ms = cc["batch_timing"]["batch_delay_s"] * 1000
    assert bat["latency_ms"]["min"] >= delay_ms  # the mock ends a batch only batch_delay_s after its creation
    assert bat["latency_ms"]["avg"] > inter["latency_ms"]["avg"]
    md = (session["out"] / "report.md").read_text()
    assert "the mock ends each batch 2 s after it was created" in md
    assert "Batch ÷ interactive dollars per request: **0.5000**" in md
