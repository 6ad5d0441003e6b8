"""``deadline`` end to end: a request that accepts waiting at least the providers' batch window (24 h)
is recorded, never queued, and answered by a real ``tars batch-runner`` through the provider's batch
API at the batch price; one with a shorter deadline is queued and answered by a real worker at the
interactive price; a batch lane with a deadline it cannot promise is refused before anything is
written. The deadline is recorded on the row (``requests.deadline_s``)."""

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


def test_a_24h_deadline_is_answered_through_the_batch_api_at_the_batch_price_and_a_1h_one_interactively(
        fleet_env, tmp_path, mock_llm, start_worker, db, redis):  # noqa: F811
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "30:30", "--config-json", '{"batch_delay_s": 1.0}')
    env = batch_env(fleet_env, tmp_path, mock)
    with TarsClient(settings=make_settings(env)) as client:
        with pytest.raises(InvalidRequest, match="shorter than the providers' batch window") as refused:
            client.submit(role="researcher", prompt="batch, within the hour", lane="batch", deadline="1h")
        assert refused.value.field == "deadline"
        assert rows(db, "SELECT id FROM requests") == []

        later = [client.submit(role="researcher", prompt=f"by tomorrow {i}", deadline="24h") for i in range(2)]
        days = client.submit(role="researcher", prompt="by the weekend", deadline=2 * 86_400)
        assert waiting_messages(redis) == 0  # recorded for the batch runner, never queued
        # a plain-Celery producer may say the same in the message's kwargs
        foreign = str(uuid.uuid4())
        Celery("someone-else", broker=env["TARS_BROKER_URL"]).send_task(
            "tars.run_request", kwargs={"role": "researcher", "prompt": "plain, by tomorrow", "deadline": "24h"},
            task_id=foreign, queue="tars.haiku")
        start_worker(tiers=["haiku", "sonnet"], concurrency=10, env=env)
        wait_batch_lane_row(db, foreign)
        soon = client.submit(role="researcher", prompt="within the hour", deadline="1h")
        soon_result = soon.wait(timeout=60)
        assert soon_result.status == "succeeded"
        assert rows(db, "SELECT id FROM api_calls WHERE request_id <> :r", r=soon.id) == []  # no batch yet
        runner = start_runner(env, tmp_path / "runner.log")
        try:
            ids = [h.id for h in (*later, days)] + [foreign]
            results = {r.id: r for r in client.wait_many(ids, timeout=90)}
            wait_batches_done(db)
        finally:
            runner.stop()

    assert batches_created(mock) == {"anthropic": 1, "openai": 0}
    catalog = load_catalog(Path(env["TARS_CATALOG_PATH"]))
    spec = catalog.spec("haiku")
    assert spec.prices.batch_multiplier == Decimal("0.5")
    recorded = {r["id"]: r for r in rows(db, "SELECT id, lane, deadline_s FROM requests")}
    for rid, seconds in [*((h.id, 86_400) for h in later), (days.id, 2 * 86_400), (foreign, 86_400)]:
        r = results[rid]
        assert r.status == "succeeded" and r.attempts == 1 and r.output_tokens == 30, r
        (call,) = rows(db, "SELECT * FROM api_calls WHERE request_id = :r", r=rid)
        assert call["outcome"] == "ok" and call["worker"].startswith("batch-runner@")
        interactive = spec.cost_usd(input_tokens=call["input_tokens"], output_tokens=call["output_tokens"],
                                    cache_read_tokens=call["cache_read_tokens"])
        assert call["cost_usd"] == interactive * Decimal("0.5") == r.cost_usd > 0
        assert (recorded[rid]["lane"], recorded[rid]["deadline_s"]) == ("batch", seconds)
    # the 1 h deadline: its own call on haiku's queue, answered by the worker at the list price
    (call,) = rows(db, "SELECT * FROM api_calls WHERE request_id = :r", r=soon.id)
    assert call["outcome"] == "ok" and not call["worker"].startswith("batch-runner@")
    interactive = spec.cost_usd(input_tokens=call["input_tokens"], output_tokens=call["output_tokens"],
                                cache_read_tokens=call["cache_read_tokens"])
    assert call["cost_usd"] == interactive == soon_result.cost_usd > 0
    assert (recorded[soon.id]["lane"], recorded[soon.id]["deadline_s"]) == ("interactive", 3_600)
    assert rows(db, "SELECT request_id FROM batch_items WHERE request_id = :r", r=soon.id) == []
    stats = mock.stats()["models"]["mock-haiku"]["total"]
    assert stats["batched"] == 4 and stats["requests"] == 5  # four through the batch, one on its own
