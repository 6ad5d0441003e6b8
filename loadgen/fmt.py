"""Number formatting shared by the report, the live display and ``compare``.

Memory is in MiB (2^20 bytes) everywhere: what psutil's RSS divided by 1024² is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DASH = "—"


def ms(v: float | None, *, digits: int = 0) -> str:
    return DASH if v is None else f"{v:,.{digits}f} ms"


def pct(v: float | None, *, digits: int = 1) -> str:
    return DASH if v is None else f"{v * 100:.{digits}f}%"


def rate(v: float | None) -> str:
    """req/s with 3 decimals below 10/s (a baseline's 0.6 req/s keeps 3 significant digits)."""
    return DASH if v is None else f"{v:,.{3 if abs(v) < 10 else 2}f} req/s"


def mib(v: float | None) -> str:
    return DASH if v is None else f"{v:,.1f} MiB"


def usd(v: Any, *, digits: int = 4) -> str:
    return DASH if v is None else f"${float(v):,.{digits}f}"


def num(v: float | int | None, *, digits: int = 0) -> str:
    return DASH if v is None else f"{v:,.{digits}f}"


def percentile(summary: Mapping[str, Any], key: str, *, reason: bool = True) -> str:
    """A latency summary's percentile in ms, or "—" with the reason it was withheld."""
    v = summary.get(key)
    if v is not None:
        return ms(v)
    why = (summary.get("withheld") or {}).get(key)
    return f"{DASH} ({why})" if why and reason else DASH
