"""The batch lane end to end: batch-lane requests submitted through the producer API are recorded and
never queued, gathered per tier into one provider batch each (Anthropic Message Batches for haiku,
OpenAI Batch for sonnet) by a real ``tars batch-runner`` process, and finished like interactive
answers — one ``api_calls`` row per request with every token class at the catalog's batch price
(half the list price), the completion notice, a permanent error failed with its reason, an expired
request sent on to the interactive lane and answered there by a real worker."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from celery import Celery

from config.catalog import load_catalog
from tars_tasks.client import TarsClient
from tars_tasks.errors import InvalidRequest
from tests.helpers import make_settings, waiting_messages
from tests.integration.batch_lane_support import (
    batch_env,
    batches_created,
    rows,
    start_runner,
    wait_batch_lane_row,
    wait_batches_done,
)
from tests.integration.model_calls_support import mock_llm  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_batch_lane_requests_are_answered_through_both_batch_apis_at_the_batch_price(
        fleet_env, tmp_path, mock_llm, start_worker, db, redis):  # noqa: F811
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "30:30", "--config-json", '{"batch_delay_s": 1.0}')
    env = batch_env(fleet_env, tmp_path, mock)
    start_worker(tiers=["haiku", "sonnet"], concurrency=10, env=env)
    with TarsClient(settings=make_settings(env)) as client:
        plain = [client.submit(role="researcher", prompt=f"haiku question {i}", lane="batch") for i in range(4)]
        gpt = [client.submit(role="engineer", prompt=f"sonnet question {i}", lane="batch") for i in range(3)]
        bad = client.submit(role="researcher", prompt="[[mock:status=400]] refused", lane="batch")
        late = client.submit(role="researcher", prompt="[[mock:batch_expired]] too late", lane="batch")
        ids = [h.id for h in (*plain, *gpt, bad, late)]
        assert waiting_messages(redis) == 0  # recorded, never queued
        # a plain-Celery message may ask for the batch lane too: the worker records it and leaves it
        foreign = str(uuid.uuid4())
        Celery("someone-else", broker=env["TARS_BROKER_URL"]).send_task(
            "tars.run_request", kwargs={"role": "researcher", "prompt": "plain, batched", "lane": "batch"},
            task_id=foreign, queue="tars.haiku")
        wait_batch_lane_row(db, foreign)
        assert rows(db, "SELECT id FROM api_calls WHERE request_id = :r", r=foreign) == []
        ids.append(foreign)
        runner = start_runner(env, tmp_path / "runner.log")
        try:
            results = {r.id: r for r in client.wait_many(ids, timeout=90)}
            wait_batches_done(db)
        finally:
            runner.stop()

    assert batches_created(mock) == {"anthropic": 1, "openai": 1}
    catalog = load_catalog(Path(env["TARS_CATALOG_PATH"]))
    for rid in (*(h.id for h in (*plain, *gpt)), foreign):
        r = results[rid]
        assert r.status == "succeeded" and r.attempts == 1 and r.output_tokens == 30, r
        (call,) = rows(db, "SELECT * FROM api_calls WHERE request_id = :r", r=rid)
        assert call["outcome"] == "ok" and call["worker"].startswith("batch-runner@")
        spec = catalog.spec(r.tier_used)
        assert spec.prices.batch_multiplier == Decimal("0.5")
        interactive = spec.cost_usd(input_tokens=call["input_tokens"], output_tokens=call["output_tokens"],
                                    cache_read_tokens=call["cache_read_tokens"])
        assert call["cost_usd"] == interactive * Decimal("0.5") == r.cost_usd > 0
    assert {results[h.id].tier_used for h in gpt} == {"sonnet"}
    assert results[bad.id].status == "failed" and results[bad.id].failure_reason == "permanent_error"
    (refused,) = rows(db, "SELECT outcome, http_status, cost_usd FROM api_calls WHERE request_id = :r", r=bad.id)
    assert (refused["outcome"], refused["http_status"], refused["cost_usd"]) == ("permanent_error", 400, 0)
    # expired in the batch (no call, nothing billed): sent on to haiku's queue and answered by the worker
    assert results[late.id].status == "succeeded"
    (again,) = rows(db, "SELECT worker FROM api_calls WHERE request_id = :r", r=late.id)
    assert not again["worker"].startswith("batch-runner@")
    items = {r["request_id"]: r for r in rows(db, "SELECT * FROM batch_items")}
    assert items[late.id]["outcome"] == "expired" and items[late.id]["retried"] is True
    assert rows(db, "SELECT lane FROM requests WHERE id = :r", r=late.id) == [{"lane": "interactive"}]
    assert {r["state"] for r in rows(db, "SELECT state FROM provider_batches")} == {"done"}
    stats = mock.stats()["models"]
    assert stats["mock-haiku"]["total"]["batched"] == 6  # 4 + plain + the refused one; the expired one never ran
    assert stats["mock-haiku"]["total"]["requests"] == 7  # ... and then once interactively


def test_the_lane_is_validated_before_anything_is_written(fleet_env, tmp_path, mock_llm, db):  # noqa: F811
    mock = mock_llm("--latency", "fixed:5")
    with TarsClient(settings=make_settings(batch_env(fleet_env, tmp_path, mock))) as client:
        with pytest.raises(InvalidRequest) as bad:
            client.submit(role="researcher", prompt="x", lane="overnight")
        assert bad.value.field == "lane"
    with TarsClient(settings=make_settings(fleet_env)) as client:  # the simulated provider has no batch API
        with pytest.raises(InvalidRequest, match="batch API") as sim:
            client.submit(role="researcher", prompt="x", lane="batch")
        assert sim.value.field == "lane"
    assert rows(db, "SELECT id FROM requests") == []


def test_tars_status_shows_the_requests_waiting_for_a_batch_and_the_batches_in_flight(
        fleet_env, tmp_path, mock_llm, db):  # noqa: F811
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    mock = mock_llm("--latency", "fixed:5", "--config-json", '{"batch_delay_s": 600}')
    env = {**batch_env(fleet_env, tmp_path, mock), "TARS_BATCH_MAX_AGE_S": "3600"}
    with TarsClient(settings=make_settings(env)) as client:
        for i in range(3):
            client.submit(role="researcher", prompt=f"question {i}", lane="batch")

    def tars(*args, **extra):
        out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", *args], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, **env, **extra}, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    before = json.loads(tars("status", "--json"))["batches"]
    assert before == {"waiting": {"haiku": 3}, "in_flight": []}
    tars("batch-runner", "--once", TARS_BATCH_MAX_AGE_S="0")  # forms and submits; the mock takes 600 s
    after = json.loads(tars("status", "--json"))["batches"]
    assert after["waiting"] == {}
    (b,) = after["in_flight"]
    assert (b["tier"], b["provider"], b["state"], b["requests"]) == ("haiku", "anthropic", "submitted", 3)
    assert b["provider_batch_id"].startswith("msgbatch_")
    assert "Batch lane: provider batches in flight" in tars("status")


def test_with_the_fail_policy_a_request_the_batch_did_not_answer_fails_batch_expired(
        fleet_env, tmp_path, mock_llm, db):  # noqa: F811
    mock = mock_llm("--latency", "fixed:5", "--config-json", '{"batch_delay_s": 0.5}')
    env = batch_env(fleet_env, tmp_path, mock, TARS_BATCH_RETRY_POLICY="fail", TARS_BATCH_MAX_AGE_S="0")
    with TarsClient(settings=make_settings(env)) as client:
        ok = client.submit(role="engineer", prompt="answered", lane="batch")
        late = client.submit(role="engineer", prompt="[[mock:batch_expired]] too late", lane="batch")
        runner = start_runner(env, tmp_path / "runner.log")
        try:
            done = {r.id: r for r in client.wait_many([ok.id, late.id], timeout=60)}
            wait_batches_done(db)
        finally:
            runner.stop()
    assert done[ok.id].status == "succeeded"
    assert (done[late.id].status, done[late.id].failure_reason, done[late.id].cost_usd) == ("failed",
                                                                                         "batch_expired", 0)
    assert rows(db, "SELECT id FROM api_calls WHERE request_id = :r", r=late.id) == []  # no call was made
    assert rows(db, "SELECT lane FROM requests WHERE id = :r", r=late.id) == [{"lane": "batch"}]


def test_batch_lane_calls_are_reserved_and_settled_against_the_tenants_budget(
        fleet_env, tmp_path, mock_llm, db):  # noqa: F811
    """A batch request's worst case (at the batch price) is reserved before its batch is sent: members
    the budget cannot cover fail ``budget`` with no call; the rest are settled to their real cost, so
    the budget's spend is the bill and never above the limit."""
    from tars_tasks.budgets import Budgets
    from tars_tasks.redis_client import get_redis

    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "30:30", "--config-json", '{"batch_delay_s": 0.5}')
    env = {**batch_env(fleet_env, tmp_path, mock), "TARS_BATCH_MAX_AGE_S": "1"}
    s = make_settings(env)
    budgets = Budgets(redis_client=get_redis(s.shared_redis_url, settings=s), namespace=s.namespace)
    catalog = load_catalog(Path(env["TARS_CATALOG_PATH"]))
    spec = catalog.spec("haiku")
    prompt = "words " * 400
    from workers.providers.request import ModelRequest

    one = spec.cost_usd(input_tokens=ModelRequest.from_prompt(prompt).estimated_input_tokens(),
                        output_tokens=400, batch=True)
    limit = one * Decimal("3.5")  # room for three worst cases
    budgets.set_limit(tenant="acme", period="day", usd=limit)
    with TarsClient(settings=s) as client:
        handles = [client.submit(role="researcher", prompt=f"{i} {prompt}", lane="batch", tenant="acme",
                                 max_tokens=400) for i in range(8)]
        runner = start_runner(env, tmp_path / "runner.log")
        try:
            results = client.wait_many([h.id for h in handles], timeout=90)
            wait_batches_done(db)
        finally:
            runner.stop()
    outcomes = sorted((r.status, r.failure_reason) for r in results)
    assert outcomes.count(("succeeded", None)) == 3 and outcomes.count(("failed", "budget")) == 5, outcomes
    refused = [r.id for r in results if r.failure_reason == "budget"]
    assert rows(db, "SELECT id FROM api_calls WHERE request_id = ANY(:ids)", ids=refused) == []
    (billed,) = rows(db, "SELECT coalesce(sum(cost_usd), 0) AS usd FROM api_calls")
    day = budgets.state("acme")[0]
    assert day.reserved_usd == 0 and day.spent_usd == billed["usd"] > 0 and day.spent_usd <= limit


def test_a_batch_answer_fills_the_response_cache_and_serves_the_same_request_at_submit(
        fleet_env, tmp_path, mock_llm, db, redis):  # noqa: F811
    """A batch-lane answer is an answer like a worker's: the same canonical request asked again (here
    interactively) is served from the cache at submit, with no call, saving what the batch call cost."""
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "30:30", "--config-json", '{"batch_delay_s": 0.5}')
    env = batch_env(fleet_env, tmp_path, mock, TARS_CACHE_URL=fleet_env["TARS_BROKER_URL"])
    ask = {"role": "researcher", "prompt": "what does a batch answer cost?", "temperature": 0}
    with TarsClient(settings=make_settings(env)) as client:
        batched = [client.submit(**ask, lane="batch"),
                   client.submit(role="researcher", prompt="sampled: never cached", temperature=0.7, lane="batch")]
        runner = start_runner(env, tmp_path / "runner.log")
        try:
            first, sampled = client.wait_many([h.id for h in batched], timeout=60)
            wait_batches_done(db)
        finally:
            runner.stop()
        assert first.status == sampled.status == "succeeded"
        again = client.submit(**ask)
        hit = client.wait(again.id, timeout=5)  # a hit is recorded at submit; a miss would wait for a worker
        other = client.submit(role="researcher", prompt="sampled: never cached", temperature=0.7)
    assert hit.status == "succeeded" and hit.answered_by == "exact", hit
    assert hit.result == first.result and hit.cost_usd == 0 and hit.saved_usd == first.cost_usd > 0
    assert rows(db, "SELECT id FROM api_calls WHERE request_id = :r", r=again.id) == []
    # the sampled one was not cached: asked again, it is queued for a model
    assert rows(db, "SELECT answered_by, status FROM requests WHERE id = :r", r=other.id) == [
        {"answered_by": None, "status": "queued"}]


BATCH_JOB = {
    "description": "research overnight at half price, write at once, check overnight",
    "output": "check",
    "steps": [
        {"name": "gather", "role": "researcher", "lane": "batch", "prompt": "Research: {{ input.question }}"},
        {"name": "write", "role": "engineer", "after": ["gather"], "prompt": "Write from: {{ steps.gather.output }}"},
        {"name": "check", "role": "researcher", "lane": "batch", "after": ["write"],
         "prompt": "Check: {{ steps.write.output }}"},
    ],
}


def test_a_jobs_batch_lane_steps_go_through_provider_batches_and_the_job_goes_on_after_each(
        fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    """A job step may take the batch lane (``lane = "batch"`` in the template): recorded and left to the
    batch runner, answered at the batch price, and its finish schedules the next steps in the same commit
    as a worker's does — here batch -> interactive -> batch."""
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "20:20", "--config-json", '{"batch_delay_s": 0.5}')
    env = batch_env(fleet_env, tmp_path, mock)
    start_worker(tiers=["haiku", "sonnet"], concurrency=5, env=env)
    runner = start_runner(env, tmp_path / "runner.log")
    try:
        with TarsClient(settings=make_settings(env)) as client:
            job = client.submit_job(template=BATCH_JOB, input={"question": "why batch?"})
            view = job.wait(timeout=90)
    finally:
        runner.stop()
    assert view.status == "succeeded", view
    steps = {r["step"]: r for r in rows(db, "SELECT s.step, r.lane, r.cost_usd, c.worker, c.cost_usd AS call_cost "
                                           "FROM job_steps s JOIN requests r ON r.id = s.request_id "
                                           "JOIN api_calls c ON c.request_id = r.id WHERE s.job_id = :j", j=job.id)}
    assert sorted(steps) == ["check", "gather", "write"]  # one call each
    for name in ("gather", "check"):
        assert steps[name]["lane"] == "batch" and steps[name]["worker"].startswith("batch-runner@"), steps[name]
    assert steps["write"]["lane"] == "interactive" and not steps["write"]["worker"].startswith("batch-runner@")
    assert batches_created(mock) == {"anthropic": 2, "openai": 0}  # gather's batch, then check's
    catalog = load_catalog(Path(env["TARS_CATALOG_PATH"]))
    haiku = catalog.spec("haiku")
    (gather_call,) = rows(db, "SELECT c.* FROM api_calls c JOIN job_steps s ON s.request_id = c.request_id "
                              "WHERE s.job_id = :j AND s.step = 'gather'", j=job.id)
    assert gather_call["cost_usd"] == haiku.cost_usd(input_tokens=gather_call["input_tokens"],
                                                     output_tokens=gather_call["output_tokens"]) * Decimal("0.5")


def test_a_batch_lane_step_on_a_tier_without_a_batch_api_refuses_the_job_at_submit(fleet_env, db):
    """Checked for every step at submit (the third step here), not when the job reaches it."""
    tmpl = {**BATCH_JOB, "steps": [{**s, "lane": "interactive"} for s in BATCH_JOB["steps"][:2]]
            + [BATCH_JOB["steps"][2]]}
    with TarsClient(settings=make_settings(fleet_env)) as client:  # the simulated provider: no batch API
        with pytest.raises(InvalidRequest, match=r"step 'check'.*batch API") as bad:
            client.submit_job(template=tmpl, input={"question": "q"})
    assert bad.value.field == "steps.check.lane"
    assert rows(db, "SELECT id FROM requests") == [] and rows(db, "SELECT id FROM jobs") == []
