"""The provider interface: one blocking call per attempt (cooperative under gevent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config.catalog import ModelSpec


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int
    http_status: int = 200


class Provider(Protocol):
    name: str

    def complete(self, *, spec: ModelSpec, prompt: str, request_id: str, attempt: int) -> Completion:
        """Make one model call. Raise a :class:`tars_tasks.errors.ProviderError` on failure."""
        ...
