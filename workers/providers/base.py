"""The provider interface: one blocking call per attempt (cooperative under gevent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config.catalog import ModelSpec
from config.pricing import Usage
from workers.providers.request import ModelRequest


@dataclass(frozen=True, slots=True)
class Completion:
    """One call's answer: the text, why the model stopped, and the tokens billed by class
    (``input_tokens`` is the input *not* read from or written to a prompt cache)."""

    text: str
    input_tokens: int
    output_tokens: int
    http_status: int = 200
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    stop_reason: str | None = None

    @classmethod
    def of(cls, *, text: str, usage: Usage, stop_reason: str | None, http_status: int = 200) -> Completion:
        return cls(text=text, http_status=http_status, stop_reason=stop_reason, **usage.columns())

    @property
    def usage(self) -> Usage:
        return Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                     cache_write_tokens=self.cache_write_tokens, cache_write_1h_tokens=self.cache_write_1h_tokens,
                     cache_read_tokens=self.cache_read_tokens)


class Provider(Protocol):
    name: str

    def complete(self, *, spec: ModelSpec, request: ModelRequest, request_id: str, attempt: int) -> Completion:
        """Make one model call. Raise a :class:`tars_tasks.errors.ProviderError` on failure."""
        ...
