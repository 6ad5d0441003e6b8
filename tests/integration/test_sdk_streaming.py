"""The official ``anthropic`` and ``openai`` SDKs' streaming helpers against the real mock server
process: server-sent events in each API's own format, usage by token class included, and the
mock's counters agreeing with what the SDK reports."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.model_calls_support import (  # noqa: F401 - fixtures
    FAKE_ANTHROPIC_KEY,
    FAKE_OPENAI_KEY,
    shared_mock,
)

pytestmark = pytest.mark.integration

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "Summarise the load report."}]
#: A system prompt long enough to be cached (over 1,024 tokens), as text blocks with a breakpoint.
LONG_POLICY = "Every figure in a report comes from a row of the database. " * 90


@pytest.fixture
def mock(shared_mock):  # noqa: F811
    shared_mock.reset(config=True)
    shared_mock.configure(output_tokens=[40, 40])
    return shared_mock


@pytest.fixture
def claude(mock):
    return anthropic.Anthropic(api_key=FAKE_ANTHROPIC_KEY, base_url=mock.url, max_retries=0)


@pytest.fixture
def gpt(mock):
    return openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=mock.url + "/v1", max_retries=0)


def _sse_events(resp: httpx.Response) -> list[tuple[str | None, str]]:
    events, name = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, line[6:]))
            name = None
    return events


# --- Anthropic ---------------------------------------------------------------------------------


def test_the_anthropic_stream_helper_gets_the_text_the_stop_reason_and_the_usage(claude, mock):
    with claude.messages.stream(model="sdk-a", max_tokens=100, messages=QUESTION, system="Be brief.") as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 40
    assert final.usage.input_tokens == mock.total("sdk-a", "input_tokens") == -(-(9 + 1 + 26) // 4)
    assert mock.total("sdk-a", "streamed") == 1


def test_the_anthropic_events_come_in_the_apis_order(mock):
    body = {"model": "sdk-raw", "max_tokens": 10, "messages": QUESTION, "stream": True}
    with httpx.stream("POST", f"{mock.url}/v1/messages", json=body,
                      headers={"x-api-key": FAKE_ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    for name, data in events:
        assert json.loads(data)["type"] == name
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 10


def test_anthropic_cache_breakpoints_stream_cache_writes_then_reads(claude, mock):
    system = [{"type": "text", "text": LONG_POLICY, "cache_control": {"type": "ephemeral"}}]
    usages = []
    for _ in range(2):
        with claude.messages.stream(model="sdk-cache", max_tokens=50, system=system, messages=QUESTION) as stream:
            usages.append(stream.get_final_message().usage)
    first, second = usages
    prefix = -(-len(LONG_POLICY) // 4)
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (prefix, 0)
    assert first.cache_creation.ephemeral_5m_input_tokens == prefix
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, prefix)
    assert first.input_tokens == second.input_tokens > 0  # the question, not cached
    assert mock.total("sdk-cache", "cache_write_tokens") == prefix
    assert mock.total("sdk-cache", "cache_read_tokens") == prefix
    assert mock.total("sdk-cache", "input_tokens") == first.input_tokens + second.input_tokens


def test_a_one_hour_breakpoint_is_a_one_hour_write(claude, mock):
    system = [{"type": "text", "text": LONG_POLICY, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    msg = claude.messages.create(model="sdk-1h", max_tokens=20, system=system, messages=QUESTION)
    assert msg.usage.cache_creation.ephemeral_1h_input_tokens == msg.usage.cache_creation_input_tokens > 1024
    assert mock.total("sdk-1h", "cache_write_1h_tokens") == msg.usage.cache_creation_input_tokens


def test_the_anthropic_stream_stops_at_max_tokens_and_at_a_stop_sequence(claude):
    with claude.messages.stream(model="sdk-stop", max_tokens=7, messages=QUESTION) as stream:
        capped = stream.get_final_message()
    assert (capped.stop_reason, capped.usage.output_tokens) == ("max_tokens", 7)
    with claude.messages.stream(model="sdk-stop", max_tokens=100, messages=QUESTION,
                                stop_sequences=["tokens", "counts", "full"]) as stream:
        stopped = stream.get_final_message()
    # 40 words drawn from ten: one of the three is all but certain to occur
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence in ("tokens", "counts", "full")
    assert stopped.stop_sequence not in stopped.content[0].text


# --- OpenAI ------------------------------------------------------------------------------------


def test_openai_chunks_end_with_the_usage_when_asked_for(gpt, mock):
    chunks = list(gpt.chat.completions.create(model="sdk-o", messages=QUESTION, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.completion_tokens == 40 == mock.total("sdk-o", "output_tokens")
    assert usage.prompt_tokens == mock.total("sdk-o", "input_tokens") and usage.prompt_tokens_details.cached_tokens == 0
    assert len(text.split()) == 40
    plain = list(gpt.chat.completions.create(model="sdk-o", messages=QUESTION, stream=True))
    assert all(getattr(c, "usage", None) is None for c in plain)


def test_the_openai_stream_helper_gets_the_final_completion_with_cached_tokens(gpt, mock):
    messages = [{"role": "system", "content": LONG_POLICY}, *QUESTION]
    finals = []
    for _ in range(2):
        with gpt.chat.completions.stream(model="sdk-oc", messages=messages, max_completion_tokens=100,
                                         stream_options={"include_usage": True}) as stream:
            deltas = [e.delta for e in stream if e.type == "content.delta"]
            finals.append(stream.get_final_completion())
    first, second = finals
    assert "".join(deltas) == second.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1024 and cached % 128 == 0 and second.usage.prompt_tokens == first.usage.prompt_tokens
    assert mock.total("sdk-oc", "cache_read_tokens") == cached
    assert mock.total("sdk-oc", "input_tokens") == 2 * first.usage.prompt_tokens - cached


def test_the_openai_stream_says_length_when_the_limit_cuts_it(gpt):
    chunks = list(gpt.chat.completions.create(model="sdk-len", messages=QUESTION, stream=True, max_tokens=5,
                                              stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_the_openai_json_mode_streams_one_json_object(gpt):
    with gpt.chat.completions.stream(model="sdk-json", response_format={"type": "json_object"},
                                     messages=[{"role": "user", "content": "Answer in JSON."}]) as stream:
        final = stream.get_final_completion()
    assert isinstance(json.loads(final.choices[0].message.content), dict)
