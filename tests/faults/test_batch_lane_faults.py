"""The batch lane survives its runner being SIGKILLed at every point of a batch's life.

A real ``tars batch-runner`` process kills itself (``TARS_BATCH_CRASH_AT``) after the batch's
membership is committed (``formed``), after ``submitting`` is committed but before the create call
(``before_submit``), after the provider created the batch but before its id is recorded
(``after_submit``), after a poll (``polling``) and after half the results are written
(``mid_results``). A second runner then finishes the work. Each case checks what the provider saw
(the mock's counters: batches created, requests answered) and what was billed (``api_calls``):
every request succeeds once, exactly one provider batch was created and each request was answered
by the provider once, and each request has exactly one ``api_calls`` row — nothing lost, nothing
sent or billed twice."""

from __future__ import annotations

import signal

import pytest

from tars_tasks.client import TarsClient
from tests.helpers import make_settings
from tests.integration.batch_lane_support import (
    batch_env,
    batches_created,
    rows,
    start_runner,
    wait_batches_done,
)
from tests.integration.model_calls_support import MODELS, mock_llm  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

N = 10
CASES = [("formed", "anthropic"), ("before_submit", "anthropic"), ("after_submit", "anthropic"),
         ("polling", "anthropic"), ("mid_results", "anthropic"), ("after_submit", "openai"),
         ("mid_results", "openai")]


@pytest.mark.parametrize(("point", "provider"), CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_a_runner_killed_at_any_point_neither_loses_nor_double_bills_a_request(
        point, provider, fleet_env, tmp_path, mock_llm, db):  # noqa: F811
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "20:20", "--config-json", '{"batch_delay_s": 1.0}')
    env = batch_env(fleet_env, tmp_path, mock, TARS_BATCH_MAX_AGE_S="0")
    role, tier = ("researcher", "haiku") if provider == "anthropic" else ("engineer", "sonnet")
    with TarsClient(settings=make_settings(env)) as client:
        ids = [client.submit(role=role, prompt=f"question {i}", lane="batch").id for i in range(N)]
        first = start_runner({**env, "TARS_BATCH_CRASH_AT": point}, tmp_path / "runner-1.log")
        assert first.wait_exit() == -signal.SIGKILL, first.log()[-3000:]
        assert f"batch_crash_at={point}" in first.log()
        if point == "mid_results":  # half the requests were finished before the kill
            assert len(rows(db, "SELECT id FROM requests WHERE status = 'succeeded'")) == N // 2
        second = start_runner(env, tmp_path / "runner-2.log")
        try:
            results = client.wait_many(ids, timeout=90)
            wait_batches_done(db)
        finally:
            second.stop()

    assert [r.status for r in results] == ["succeeded"] * N, second.log()[-3000:]
    assert batches_created(mock) == {"anthropic": 1 if provider == "anthropic" else 0,
                                     "openai": 1 if provider == "openai" else 0}
    answered = mock.stats()["models"][MODELS[tier]]["total"]
    assert answered["batched"] == answered["requests"] == N  # the provider answered each request once
    calls = rows(db, "SELECT request_id, outcome, cost_usd FROM api_calls ORDER BY request_id")
    assert sorted(c["request_id"] for c in calls) == sorted(ids)  # one billed call per request
    assert all(c["outcome"] == "ok" and c["cost_usd"] > 0 for c in calls)
    (batch,) = rows(db, "SELECT state, request_count, submit_attempts FROM provider_batches")
    assert batch["state"] == "done" and batch["request_count"] == N
    if point == "after_submit":
        assert "adopting provider batch" in second.log()
    totals = rows(db, "SELECT r.cost_usd AS billed, (SELECT sum(cost_usd) FROM api_calls a WHERE a.request_id = r.id) "
                      "AS calls FROM requests r")
    assert all(t["billed"] == t["calls"] for t in totals)
