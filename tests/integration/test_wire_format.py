"""Wire format, both APIs, against the real mock server process: what each TARS client sends (the
body the mock received, checked field by field, and accepted by a mock that refuses what the real
API refuses) and what it parses (text, stop reason, usage by class, the mock's own counters)."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from config.catalog import ModelSpec
from config.request_limits import JSON_INSTRUCTION
from tests.integration.model_calls_support import (  # noqa: F401 - fixtures
    FAKE_ANTHROPIC_KEY,
    FAKE_OPENAI_KEY,
    shared_mock,
)
from workers.providers import get_provider
from workers.providers.request import ModelRequest

pytestmark = pytest.mark.integration

KEY_ENV = "TARS_TEST_WIRE_KEY"
RID = "0b7c3c9e-5f6a-4d1e-9a43-2f4d1c0e8b77"


def _spec(provider: str, url: str, **kw) -> ModelSpec:
    return ModelSpec(tier="haiku", model=f"wire-{provider}", provider=provider, base_url=url, api_key_env=KEY_ENV,
                     input_usd_per_mtok=1, output_usd_per_mtok=5, rpm=1000, tpm=10**7, timeout_s=10,
                     output_tokens=(10, 400), **kw)


@pytest.fixture(params=["anthropic", "openai"])
def provider(request, monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, FAKE_ANTHROPIC_KEY if request.param == "anthropic" else FAKE_OPENAI_KEY)
    return request.param


@pytest.fixture
def mock(shared_mock):  # noqa: F811
    shared_mock.reset(config=True)
    return shared_mock


def _call(provider: str, spec: ModelSpec, request: ModelRequest):
    return get_provider(provider).complete(spec=spec, request=request, request_id=RID, attempt=1)


def _conversation(**kw) -> ModelRequest:
    return ModelRequest.from_fields(
        system="You are the fleet's analyst. Answer in one paragraph.",
        messages=[{"role": "user", "content": "What did the first run measure?"},
                  {"role": "assistant", "content": "Throughput at ten concurrent requests."},
                  {"role": "user", "content": [{"type": "text", "text": "And the second run? "},
                                               {"type": "text", "text": "Be exact."}]}],
        prompt="Compare the two.", **kw)


def test_a_multi_turn_request_with_a_system_prompt_goes_out_in_each_apis_shape(provider, mock):
    spec = _spec(provider, mock.url)
    req = _conversation(max_tokens=300, temperature=0.4, stop=["<<END>>"], metadata={"user_id": "acct-17"})
    done = _call(provider, spec, req)
    (sent,) = [b["body"] for b in mock.bodies()]
    turns = [{"role": t["role"], "content": t["content"]} for t in req.turns]
    if provider == "anthropic":
        assert sent == {"model": spec.model, "max_tokens": 300, "system": req.system, "messages": turns,
                        "temperature": 0.4, "stop_sequences": ["<<END>>"], "metadata": {"user_id": "acct-17"}}
    else:
        assert sent == {"model": spec.model, "max_completion_tokens": 300,
                        "messages": [{"role": "system", "content": req.system}, *turns],
                        "temperature": 0.4, "stop": ["<<END>>"], "safety_identifier": "acct-17"}
    # what came back: the mock counted the whole request (system and every turn) as TARS estimates it
    assert done.text and done.stop_reason in ("end_turn", "max_tokens")
    assert done.input_tokens == req.estimated_input_tokens() == mock.total(spec.model, "input_tokens")
    assert done.output_tokens == mock.total(spec.model, "output_tokens") > 0
    assert done.cache_read_tokens == done.cache_write_tokens == 0


def test_max_tokens_caps_the_answer_and_the_stop_reason_says_so(provider, mock):
    mock.configure(output_tokens=[500, 500])
    spec = _spec(provider, mock.url)
    done = _call(provider, spec, ModelRequest.from_prompt("Write at length.", max_tokens=37))
    assert (done.output_tokens, done.stop_reason) == (37, "max_tokens")
    short = _call(provider, spec.model_copy(update={"output_tokens": (10, 800)}),
                  ModelRequest.from_prompt("Write at length.", max_tokens=800))
    assert (short.output_tokens, short.stop_reason) == (500, "end_turn")


def test_a_stop_sequence_ends_the_answer_before_it(provider, mock):
    mock.configure(output_tokens=[300, 300])
    done = _call(provider, _spec(provider, mock.url), ModelRequest.from_prompt("Go on.", stop=["counts"]))
    assert "counts" not in done.text and done.output_tokens < 300
    # Anthropic names the reason; OpenAI's finish_reason "stop" does not tell it from a natural end.
    assert done.stop_reason == ("stop_sequence" if provider == "anthropic" else "end_turn")


def test_json_mode_gets_one_json_object(provider, mock):
    done = _call(provider, _spec(provider, mock.url), ModelRequest.from_prompt("Rate the run.", response_format="json"))
    assert isinstance(json.loads(done.text), dict)
    (sent,) = [b["body"] for b in mock.bodies()]
    system = sent["system"] if provider == "anthropic" else sent["messages"][0]["content"]
    assert system == JSON_INSTRUCTION
    assert sent.get("response_format") == (None if provider == "anthropic" else {"type": "json_object"})


def test_the_legacy_max_tokens_field_for_older_openai_compatible_servers(mock, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_OPENAI_KEY)
    spec = _spec("openai", mock.url, openai_max_tokens_field="max_tokens")
    done = _call("openai", spec, ModelRequest.from_prompt("hi", max_tokens=20))
    assert done.output_tokens <= 20 and mock.bodies()[-1]["body"]["max_tokens"] == 20


def test_openai_caches_a_repeated_long_prefix_and_the_client_reads_the_cached_tokens(mock, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_OPENAI_KEY)
    spec = _spec("openai", mock.url)
    system = "Policy: " + "every figure comes from a row. " * 200  # ~1,550 tokens, the same on every call
    first = _call("openai", spec, ModelRequest.from_prompt("Question one?", system=system))
    second = _call("openai", spec, ModelRequest.from_prompt("Question two, a different one?", system=system))
    assert first.cache_read_tokens == 0
    assert second.cache_read_tokens >= 1024 and second.cache_read_tokens % 128 == 0
    assert second.input_tokens + second.cache_read_tokens == ModelRequest.from_prompt(
        "Question two, a different one?", system=system).estimated_input_tokens()
    assert mock.total(spec.model, "cache_read_tokens") == second.cache_read_tokens
    assert mock.total(spec.model, "input_tokens") == first.input_tokens + second.input_tokens
    priced = spec.model_copy(update={"prices": spec.prices.model_copy(update={"cache_read": Decimal("0.25")})})
    assert priced.usage_cost_usd(second.usage) == (
        Decimal(second.input_tokens) * 1 + Decimal(second.cache_read_tokens) * Decimal("0.25")
        + Decimal(second.output_tokens) * 5) / 10**6


# --- the mock refuses what the real APIs refuse ----------------------------------------------------


def _post(mock, protocol: str, body: dict) -> httpx.Response:
    if protocol == "anthropic":
        return httpx.post(f"{mock.url}/v1/messages", json=body, headers={"x-api-key": FAKE_ANTHROPIC_KEY,
                                                                          "anthropic-version": "2023-06-01"})
    return httpx.post(f"{mock.url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {FAKE_OPENAI_KEY}"})


USER = [{"role": "user", "content": "hi"}]
REFUSED = [
    ("anthropic", {"model": "m", "messages": USER}, "max_tokens: Field required"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": USER, "stop": ["x"]}, "stop: Extra inputs"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "s"}, *USER]},
     "messages.0.role"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": USER, "metadata": {"tenant": "a"}},
     "metadata.tenant"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": USER, "stop_sequences": [" "]}, "non-whitespace"),
    ("anthropic", {"model": "m", "max_tokens": 5, "messages": USER, "system": [{"type": "image"}]}, "system.0.type"),
    ("openai", {"model": "m", "messages": USER, "stop_sequences": ["x"]}, "Unrecognized request argument"),
    ("openai", {"model": "m", "messages": USER, "response_format": {"type": "json_object"}},
     "must contain the word 'json'"),
    ("openai", {"model": "m", "messages": USER, "stream_options": {"include_usage": True}},
     "only allowed when 'stream' is enabled"),
    ("openai", {"model": "m", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "array too long"),
    ("openai", {"model": "m", "messages": USER, "temperature": 2.5}, "temperature"),
]


@pytest.mark.parametrize(("protocol", "body", "says"), REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)])
def test_the_mock_refuses_a_body_the_real_api_refuses(mock, protocol, body, says):
    resp = _post(mock, protocol, body)
    assert resp.status_code == 400, resp.text
    assert says in resp.json()["error"]["message"]


def test_system_given_as_content_blocks_is_counted_as_input(mock):
    blocks = [{"type": "text", "text": "s" * 800}, {"type": "text", "text": "t" * 400}]
    resp = _post(mock, "anthropic", {"model": "blocks", "max_tokens": 5, "system": blocks,
                                     "messages": [{"role": "user", "content": "q" * 399}]})
    assert resp.status_code == 200, resp.text
    expected = -(-(800 + 1 + 400 + 1 + 399) // 4)
    assert resp.json()["usage"]["input_tokens"] == expected == mock.total("blocks", "input_tokens")
