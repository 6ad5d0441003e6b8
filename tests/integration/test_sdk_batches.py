"""The official ``anthropic`` and ``openai`` SDKs' batch calls against the real mock server process:
create, retrieve, list and results (Anthropic Message Batches), file upload, batch create, retrieve,
list and the output / error files (OpenAI Batch). A batch ends after the mock's ``batch_delay_s``,
its requests answered like interactive ones, their tokens counted by class (and under ``batched``)."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.model_calls_support import (  # noqa: F401 - fixtures
    FAKE_ANTHROPIC_KEY,
    FAKE_OPENAI_KEY,
    shared_mock,
)

pytestmark = pytest.mark.integration

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

DELAY_S = 0.5


@pytest.fixture
def mock(shared_mock):  # noqa: F811
    shared_mock.reset(config=True)
    shared_mock.configure(output_tokens=[30, 30], batch_delay_s=DELAY_S)
    return shared_mock


@pytest.fixture
def claude(mock):
    return anthropic.Anthropic(api_key=FAKE_ANTHROPIC_KEY, base_url=mock.url, max_retries=0)


@pytest.fixture
def gpt(mock):
    return openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=mock.url + "/v1", max_retries=0)


def _wait(fetch, done, limit_s: float = 20.0):
    deadline = time.monotonic() + limit_s
    obj = fetch()
    while not done(obj):
        assert time.monotonic() < deadline, f"batch never ended: {obj}"
        time.sleep(0.1)
        obj = fetch()
    return obj


def test_an_anthropic_message_batch_is_created_polled_listed_and_its_results_read_with_the_sdk(claude, mock):
    params = {"model": "sdk-batch-a", "max_tokens": 100, "messages": [{"role": "user", "content": "Hello"}]}
    batch = claude.messages.batches.create(requests=[
        {"custom_id": "ok-1", "params": params},
        {"custom_id": "ok-2", "params": {**params, "system": "Be brief."}},
        {"custom_id": "bad", "params": {**params, "messages": [{"role": "user", "content": "[[mock:status=400]]"}]}},
        {"custom_id": "late", "params": {**params, "messages": [{"role": "user",
                                                                  "content": "[[mock:batch_expired]]"}]}},
    ])
    assert batch.id.startswith("msgbatch_") and batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 4 and batch.results_url is None
    assert mock.total("sdk-batch-a") == 0  # nothing answered before the batch ends
    assert batch.id in [b.id for b in claude.messages.batches.list(limit=10)]
    ended = _wait(lambda: claude.messages.batches.retrieve(batch.id), lambda b: b.processing_status == "ended")
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.expired, counts.processing) == (2, 1, 1, 0)
    results = {r.custom_id: r.result for r in claude.messages.batches.results(batch.id)}
    assert {k: r.type for k, r in results.items()} == {"ok-1": "succeeded", "ok-2": "succeeded",
                                                      "bad": "errored", "late": "expired"}
    assert results["bad"].error.error.type == "invalid_request_error"
    usage = [results[k].message.usage for k in ("ok-1", "ok-2")]
    assert [u.output_tokens for u in usage] == [30, 30]
    total = mock.stats()["models"]["sdk-batch-a"]["total"]
    assert total["requests"] == total["batched"] == 3  # the expired one never reached the model
    assert total["ok"] == 2 and total["status_400"] == 1
    assert total["input_tokens"] == sum(u.input_tokens for u in usage) == total["batched_input_tokens"]
    assert total["output_tokens"] == 60 == total["batched_output_tokens"]


def test_an_openai_batch_is_uploaded_created_polled_listed_and_its_files_read_with_the_sdk(gpt, mock):
    def line(cid, content):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "sdk-batch-o", "max_completion_tokens": 100,
                         "messages": [{"role": "user", "content": content}]}}

    data = "".join(json.dumps(x) + "\n" for x in (line("ok-1", "Hello"), line("ok-2", "Hi"),
                                                  line("bad", "[[mock:status=400]]")))
    uploaded = gpt.files.create(file=("in.jsonl", data.encode()), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
    batch = gpt.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"tars_batch": "b-1"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"tars_batch": "b-1"}
    listed = {b.id: b.metadata for b in gpt.batches.list(limit=10)}
    assert listed[batch.id] == {"tars_batch": "b-1"}
    done = _wait(lambda: gpt.batches.retrieve(batch.id), lambda b: b.status == "completed")
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    out = [json.loads(x) for x in gpt.files.content(done.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in gpt.files.content(done.error_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["ok-1", "ok-2"]
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert [(x["custom_id"], x["response"]["status_code"]) for x in err] == [("bad", 400)]
    usage = [x["response"]["body"]["usage"] for x in out]
    total = mock.stats()["models"]["sdk-batch-o"]["total"]
    assert total["batched"] == 3 and total["ok"] == 2
    assert total["input_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert total["output_tokens"] == sum(u["completion_tokens"] for u in usage) == 60


def test_a_batch_the_mock_cannot_read_is_refused_or_failed(gpt, claude, mock):
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.create(requests=[{"custom_id": "has space", "params": {}}])
    bad = gpt.files.create(file=("in.jsonl", b"not json\n"), purpose="batch")
    batch = gpt.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert gpt.batches.retrieve(batch.id).status == "failed"
