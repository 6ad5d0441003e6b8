"""Jobs on a real fleet: real worker processes, Redis, Postgres."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from sqlalchemy import text

from tars_tasks.errors import InvalidRequest

pytestmark = pytest.mark.integration

REJECT = '<<sim-answer:{"valid": false, "problems": ["cite sources"]}>>'
RWV_INPUT = {"question": "Why is the sky blue?", "topics": ["physics", "history", "perception"]}


def _job_requests(db, job_id):
    with db.connect() as conn:
        return conn.execute(text(
            "SELECT s.step, s.item, s.revision, r.status, r.failure_reason, r.prompt, r.system, r.submitted_at, "
            "r.finished_at, r.cost_usd FROM job_steps s JOIN requests r ON r.id = s.request_id "
            "WHERE s.job_id = :j ORDER BY s.id"), {"j": job_id}).all()


def _api_sum(db, job_id) -> Decimal:
    with db.connect() as conn:
        return Decimal(conn.execute(text(
            "SELECT COALESCE(SUM(a.cost_usd), 0) FROM api_calls a JOIN job_steps s ON s.request_id = a.request_id "
            "WHERE s.job_id = :j"), {"j": job_id}).scalar())


def test_fan_out_then_fan_in_then_a_revision(start_worker, client, db):
    start_worker(tiers=["haiku", "sonnet"], concurrency=20)
    job = client.submit_job(template="research-write-validate",
                            input={**RWV_INPUT, "reviewer_notes": [REJECT]}, priority="high", tenant="acme")
    j = job.wait(timeout=60)
    assert j.status == "succeeded", j.error
    rows = _job_requests(db, job.id)
    assert [(r.step, r.item, r.revision) for r in rows] == [
        ("research", 0, 0), ("research", 1, 0), ("research", 2, 0), ("write", 0, 0), ("validate", 0, 0),
        ("write", 0, 1), ("validate", 0, 1)]
    research = [r for r in rows if r.step == "research"]
    writes = [r for r in rows if r.step == "write"]
    # fan-in: the writer was queued only after every researcher had finished, and got all three answers
    assert writes[0].submitted_at >= max(r.finished_at for r in research)
    assert all(f"[{i}]" in writes[0].prompt for i in (1, 2, 3))
    assert "Feedback from validate" in writes[1].prompt and "cite sources" in writes[1].prompt
    assert all(topic in r.prompt for topic, r in zip(RWV_INPUT["topics"], research, strict=True))
    assert research[0].system.startswith("You are a research sub-agent")  # the role's system prompt
    # the job's cost is exactly the sum of its requests' api_calls; priority and tenant reached every step
    assert j.cost_usd == _api_sum(db, job.id) == sum(Decimal(r.cost_usd) for r in rows) > 0
    with db.connect() as conn:
        assert set(conn.execute(text("SELECT DISTINCT priority || ':' || tenant FROM requests")).scalars()) == {
            "9:acme"}
    assert j.result == next(s.result for s in j.steps if s.step == "write" and s.revision == 1)
    assert [s.label for s in j.critical_path()][-2:] == ["write@r1", "validate@r1"]
    assert j.critical_path_s() <= j.latency_s and j.critical_path_s() <= j.step_latency_sum_s()


def test_the_revision_cap_holds_then_the_job_fails_not_validated_or_accepts(start_worker, client, db):
    start_worker(tiers=["haiku", "sonnet"], concurrency=20)
    template = {"steps": [
        {"name": "write", "role": "writer", "prompt": "Draft on {{ input.topic }}. {{ feedback }}"},
        {"name": "check", "role": "validator", "after": ["write"], "revises": "write", "max_revisions": 2,
         "prompt": "Check {{ steps.write.output }} " + REJECT}]}
    failed = client.submit_job(template=template, input={"topic": "tides"}).wait(timeout=60)
    assert failed.status == "failed" and failed.failure_reason == "not_validated", failed.error
    assert [s.label for s in failed.steps] == ["write", "check", "write@r1", "check@r1", "write@r2", "check@r2"]
    accepting = {"output": "write",
                 "steps": [dict(template["steps"][0]), dict(template["steps"][1], on_exhausted="accept")]}
    ok = client.submit_job(template=accepting, input={"topic": "tides"}).wait(timeout=60)
    assert ok.status == "succeeded" and len(ok.steps) == 6
    assert ok.result == ok.steps[4].result  # the last revision of the step


def test_fan_out_from_a_json_answer_capped_and_a_failed_step_continues_or_fails_the_job(start_worker, fleet_env,
                                                                                       client, db):
    start_worker(tiers=["haiku", "sonnet"], concurrency=20, env={"TARS_SIM_UNSTORABLE_MARKER": "BREAKME"})
    # the planner's answer holds the marker only JSON-escaped, so only the engineer's prompt has it
    parts = json.dumps({"parts": ["parser", "BREAKME", "cli", "docs", "tests", "extra"]}).replace("K", "\\u004b")
    j = client.submit_job(template="plan-implement-review",
                          input={"task": "a tool", "planner_notes": f"<<sim-answer:{parts}>>"}).wait(timeout=60)
    assert j.status == "succeeded", j.error
    impl = [s for s in j.steps if s.step == "implement"]
    assert len(impl) == 4  # max_items = 4 of 6
    assert [s.status for s in impl] == ["succeeded", "failed", "succeeded", "succeeded"]  # on_failure = continue
    review = next(s for s in j.steps if s.step == "review")
    with db.connect() as conn:
        prompt = conn.execute(text("SELECT prompt FROM requests WHERE id = :i"), {"i": review.request_id}).scalar()
    assert "[1]" in prompt and "[2]" not in prompt and "[4]" in prompt  # the failed part is left out

    # without "continue", the step's failure fails the job with the step's reason
    failing = client.submit_job(template="research-write-validate",
                                input={**RWV_INPUT, "topics": ["physics", "BREAKME"]}).wait(timeout=60)
    assert failing.status == "failed" and failing.failure_reason == "step_failed"
    assert failing.failed_step == "research" and "research[1]" in failing.error and "unwritable" in failing.error
    assert not any(s.step == "write" for s in failing.steps)


def test_template_and_input_errors_are_refused_at_submit_and_nothing_is_written(client, db, redis):
    cases = [
        ({"steps": [{"name": "a", "role": "poet", "prompt": "x"}]}, {}, "unknown role"),
        ({"steps": [{"name": "a", "role": "writer", "prompt": "x", "after": ["b"]},
                    {"name": "b", "role": "writer", "prompt": "x", "after": ["a"]}]}, {}, "cycle"),
        ({"steps": [{"name": "a", "role": "writer", "prompt": "{{ steps.b.output }}"}]}, {}, "missing reference"),
        ({"steps": [{"name": "a", "role": "writer", "prompt": "{{ item }}", "for_each": "input.x"}]}, {"x": "s"},
         "bad fan-out source"),
        ("research-write-validate", {"topics": ["a"]}, "missing reference"),
        ("no-such-template", {}, "unknown template"),
    ]
    for template, job_input, words in cases:
        with pytest.raises(InvalidRequest, match=words):
            client.submit_job(template=template, input=job_input)
    with db.connect() as conn:
        assert conn.execute(text("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM requests)")).scalar() == 0


def test_an_idempotency_key_returns_the_same_job(client, db):
    a = client.submit_job(template="research-write-validate", input=RWV_INPUT, tenant="t", idempotency_key="k-1")
    b = client.submit_job(template="research-write-validate", input=RWV_INPUT, tenant="t", idempotency_key="k-1")
    assert a.created and not b.created and a.id == b.id
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 3


def test_cancel_stops_queued_steps_and_records_what_was_spent(start_worker, client, db):
    # one slot and slow calls: while research[0] runs, research[1] and [2] wait in the queue
    start_worker(tiers=["haiku", "sonnet"], concurrency=1, env={"TARS_SIM_LATENCY": "fixed:1500"})
    job = client.submit_job(template="research-write-validate", input=RWV_INPUT)
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.connect() as conn:
            if conn.execute(text("SELECT count(*) FROM api_calls")).scalar():
                break
        time.sleep(0.05)
    j = client.cancel_job(job.id)
    assert j.status == "cancelled"
    # the call in flight finishes and is billed; nothing else runs
    time.sleep(3)
    j = client.get_job(job.id)
    assert j.status == "cancelled"
    assert [s.step for s in j.steps] == ["research"] * 3  # no successor was scheduled
    cancelled = [s for s in j.steps if s.failure_reason == "cancelled"]
    assert len(cancelled) == 3 and sum(s.attempts == 0 for s in cancelled) >= 2  # the running one is billed
    assert j.attempts >= 1 and j.cost_usd == _api_sum(db, job.id) > 0


def test_job_steps_wait_in_staging_like_any_request(fleet_env, start_worker, client, redis, db):
    """Every step is an ordinary request: with dispatch on it is staged (priority and tenant order
    under a binding limit), not pushed past the others into the Celery list."""
    from config.keys import queue_for_tier, stage_count_key

    job = client.submit_job(template="research-write-validate", input={"question": "q", "topics": ["a", "b", "c"]},
                            priority="high", tenant="acme")
    ns = fleet_env["TARS_NAMESPACE"]
    assert int(redis.get(stage_count_key(ns, "haiku")) or 0) == 3  # the three researchers
    assert redis.llen(queue_for_tier("haiku")) == 0
    start_worker(tiers=["haiku", "sonnet"], concurrency=10)
    j = client.wait_job(job.id, timeout=60)
    assert j.status == "succeeded", j.error
    for tier in ("haiku", "sonnet"):
        assert int(redis.get(stage_count_key(ns, tier)) or 0) == 0  # the writer and validator drained too
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests WHERE status <> 'succeeded'")).scalar() == 0
