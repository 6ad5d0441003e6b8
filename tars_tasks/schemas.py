"""What a producer may submit, validated before anything is recorded or queued."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tars_tasks.celery_app import PRIORITY_MAX, PRIORITY_MIN
from tars_tasks.errors import InvalidRequest

PRIORITY_NAMES: dict[str, int] = {"low": 0, "normal": 5, "high": 9}
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


def parse_priority(value: int | str) -> int:
    """``"low" | "normal" | "high"`` or an integer 0..9 (9 is served first)."""
    if isinstance(value, bool):
        raise InvalidRequest("priority must be an integer 0..9 or low/normal/high", field="priority")
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        if name.lstrip("-").isdigit():
            value = int(name)
        else:
            raise InvalidRequest(
                f"unknown priority {value!r}: use an integer {PRIORITY_MIN}..{PRIORITY_MAX} or "
                + "/".join(PRIORITY_NAMES),
                field="priority",
            )
    if not isinstance(value, int) or not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidRequest(
            f"priority {value!r} is out of range {PRIORITY_MIN}..{PRIORITY_MAX}", field="priority"
        )
    return value


class RequestSpec(BaseModel):
    """One unit of agent work as a producer describes it."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    role: str
    prompt: str
    priority: int = PRIORITY_NAMES["normal"]
    tenant: str = "default"
    idempotency_key: str | None = None
    #: Explicit tier, overriding the role's routing (the only way to reach opus by default).
    tier: str | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v: Any) -> int:
        return parse_priority(v)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not _TENANT_RE.match(v):
            raise ValueError("tenant must be 1-100 characters of letters, digits, '.', '_', '-'")
        return v

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not _KEY_RE.match(v):
            raise ValueError(
                "idempotency_key must be 1-200 characters of letters, digits, '.', '_', ':', '-' "
                "and start with a letter or digit"
            )
        return v


def validate_spec(data: RequestSpec | dict[str, Any], *, index: int | None = None) -> RequestSpec:
    """Turn producer input into a :class:`RequestSpec` or raise :class:`InvalidRequest`."""
    if isinstance(data, RequestSpec):
        return data
    where = f"request #{index}: " if index is not None else ""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where}expected a mapping of request fields, got {type(data).__name__}")
    try:
        return RequestSpec.model_validate(data)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}{exc}", field=exc.field) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or None
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, InvalidRequest):
            raise InvalidRequest(f"{where}{ctx_err}", field=field) from None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        raise InvalidRequest(f"{where}{field}: {msg}" if field else f"{where}{msg}", field=field) from None
