"""What the mock answers: the text, why it stopped, and both APIs' response and stream formats.

Responses (``stream: false``) are one JSON body: an Anthropic ``message`` or an OpenAI
``chat.completion``. Streams (``stream: true``) are server-sent events in each API's own format:

* Anthropic: ``message_start`` (the message with empty content and the input usage),
  ``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``) per chunk,
  ``content_block_stop``, ``message_delta`` (stop reason, stop sequence and the cumulative usage)
  and ``message_stop``; every event as ``event: NAME`` + ``data: JSON``.
* OpenAI: ``chat.completion.chunk`` objects as ``data: JSON`` lines — the role first, then
  content deltas, then the ``finish_reason``; with ``stream_options.include_usage`` every chunk
  carries ``"usage": null`` and one more chunk with no choices carries the usage; ``data: [DONE]``.

Usage is reported by token class (input, cache writes and reads) as each API reports it.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loadgen.mock_llm.cache import CacheUsage
from loadgen.mock_llm.wire import Parsed

WORDS = ("the", "fleet", "answers", "each", "request", "in", "full", "and", "counts", "tokens")
#: Words per streamed text delta.
STREAM_CHUNK_WORDS = 3
_OPENAI_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    output_tokens: int
    #: In Anthropic's words: end_turn, max_tokens, stop_sequence.
    stop_reason: str
    stop_sequence: str | None
    usage: CacheUsage


def make_answer(*, rng: random.Random, parsed: Parsed, output_tokens: tuple[int, int], usage: CacheUsage) -> Answer:
    """Draw the answer's length from ``output_tokens``; the request's ``max_tokens`` cuts it (stop
    reason ``max_tokens``), a stop sequence in it ends it there (``stop_sequence``, left out)."""
    n = rng.randint(*output_tokens)
    reason, matched = "end_turn", None
    if parsed.max_tokens is not None and n > parsed.max_tokens:
        n, reason = parsed.max_tokens, "max_tokens"
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    hits = [(text.find(s), s) for s in parsed.stop if s and text.find(s) >= 0]
    if hits:
        cut, matched = min(hits)
        text, reason = text[:cut], "stop_sequence"
        n = len(text.split())
    if parsed.json_mode:
        text = json.dumps({"answer": text})
    return Answer(text=text, output_tokens=n, stop_reason=reason, stop_sequence=matched, usage=usage)


def _chunks(text: str) -> Iterator[str]:
    words = text.split(" ")
    for i in range(0, len(words), STREAM_CHUNK_WORDS):
        piece = " ".join(words[i : i + STREAM_CHUNK_WORDS])
        yield piece if i + STREAM_CHUNK_WORDS >= len(words) else piece + " "


# --- Anthropic ---------------------------------------------------------------------------------


def anthropic_usage(a: Answer, *, output_tokens: int | None = None) -> dict[str, Any]:
    u = a.usage
    return {"input_tokens": u.input_tokens,
            "cache_creation_input_tokens": u.cache_write_tokens + u.cache_write_1h_tokens,
            "cache_read_input_tokens": u.cache_read_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write_tokens,
                               "ephemeral_1h_input_tokens": u.cache_write_1h_tokens},
            "output_tokens": a.output_tokens if output_tokens is None else output_tokens,
            "service_tier": "standard"}


def anthropic_message(model: str, a: Answer, *, message_id: str | None = None, content: bool = True,
                      output_tokens: int | None = None, final: bool = True) -> dict[str, Any]:
    return {
        "id": message_id or f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": a.text}] if content else [],
        "stop_reason": a.stop_reason if final else None,
        "stop_sequence": a.stop_sequence if final else None,
        "usage": anthropic_usage(a, output_tokens=output_tokens),
    }


def anthropic_events(model: str, a: Answer) -> Iterator[tuple[str, dict[str, Any]]]:
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    yield "message_start", {"type": "message_start",
                            "message": anthropic_message(model, a, message_id=mid, content=False, output_tokens=1,
                                                         final=False)}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "ping", {"type": "ping"}
    for piece in _chunks(a.text):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": piece}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    usage = anthropic_usage(a)
    usage.pop("service_tier")
    usage.pop("cache_creation")
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": a.stop_reason, "stop_sequence": a.stop_sequence},
                            "usage": usage}
    yield "message_stop", {"type": "message_stop"}


# --- OpenAI ------------------------------------------------------------------------------------


def openai_usage(a: Answer) -> dict[str, Any]:
    u = a.usage
    return {"prompt_tokens": u.total, "completion_tokens": a.output_tokens, "total_tokens": u.total + a.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def openai_completion(model: str, a: Answer) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.text, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": _OPENAI_FINISH.get(a.stop_reason, "stop"),
        }],
        "usage": openai_usage(a),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def openai_chunks(model: str, a: Answer, *, include_usage: bool) -> Iterator[dict[str, Any]]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "service_tier": "default", "system_fingerprint": None, "choices": choices}
        if include_usage:
            c["usage"] = None
        return c

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
                  "finish_reason": None}])
    for piece in _chunks(a.text):
        yield chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "logprobs": None,
                  "finish_reason": _OPENAI_FINISH.get(a.stop_reason, "stop")}])
    if include_usage:
        last = chunk([])
        last["usage"] = openai_usage(a)
        yield last


def sse(data: dict[str, Any] | str, *, event: str | None = None) -> bytes:
    """One server-sent event."""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {body}\n\n").encode()
