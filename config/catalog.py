"""The model catalog: tiers, their models, prices, limits and simulated behaviour.

The catalog is data (``config/models.toml``); this module parses and validates it.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.keys import TIERS
from config.pricing import Prices, Usage
from config.request_limits import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    RESPONSE_FORMATS,
    STOP_MAX,
    STOP_MAX_CHARS,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
)

DEFAULT_CATALOG_PATH = Path(__file__).with_name("models.toml")
_UNSTORABLE = ("\x00",)


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
    """One tier: the model it calls and what that costs.

    Prices come from the catalog's ``[prices."MODEL"]`` list (every token class, with its source);
    ``input_usd_per_mtok`` / ``output_usd_per_mtok`` given on the tier override the list's input
    and output prices (a negotiated rate), or stand alone for a model the list does not name.
    """

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
    #: Every token class's price (filled in from the catalog's price list and the two fields above).
    prices: Prices
    rpm: int = Field(gt=0)
    tpm: int = Field(gt=0)
    timeout_s: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=4, ge=1)
    retry_budget_s: float = Field(default=120, gt=0)
    fallback: str | None = None
    #: Output tokens the simulated provider draws from, and the upper bound the fleet limiter
    #: reserves for a call's output (a request's own ``max_tokens``, if smaller, is reserved instead).
    output_tokens: tuple[int, int] = (100, 400)
    #: The model's own output limit: the largest ``max_tokens`` a request may ask of this tier.
    max_output_tokens: int = Field(default=DEFAULT_MAX_OUTPUT_TOKENS, ge=1)
    #: The OpenAI Chat Completions field that carries the output limit: ``max_completion_tokens``
    #: (current; required by reasoning models) or ``max_tokens`` (deprecated; older compatible servers).
    openai_max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    #: False for a model that refuses sampling parameters (Anthropic's models after Claude Opus 4.6
    #: answer a non-default ``temperature`` with 400): a request's temperature is then not sent.
    accepts_temperature: bool = True
    latency: LatencyProfile = LatencyProfile()
    failure_rate: float = Field(default=0.01, ge=0, le=1)
    #: Response cache (tars_tasks/cache.py): seconds an answer of this tier stays cached (0: this
    #: tier's answers are never cached) ...
    cache_ttl_s: float = Field(default=3600, ge=0)
    #: ... and whether tenants share them (False: each tenant sees only its own answers).
    cache_shared: bool = False
    #: Semantic cache (tars_tasks/semantic.py, the ``semantic`` extra, ``TARS_SEMANTIC_CACHE``): the
    #: cosine similarity at or above which another prompt's cached answer is served (same scope,
    #: model and context; the lexical guard agreeing). 0.90 measured: docs/COST_CONTROLS.md. 0: off.
    semantic_threshold: float = Field(default=0.90, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _prices(cls, data: Any) -> Any:
        """Tier prices and the model's price list, merged (the tier's input/output win)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        listed = data.get("prices")
        listed = listed.model_dump() if isinstance(listed, Prices) else dict(listed or {})
        for field, key in (("input_usd_per_mtok", "input"), ("output_usd_per_mtok", "output")):
            if data.get(field) is not None:
                listed[key] = data[field]
            elif key in listed:
                data[field] = listed[key]
            else:
                raise ValueError(f"tier {data.get('tier')!r}: no {key} price for model {data.get('model')!r} "
                                 f"(list it under [prices.\"{data.get('model')}\"] or set {field})")
        data["prices"] = listed
        return data

    def cost_usd(self, *, input_tokens: int = 0, output_tokens: int = 0, cache_write_tokens: int = 0,
                 cache_write_1h_tokens: int = 0, cache_read_tokens: int = 0, batch: bool = False) -> Decimal:
        """Dollars a provider bills for one call with this usage, every class at its own price (exact decimal)."""
        return self.prices.cost_usd(Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                          cache_write_tokens=cache_write_tokens,
                                          cache_write_1h_tokens=cache_write_1h_tokens,
                                          cache_read_tokens=cache_read_tokens), batch=batch)

    def usage_cost_usd(self, usage: Usage, *, batch: bool = False) -> Decimal:
        return self.prices.cost_usd(usage, batch=batch)


class RoleDefaults(BaseModel):
    """What a role's requests get for the fields they leave out (see ``[roles.NAME]`` in the catalog)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)
    stop: tuple[str, ...] | None = Field(default=None, max_length=STOP_MAX)
    response_format: str | None = None

    @field_validator("system")
    @classmethod
    def _system(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c in v for c in _UNSTORABLE)
                              or any("\ud800" <= c <= "\udfff" for c in v)):
            raise ValueError("a role's system prompt must be non-blank text without NUL or lone surrogates")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for s in v or ():
            if not s.strip() or len(s) > STOP_MAX_CHARS or "\x00" in s:
                raise ValueError(f"stop sequences must be 1-{STOP_MAX_CHARS} characters, not only whitespace")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: str | None) -> str | None:
        if v is not None and v not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
        return v


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: role -> the tier it routes to
    roles: dict[str, str]
    tiers: dict[str, ModelSpec]
    #: role -> the defaults its requests get (system prompt, max_tokens, ...)
    role_defaults: dict[str, RoleDefaults] = {}

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
        for role, d in self.role_defaults.items():
            if role not in self.roles:
                raise ValueError(f"defaults for unknown role {role!r}")
            cap = self.tiers[self.roles[role]].max_output_tokens
            if d.max_tokens is not None and d.max_tokens > cap:
                raise ValueError(f"role {role!r}: max_tokens {d.max_tokens} exceeds its tier's max_output_tokens {cap}")
        return self

    def defaults_for(self, role: str) -> RoleDefaults:
        return self.role_defaults.get(role) or RoleDefaults()

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
    """Parse a catalog file. A role is ``name = "tier"`` or a table ``[roles.name]`` with ``tier`` and
    the role's defaults; ``[prices."MODEL"]`` lists a model's prices by token class."""
    data = tomllib.loads((path or DEFAULT_CATALOG_PATH).read_text())
    prices = data.get("prices", {})
    tiers = {}
    for name, body in data.get("tiers", {}).items():
        listed = prices.get(body.get("model"))
        tiers[name] = {"tier": name, **({"prices": listed} if listed is not None else {}), **body}
    roles: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    for role, value in data.get("roles", {}).items():
        if isinstance(value, dict):
            body = dict(value)
            if "tier" not in body:
                raise ValueError(f"role {role!r} has no tier")
            roles[role] = body.pop("tier")
            defaults[role] = body
        else:
            roles[role] = value
    return Catalog(roles=roles, tiers=tiers, role_defaults=defaults)
