"""What each client puts in the body (pure functions), what the simulated model does with a request,
and the mock's prompt cache. The same bodies are checked on the wire against the mock server in
``tests/integration/test_wire_format.py``."""

from __future__ import annotations

import json

from config.catalog import ModelSpec
from config.request_limits import JSON_INSTRUCTION
from loadgen.mock_llm.cache import PromptCache
from loadgen.mock_llm.wire import Segment
from workers.providers.anthropic import messages_body
from workers.providers.openai import chat_body
from workers.providers.request import ModelRequest
from workers.providers.simulated import SimulatedProvider, answer

SPEC = ModelSpec(tier="haiku", model="m-1", input_usd_per_mtok=1, output_usd_per_mtok=5, rpm=10, tpm=10**6,
                 output_tokens=(100, 400), max_output_tokens=8000)
RID = "11111111-2222-3333-4444-555555555555"


def _full(**kw) -> ModelRequest:
    return ModelRequest.from_fields(prompt="And the third?", system="You are terse.",
                                    messages=[{"role": "user", "content": "First?"},
                                              {"role": "assistant", "content": [{"type": "text", "text": "One."}]}],
                                    max_tokens=256, temperature=0.2, stop=["END"], **kw)


def test_the_anthropic_body_has_a_top_level_system_and_stop_sequences():
    body = messages_body(spec=SPEC, request=_full(metadata={"user_id": "u-7"}), request_id=RID)
    assert body == {
        "model": "m-1", "max_tokens": 256, "system": "You are terse.",
        "messages": [{"role": "user", "content": "First?"},
                     {"role": "assistant", "content": [{"type": "text", "text": "One."}]},
                     {"role": "user", "content": "And the third?"}],
        "temperature": 0.2, "stop_sequences": ["END"], "metadata": {"user_id": "u-7"},
    }


def test_the_openai_body_has_a_system_message_and_max_completion_tokens():
    body = chat_body(spec=SPEC, request=_full(), request_id=RID)
    assert body == {
        "model": "m-1", "max_completion_tokens": 256,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "First?"},
                     {"role": "assistant", "content": [{"type": "text", "text": "One."}]},
                     {"role": "user", "content": "And the third?"}],
        "temperature": 0.2, "stop": ["END"], "safety_identifier": RID,
    }
    legacy = SPEC.model_copy(update={"openai_max_tokens_field": "max_tokens"})
    assert chat_body(spec=legacy, request=_full(), request_id=RID)["max_tokens"] == 256


def test_a_model_that_refuses_sampling_parameters_gets_no_temperature():
    spec = SPEC.model_copy(update={"accepts_temperature": False})
    assert "temperature" not in messages_body(spec=spec, request=_full(), request_id=RID)
    assert "temperature" not in chat_body(spec=spec, request=_full(), request_id=RID)


def test_a_bare_prompt_sends_only_what_the_apis_require():
    req = ModelRequest.from_prompt("hi")
    assert messages_body(spec=SPEC, request=req, request_id=RID) == {
        "model": "m-1", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"user_id": RID}}
    assert chat_body(spec=SPEC, request=req, request_id=RID) == {
        "model": "m-1", "max_completion_tokens": 400, "messages": [{"role": "user", "content": "hi"}],
        "safety_identifier": RID}


def test_json_mode_is_openais_json_object_and_an_instruction_in_both_system_prompts():
    req = ModelRequest.from_prompt("Rate it.", response_format="json")
    a = messages_body(spec=SPEC, request=req, request_id=RID)
    o = chat_body(spec=SPEC, request=req, request_id=RID)
    assert a["system"] == JSON_INSTRUCTION and "response_format" not in a
    assert o["response_format"] == {"type": "json_object"}
    assert o["messages"][0] == {"role": "system", "content": JSON_INSTRUCTION} and "JSON" in JSON_INSTRUCTION
    with_system = ModelRequest.from_prompt("Rate it.", system="Be fair.", response_format="json")
    assert messages_body(spec=SPEC, request=with_system, request_id=RID)["system"] == f"Be fair.\n\n{JSON_INSTRUCTION}"


def test_the_output_limit_is_the_requests_within_the_models_and_the_reservation_the_tiers_bound():
    assert ModelRequest.from_prompt("x", max_tokens=50_000).output_limit(SPEC) == 8000
    assert ModelRequest.from_prompt("x", max_tokens=50).output_limit(SPEC) == 50
    assert ModelRequest.from_prompt("x").output_limit(SPEC) == 400
    assert ModelRequest.from_prompt("x", max_tokens=5000).reserved_output_tokens(SPEC) == 400
    assert ModelRequest.from_prompt("x", max_tokens=50).reserved_output_tokens(SPEC) == 50


def test_the_input_estimate_covers_the_system_prompt_and_every_turn():
    req = _full()
    assert req.text() == "You are terse.\nFirst?\nOne.\nAnd the third?"
    assert req.estimated_input_tokens() == -(-len(req.text()) // 4)
    assert ModelRequest.from_prompt("x" * 400).estimated_input_tokens() == 100


# --- the simulated model ---------------------------------------------------------------------------


def test_the_simulated_model_stops_at_max_tokens_and_says_so():
    text, reason = answer(out_tokens=300, request=ModelRequest.from_prompt("x"), limit=100)
    assert reason == "max_tokens" and len(text) == 400
    text, reason = answer(out_tokens=80, request=ModelRequest.from_prompt("x"), limit=100)
    assert reason == "end_turn" and len(text) == 320


def test_the_simulated_model_ends_at_a_stop_sequence_and_leaves_it_out():
    text, reason = answer(out_tokens=300, request=ModelRequest.from_prompt("x", stop=["well-formed"]), limit=400)
    assert reason == "stop_sequence" and text == "The analysis finds the request "


def test_the_simulated_model_answers_one_json_object_in_json_mode():
    text, reason = answer(out_tokens=100, request=ModelRequest.from_prompt("x", response_format="json"), limit=400)
    assert isinstance(json.loads(text), dict) and len(text) <= 400 and reason == "end_turn"


def test_the_simulated_provider_bills_the_whole_request_and_caps_the_output():
    p = SimulatedProvider(seed=1, failure_rate=0, sleep=lambda s: None)
    spec = SPEC.model_copy(update={"output_tokens": (300, 300)})
    req = ModelRequest.from_fields(prompt="p" * 40, system="s" * 400, max_tokens=120)
    done = p.complete(spec=spec, request=req, request_id=RID, attempt=1)
    assert done.input_tokens == req.estimated_input_tokens() == -(-(400 + 1 + 40) // 4)
    assert done.output_tokens == 120 and done.stop_reason == "max_tokens"


# --- the mock's prompt cache ------------------------------------------------------------------------


def test_anthropic_breakpoints_write_then_read_each_lifetime_apart():
    cache = PromptCache()
    ttl = {"5m": 300.0, "1h": 3600.0}
    system = [Segment("s" * 8000, cache_ttl="1h")]  # 2,000 tokens, cached for an hour
    convo = [Segment("m" * 6000, cache_ttl="5m"), Segment("new question")]
    first = cache.anthropic(model="m", segments=system + convo, now=0.0, min_tokens=1024, ttl_s=ttl)
    assert (first.cache_write_1h_tokens, first.cache_write_tokens, first.cache_read_tokens) == (2000, 1501, 0)
    assert first.total == -(-(8000 + 1 + 6000 + 1 + 12) // 4)
    again = cache.anthropic(model="m", segments=system + convo, now=10.0, min_tokens=1024, ttl_s=ttl)
    assert (again.cache_read_tokens, again.cache_write_tokens, again.cache_write_1h_tokens) == (3501, 0, 0)
    later = cache.anthropic(model="m", segments=system + convo, now=1000.0, min_tokens=1024, ttl_s=ttl)
    assert (later.cache_read_tokens, later.cache_write_tokens) == (2000, 1501)  # the 5-minute entry expired
    other = cache.anthropic(model="other", segments=system + convo, now=1000.0, min_tokens=1024, ttl_s=ttl)
    assert other.cache_read_tokens == 0  # caches are per model


def test_a_prefix_below_the_minimum_is_not_cached():
    cache = PromptCache()
    segs = [Segment("s" * 100, cache_ttl="5m"), Segment("q")]
    for now in (0.0, 1.0):
        u = cache.anthropic(model="m", segments=segs, now=now, min_tokens=1024, ttl_s={"5m": 300.0, "1h": 3600.0})
        assert (u.cache_write_tokens, u.cache_read_tokens) == (0, 0)


def test_openai_caches_prefixes_of_1024_tokens_and_more_in_steps_of_128():
    cache = PromptCache()
    shared = "p" * (1300 * 4)
    first = cache.openai(model="m", text=shared + "A" * 400, now=0.0, min_tokens=1024, ttl_s=300.0)
    assert first.cache_read_tokens == 0 and first.input_tokens == 1400
    second = cache.openai(model="m", text=shared + "B" * 400, now=1.0, min_tokens=1024, ttl_s=300.0)
    assert second.cache_read_tokens == 1280 and second.total == 1400  # 1024 + 2 x 128 <= 1300 shared tokens
    short = cache.openai(model="m", text="p" * 4000, now=2.0, min_tokens=1024, ttl_s=300.0)
    assert short.cache_read_tokens == 0
