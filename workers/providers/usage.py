"""Each API's ``usage`` block and stop reason, read into TARS's token classes (:class:`config.pricing.Usage`).

Anthropic Messages (``usage`` of a message, or of a stream's ``message_start`` + ``message_delta``)::

    {"input_tokens": 50, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000,
     "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
     "output_tokens": 300}

``input_tokens`` excludes both cache classes. Without the ``cache_creation`` breakdown every write
is a 5-minute write (the default lifetime).

OpenAI Chat Completions::

    {"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
     "prompt_tokens_details": {"cached_tokens": 1536}, "completion_tokens_details": {"reasoning_tokens": 64}}

``prompt_tokens`` *includes* ``cached_tokens``; ``completion_tokens`` includes reasoning tokens
(billed as output). OpenAI bills no cache writes.

Stop reasons are kept in Anthropic's words (``end_turn``, ``max_tokens``, ``stop_sequence``,
``tool_use``, ``refusal``, ...); OpenAI's ``finish_reason`` is translated (``stop`` is
``end_turn``: OpenAI does not tell a stop sequence from a natural end).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from config.pricing import Usage

#: ``requests.stop_reason`` holds at most this many characters.
STOP_REASON_MAX_CHARS = 50
_OPENAI_FINISH = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal",
                  "tool_calls": "tool_use", "function_call": "tool_use"}


class UsageMissing(ValueError):
    """A response without the usage fields a bill needs."""


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0


def anthropic_usage(usage: Mapping[str, Any] | None) -> Usage:
    """Token classes of an Anthropic ``usage`` block (raises :class:`UsageMissing`)."""
    if not isinstance(usage, Mapping) or "input_tokens" not in usage or "output_tokens" not in usage:
        raise UsageMissing("response without usage.input_tokens / usage.output_tokens")
    writes = _int(usage, "cache_creation_input_tokens")
    split = usage.get("cache_creation")
    writes_1h = min(_int(split, "ephemeral_1h_input_tokens"), writes) if isinstance(split, Mapping) else 0
    return Usage(input_tokens=_int(usage, "input_tokens"), output_tokens=_int(usage, "output_tokens"),
                 cache_write_tokens=writes - writes_1h, cache_write_1h_tokens=writes_1h,
                 cache_read_tokens=_int(usage, "cache_read_input_tokens"))


def openai_usage(usage: Mapping[str, Any] | None) -> Usage:
    """Token classes of an OpenAI ``usage`` block (raises :class:`UsageMissing`)."""
    if not isinstance(usage, Mapping) or "prompt_tokens" not in usage or "completion_tokens" not in usage:
        raise UsageMissing("response without usage.prompt_tokens / usage.completion_tokens")
    prompt = _int(usage, "prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = min(_int(details, "cached_tokens"), prompt) if isinstance(details, Mapping) else 0
    return Usage(input_tokens=prompt - cached, output_tokens=_int(usage, "completion_tokens"),
                 cache_read_tokens=cached)


def anthropic_stop_reason(value: Any) -> str | None:
    return str(value)[:STOP_REASON_MAX_CHARS] if value else None


def openai_stop_reason(finish_reason: Any) -> str | None:
    if not finish_reason:
        return None
    return _OPENAI_FINISH.get(str(finish_reason), str(finish_reason)[:STOP_REASON_MAX_CHARS])
