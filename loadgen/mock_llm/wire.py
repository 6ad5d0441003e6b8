"""What the mock accepts: each API's request body, checked the way the real API checks it.

:func:`parse_anthropic` and :func:`parse_openai` turn a request body into a :class:`Parsed`
request (the prompt's text as ordered segments with their prompt-cache breakpoints, the output
limit, stop sequences, JSON mode, streaming) or raise :class:`WireError` with the 400 the real
API would answer: an unknown field (both APIs refuse extra inputs), ``max_tokens`` missing
(Anthropic), a ``system`` role in Anthropic's ``messages``, OpenAI's JSON mode without the word
"JSON" in the messages, ``stream_options`` without ``stream``, values out of range. A client that
sends the wrong shape fails against the mock as it would against the provider.

JSON mode is OpenAI's ``response_format``; for Anthropic, a structured-output format or a system
prompt asking for JSON (which a model would follow).

The field sets are those of the official SDKs' ``messages.create`` / ``chat.completions.create``
(anthropic 2.x, openai 3.x) plus the sampling fields the Messages API still takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ANTHROPIC_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "output_config", "cache_control",
    "diagnostics", "inference_geo", "speed", "user_profile_id", "workspace_id", "mcp_servers", "context_management",
})
OPENAI_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options", "temperature",
    "top_p", "n", "response_format", "seed", "user", "safety_identifier", "metadata", "store", "tools", "tool_choice",
    "parallel_tool_calls", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "verbosity", "web_search_options", "moderation",
    "function_call", "functions",
})
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
CACHE_TTLS = {"5m": "cache_write_tokens", "1h": "cache_write_1h_tokens"}


class WireError(Exception):
    """A request the real API would refuse (400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code


@dataclass(slots=True)
class Segment:
    """A piece of the prompt, in the order the model reads it."""

    text: str
    #: "5m" / "1h": a prompt-cache breakpoint after this piece (Anthropic ``cache_control``).
    cache_ttl: str | None = None


@dataclass(slots=True)
class Parsed:
    protocol: str
    model: str
    segments: list[Segment]
    max_tokens: int | None
    stop: tuple[str, ...] = ()
    json_mode: bool = False
    stream: bool = False
    #: OpenAI ``stream_options.include_usage``: a last chunk carries the usage.
    include_usage: bool = False
    end_user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The prompt as one text (pieces joined by newlines), as the mock counts it."""
        return "\n".join(s.text for s in self.segments if s.text)


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WireError(f"{name}: Input should be a valid number")
    if not low <= value <= high:
        raise WireError(f"{name}: Input should be between {low:g} and {high:g}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{name}: Input should be a valid integer")
    if value < 1:
        raise WireError(f"{name}: Input should be greater than or equal to 1")
    return value


def _ttl(block: Mapping[str, Any], where: str) -> str | None:
    cc = block.get("cache_control")
    if cc is None:
        return None
    if not isinstance(cc, Mapping) or cc.get("type") != "ephemeral":
        raise WireError(f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = cc.get("ttl", "5m")
    if ttl not in CACHE_TTLS:
        raise WireError(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return ttl


def _block_text(block: Mapping[str, Any]) -> str:
    """The text a content block contributes (text, tool results, documents with text)."""
    for key in ("text", "content", "input"):
        v = block.get(key)
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            return "".join(_block_text(b) for b in v if isinstance(b, Mapping))
    return ""


# --- Anthropic Messages ------------------------------------------------------------------------


def _anthropic_blocks(content: Any, where: str, *, system: bool = False) -> list[Segment]:
    if isinstance(content, str):
        return [Segment(content)]
    if not isinstance(content, list):
        raise WireError(f"{where}: Input should be a valid string or a list of content blocks")
    out = []
    for i, block in enumerate(content):
        at = f"{where}.{i}"
        if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
            raise WireError(f"{at}: Input should be a content block with a type")
        if system and block["type"] != "text":
            raise WireError(f"{at}.type: Input should be 'text'")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise WireError(f"{at}.text: Field required")
        out.append(Segment(_block_text(block), cache_ttl=_ttl(block, at)))
    return out


def parse_anthropic(body: Mapping[str, Any]) -> Parsed:
    for key in body:
        if key not in ANTHROPIC_FIELDS:
            raise WireError(f"{key}: Extra inputs are not permitted")
    if "max_tokens" not in body:
        raise WireError("max_tokens: Field required")
    max_tokens = _positive_int("max_tokens", body["max_tokens"])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise WireError("messages: at least one message is required")
    segments: list[Segment] = []
    system = body.get("system")
    if system is not None:
        segments += _anthropic_blocks(system, "system", system=True)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise WireError(f"messages.{i}: Input should be a valid dictionary")
        if m.get("role") not in ("user", "assistant"):
            raise WireError(f"messages.{i}.role: Input should be 'user' or 'assistant'"
                            + ("; use the top-level system parameter for a system prompt"
                               if m.get("role") == "system" else ""))
        if "content" not in m:
            raise WireError(f"messages.{i}.content: Field required")
        segments += _anthropic_blocks(m["content"], f"messages.{i}.content")
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise WireError("stop_sequences: Input should be a valid list of strings")
        if any(not s.strip() for s in stop):
            raise WireError("stop_sequences: each stop sequence must contain non-whitespace characters")
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        if body.get(name) is not None:
            _number(name, body[name], 0.0, high)
    metadata = body.get("metadata")
    user = None
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise WireError("metadata: Input should be a valid dictionary")
        for key in metadata:
            if key != "user_id":
                raise WireError(f"metadata.{key}: Extra inputs are not permitted")
        user = metadata.get("user_id")
        if user is not None and (not isinstance(user, str) or len(user) > 256):
            raise WireError("metadata.user_id: Input should be a string of at most 256 characters")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise WireError("stream: Input should be a valid boolean")
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), Mapping) else None
    # JSON mode: structured outputs, or a system prompt asking for JSON (the model follows it).
    system_text = "".join(s.text for s in _anthropic_blocks(system, "system", system=True)) if system else ""
    json_mode = (isinstance(fmt, Mapping) and fmt.get("type") == "json_schema") or "json" in system_text.lower()
    return Parsed(protocol="anthropic", model=body["model"], segments=segments, max_tokens=max_tokens,
                  stop=tuple(stop or ()), json_mode=json_mode, stream=stream, end_user=user)


# --- OpenAI Chat Completions -------------------------------------------------------------------


def _openai_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise WireError(f"Invalid type for '{where}': expected a string or an array of content parts")
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise WireError(f"Invalid type for '{where}[{i}]': expected a content part object")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise WireError(f"Missing required parameter: '{where}[{i}].text'.")
        parts.append(_block_text(part))
    return "".join(parts)


def parse_openai(body: Mapping[str, Any]) -> Parsed:
    for key in body:
        if key not in OPENAI_FIELDS:
            raise WireError(f"Unrecognized request argument supplied: {key}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise WireError("Invalid 'messages': empty array. Expected an array with minimum length 1.")
    segments: list[Segment] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in OPENAI_ROLES:
            raise WireError(f"Invalid value for 'messages[{i}].role': expected one of {', '.join(OPENAI_ROLES)}.")
        segments.append(Segment(_openai_content(m.get("content"), f"messages[{i}].content")))
    limit = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            limit = _positive_int(name, body[name])
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise WireError("Invalid type for 'stop': expected a string or an array of strings.")
        if len(stops) > 4:
            raise WireError("Invalid 'stop': array too long. Expected an array with maximum length 4.")
        stop = tuple(stops)
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        if body.get(name) is not None:
            _number(name, body[name], 0.0, high)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise WireError("Invalid type for 'stream': expected a boolean.")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise WireError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    fmt = body.get("response_format")
    json_mode = False
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise WireError("Invalid value for 'response_format.type': expected one of text, json_object, json_schema.")
        json_mode = kind != "text"
        text = "\n".join(s.text for s in segments)
        if kind == "json_object" and "json" not in text.lower():
            raise WireError("'messages' must contain the word 'json' in some form, to use 'response_format' of "
                            "type 'json_object'.")
    user = body.get("safety_identifier") or body.get("user")
    return Parsed(protocol="openai", model=body["model"], segments=segments, max_tokens=limit,
                  stop=tuple(stop or ()), json_mode=json_mode, stream=stream,
                  include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")),
                  end_user=user if isinstance(user, str) else None)
