"""Model providers. The simulated provider is the default for every tier."""

from __future__ import annotations

from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import Completion, Provider
from workers.providers.openai import OpenAIProvider
from workers.providers.simulated import SimulatedProvider

__all__ = ["AnthropicProvider", "Completion", "OpenAIProvider", "Provider", "SimulatedProvider", "get_provider"]

_REGISTRY: dict[str, type] = {
    "simulated": SimulatedProvider,
    "anthropic": AnthropicProvider,
    "openai": OpenAIProvider,
}


def register(name: str, cls: type) -> None:
    _REGISTRY[name] = cls


def provider_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def get_provider(name: str, **kwargs) -> Provider:
    return provider_class(name)(**kwargs)
