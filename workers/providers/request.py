"""The model request a worker sends: the conversation, the system prompt and the call's options.

:class:`ModelRequest` is what :meth:`workers.caller.ModelCaller.call` and every provider's
``complete`` take (the providers turn it into their own wire format). It is built from the
request row (:meth:`workers.loader.RequestRow.model_request`), where ``validate_spec`` stored it
with the role's defaults filled in, so nothing here validates: a row holds a valid request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.catalog import ModelSpec
from config.request_limits import JSON_INSTRUCTION, METADATA_USER_ID, RESPONSE_FORMAT_JSON, RESPONSE_FORMAT_TEXT

#: A turn's content: text, or a list of ``{"type": "text", "text": ...}`` blocks (both APIs take either).
Content = str | list[dict[str, str]]


def estimate_tokens(text: str) -> int:
    """About four characters per token (the providers' own rule of thumb)."""
    return max(1, math.ceil(len(text) / 4))


def content_text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One model call's input. ``turns`` is the whole conversation, the prompt last."""

    turns: tuple[dict[str, Any], ...]
    #: The system prompt as the producer (or the role) gave it; None or "" for none.
    system: str | None = None
    #: The output limit; None: the tier's ``output_tokens`` upper bound.
    max_tokens: int | None = None
    #: None: the provider's default.
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    response_format: str = RESPONSE_FORMAT_TEXT
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, prompt: str, **options: Any) -> ModelRequest:
        """A single-turn request (tests, benchmarks)."""
        return cls.from_fields(prompt=prompt, **options)

    @classmethod
    def from_fields(cls, *, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                    system: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
                    stop: Sequence[str] | None = None, response_format: str | None = None,
                    metadata: Mapping[str, str] | None = None) -> ModelRequest:
        """From the stored fields: the earlier turns, then the prompt as the last user turn."""
        turns = [{"role": m["role"], "content": m["content"]} for m in messages or ()]
        if prompt is not None:
            turns.append({"role": "user", "content": prompt})
        return cls(turns=tuple(turns), system=system, max_tokens=max_tokens, temperature=temperature,
                   stop=tuple(stop or ()), response_format=response_format or RESPONSE_FORMAT_TEXT,
                   metadata=dict(metadata or {}))

    # --- what every provider sends ---------------------------------------------------------

    @property
    def json_mode(self) -> bool:
        return self.response_format == RESPONSE_FORMAT_JSON

    def system_text(self) -> str | None:
        """The system prompt sent: the request's, with the JSON instruction in JSON mode; None if empty."""
        parts = [p for p in (self.system, JSON_INSTRUCTION if self.json_mode else None) if p]
        return "\n\n".join(parts) or None

    def text(self) -> str:
        """Every text the model is given (system prompt and turns), for estimates and test markers."""
        parts = [self.system_text() or ""] + [content_text(t["content"]) for t in self.turns]
        return "\n".join(p for p in parts if p)

    def estimated_input_tokens(self) -> int:
        """The input tokens a call will be billed for, estimated before it is made (the whole request)."""
        return estimate_tokens(self.text())

    def output_limit(self, spec: ModelSpec) -> int:
        """``max_tokens`` sent to ``spec``'s model: the request's (else the tier's bound), within the model's limit."""
        return max(1, min(self.max_tokens or spec.output_tokens[1], spec.max_output_tokens))

    def reserved_output_tokens(self, spec: ModelSpec) -> int:
        """Output tokens the fleet limiter reserves before the call: the output limit, capped by the
        tier's ``output_tokens`` bound (what its answers are expected to stay within); the
        reservation is corrected to the real usage after the call."""
        return min(self.output_limit(spec), spec.output_tokens[1])

    def end_user_id(self, *, request_id: str) -> str:
        """The end-user id sent with the call: ``metadata["user_id"]`` if given, else the request id."""
        return self.metadata.get(METADATA_USER_ID) or request_id
