"""Tenants: their fair-share weights and their own rate limits (on top of the models' limits).

Data, not code: a TOML file (``TARS_TENANTS_PATH``; none = every tenant has weight 1 and no
limits of its own)::

    [defaults]            # every tenant not named below
    weight = 1
    rpm = 0               # 0 = no limit of its own (the model's limit still applies)
    tpm = 0

    [tenants.acme]
    weight = 3            # three times the default share when tenants compete at one priority
    rpm = 1200
    tpm = 2000000

    [tenants.acme.tiers.opus]
    rpm = 60              # acme's calls to the opus tier, fleet-wide
    tpm = 100000

The dispatch script (``workers/dispatch.py``) reads this from one Redis hash
(:func:`config.keys.tenant_config_key`), written by :meth:`TenantConfig.redis_fields`; the
defaults travel with every dispatch call.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from config.keys import TIERS

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


class TenantLimits(BaseModel):
    """RPM/TPM ceilings; 0 means no ceiling of this kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)

    @property
    def limited(self) -> bool:
        return self.rpm > 0 or self.tpm > 0


class TenantSpec(TenantLimits):
    #: Share of dispatch when tenants compete at one tier and priority (deficit round robin quantum).
    weight: float = Field(default=1.0, ge=0.01, le=1_000_000)
    #: Per-tier ceilings of this tenant (tier name -> limits).
    tiers: dict[str, TenantLimits] = Field(default_factory=dict)

    def limited_on(self, tier: str) -> bool:
        """Whether a rate limit of this tenant's own binds its calls to ``tier``."""
        own = self.tiers.get(tier)
        return self.limited or (own is not None and own.limited)

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, v: dict[str, TenantLimits]) -> dict[str, TenantLimits]:
        for tier in v:
            if tier not in TIERS:
                raise ValueError(f"unknown tier {tier!r}: tiers are {', '.join(TIERS)}")
        return v


class TenantConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    defaults: TenantSpec = TenantSpec()
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _names(cls, v: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for name in v:
            if not _TENANT_RE.match(name):
                raise ValueError(f"tenant name {name!r}: 1-100 characters of letters, digits, '.', '_', '-'")
        return v

    def spec(self, tenant: str) -> TenantSpec:
        return self.tenants.get(tenant, self.defaults)

    def redis_fields(self) -> dict[str, str]:
        """The hash the dispatch script reads: ``w:T``, ``rpm:T``, ``tpm:T``, ``rpm:T:TIER``,
        ``tpm:T:TIER`` for every named tenant (a tenant with no entry gets the defaults, which
        are passed to the script on every call). A named tenant's tier limits default to none."""
        out: dict[str, str] = {}
        for name, t in self.tenants.items():
            out[f"w:{name}"] = repr(float(t.weight))
            out[f"rpm:{name}"] = str(t.rpm)
            out[f"tpm:{name}"] = str(t.tpm)
            for tier, lim in t.tiers.items():
                out[f"rpm:{name}:{tier}"] = str(lim.rpm)
                out[f"tpm:{name}:{tier}"] = str(lim.tpm)
        return out


def load_tenants(path: Path | None) -> TenantConfig:
    """Read a tenants TOML file; ``None`` gives the defaults (weight 1, no tenant limits)."""
    if path is None:
        return TenantConfig()
    data = tomllib.loads(Path(path).read_text())
    return TenantConfig.model_validate(data)
