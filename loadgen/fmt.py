"""Number formatting shared by the report, the live display and ``compare``."""

from __future__ import annotations

from typing import Any

DASH = "—"


def ms(v: float | None, *, digits: int = 0) -> str:
    return DASH if v is None else f"{v:,.{digits}f} ms"


def pct(v: float | None, *, digits: int = 1) -> str:
    return DASH if v is None else f"{v * 100:.{digits}f}%"


def rate(v: float | None) -> str:
    return DASH if v is None else f"{v:,.2f} req/s"


def mb(v: float | None) -> str:
    return DASH if v is None else f"{v:,.1f} MB"


def usd(v: Any, *, digits: int = 4) -> str:
    return DASH if v is None else f"${float(v):,.{digits}f}"


def num(v: float | int | None, *, digits: int = 0) -> str:
    return DASH if v is None else f"{v:,.{digits}f}"
