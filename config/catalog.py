"""The model catalog: tiers, their models, prices, limits and simulated behaviour.

The catalog is data (``config/models.toml``); this module parses and validates it.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from config.keys import TIERS

DEFAULT_CATALOG_PATH = Path(__file__).with_name("models.toml")
_MILLION = Decimal(1_000_000)


class LatencyProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    distribution: Literal["uniform", "fixed", "lognormal"] = "uniform"
    low_ms: float = Field(default=500, ge=0)
    high_ms: float = Field(default=2500, ge=0)
    #: lognormal only: median and sigma of the underlying normal.
    median_ms: float = Field(default=1000, ge=0)
    sigma: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LatencyProfile:
        if self.high_ms < self.low_ms:
            raise ValueError("latency high_ms must be >= low_ms")
        return self

    @property
    def mean_ms(self) -> float:
        if self.distribution == "fixed":
            return self.low_ms
        if self.distribution == "uniform":
            return (self.low_ms + self.high_ms) / 2
        import math

        return self.median_ms * math.exp(self.sigma**2 / 2)

    @classmethod
    def parse(cls, spec: str) -> LatencyProfile:
        """Parse ``uniform:LOW:HIGH`` or ``fixed:MS`` (milliseconds)."""
        kind, _, rest = spec.partition(":")
        parts = [float(p) for p in rest.split(":") if p]
        if kind == "fixed" and len(parts) == 1:
            return cls(distribution="fixed", low_ms=parts[0], high_ms=parts[0])
        if kind == "uniform" and len(parts) == 2:
            return cls(distribution="uniform", low_ms=parts[0], high_ms=parts[1])
        raise ValueError(f"bad latency spec {spec!r}: use 'uniform:LOW_MS:HIGH_MS' or 'fixed:MS'")


class ModelSpec(BaseModel):
    """One tier: the model it calls and what that costs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: str
    model: str
    #: "simulated", "anthropic" or "openai" (see ``workers.providers``).
    provider: str = "simulated"
    #: Root URL of the provider's API (no trailing ``/v1``); None = the provider's public endpoint.
    base_url: str | None = None
    #: Name of the environment variable holding the API key; None = the provider's usual one
    #: (ANTHROPIC_API_KEY / OPENAI_API_KEY). The key itself is never part of the catalog.
    api_key_env: str | None = None
    connect_timeout_s: float = Field(default=5, gt=0)
    input_usd_per_mtok: Decimal = Field(ge=0)
    output_usd_per_mtok: Decimal = Field(ge=0)
    rpm: int = Field(gt=0)
    tpm: int = Field(gt=0)
    timeout_s: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=4, ge=1)
    retry_budget_s: float = Field(default=120, gt=0)
    fallback: str | None = None
    output_tokens: tuple[int, int] = (100, 400)
    latency: LatencyProfile = LatencyProfile()
    failure_rate: float = Field(default=0.01, ge=0, le=1)

    def cost_usd(self, *, input_tokens: int, output_tokens: int) -> Decimal:
        """Dollars a provider bills for one call with this usage (exact decimal)."""
        return (
            Decimal(input_tokens) * self.input_usd_per_mtok + Decimal(output_tokens) * self.output_usd_per_mtok
        ) / _MILLION


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    roles: dict[str, str]
    tiers: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        for tier in TIERS:
            if tier not in self.tiers:
                raise ValueError(f"catalog lacks tier {tier!r}")
        for role, tier in self.roles.items():
            if tier not in self.tiers:
                raise ValueError(f"role {role!r} routes to unknown tier {tier!r}")
        for spec in self.tiers.values():
            if spec.fallback is not None and spec.fallback not in self.tiers:
                raise ValueError(f"tier {spec.tier!r} falls back to unknown tier {spec.fallback!r}")
        return self

    def spec(self, tier: str) -> ModelSpec:
        return self.tiers[tier]

    def with_overrides(self, *, provider: str | None = None, base_url: str | None = None) -> Catalog:
        """The same catalog with every tier pointed at one provider and/or base URL
        (``TARS_PROVIDER_OVERRIDE`` / ``TARS_PROVIDER_BASE_URL``: tests and benchmarks aim a
        whole fleet at the mock server without editing the catalog)."""
        if provider is None and base_url is None:
            return self
        update: dict[str, str] = {}
        if provider is not None:
            update["provider"] = provider
        if base_url is not None:
            update["base_url"] = base_url
        tiers = {name: spec.model_copy(update=update) for name, spec in self.tiers.items()}
        return self.model_copy(update={"tiers": tiers})

    def by_model(self, model: str) -> ModelSpec | None:
        return next((s for s in self.tiers.values() if s.model == model), None)


def load_catalog(path: Path | None = None) -> Catalog:
    data = tomllib.loads((path or DEFAULT_CATALOG_PATH).read_text())
    tiers = {name: {"tier": name, **body} for name, body in data.get("tiers", {}).items()}
    return Catalog(roles=data.get("roles", {}), tiers=tiers)
