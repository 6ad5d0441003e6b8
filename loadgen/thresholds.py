"""``--fail-if 'p99>4s,error_rate>5%'``: conditions over every run's aggregates, for CI.

A condition is ``METRIC OP VALUE[UNIT]`` with OP one of ``> >= < <=`` and units ``ms s %``
(latencies are compared in ms, rates as fractions). Metrics: avg p50 p95 p99 max (end-to-end
latency), queue_p99, service_p99, ratelimit_wait_p99, send_lag_p99, error_rate, throughput,
efficiency (throughput ÷ the binding ceiling), cost_per_request, invalid (1 if the run is
invalid). A percentile withheld for too few samples matches no condition.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tars_tasks.errors import LoadgenError

_OPS: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                    "<=": operator.le}
_COND = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*(ms|s|%|/s)?\s*$")


def _lat(key: str, part: str = "e2e") -> Callable[[dict[str, Any]], float | None]:
    return lambda a: a["latency_ms"][part][key]


METRICS: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {
    "avg": ("ms", _lat("avg")), "p50": ("ms", _lat("p50")), "p95": ("ms", _lat("p95")), "p99": ("ms", _lat("p99")),
    "max": ("ms", _lat("max")), "queue_p99": ("ms", _lat("p99", "queue_wait")),
    "service_p99": ("ms", _lat("p99", "service")), "send_lag_p99": ("ms", lambda a: a["send_lag_ms"]["p99"]),
    "error_rate": ("fraction", lambda a: a["requests"]["window"]["error_rate"]),
    "throughput": ("rate", lambda a: a["throughput"]["completions_per_s"]),
    "efficiency": ("fraction", lambda a: (a.get("ceilings") or {}).get("efficiency")),
    "ratelimit_wait_p99": ("ms", _lat("p99", "ratelimit_wait")),
    "cost_per_request": ("usd", lambda a: a["cost"]["per_request_usd"]),
    "invalid": ("flag", lambda a: 0.0 if a["valid"] else 1.0),
}


@dataclass(frozen=True, slots=True)
class Condition:
    metric: str
    op: str
    value: float  # in the metric's base unit (ms, fraction, req/s, usd)
    text: str

    def check(self, aggregates: dict[str, Any]) -> tuple[bool, float | None]:
        v = METRICS[self.metric][1](aggregates)
        return (v is not None and _OPS[self.op](float(v), self.value)), v


def parse(expr: str) -> list[Condition]:
    conds = []
    for part in (p for p in expr.split(",") if p.strip()):
        m = _COND.match(part)
        if not m:
            raise LoadgenError(f"bad --fail-if condition {part.strip()!r}: use METRIC OP VALUE, e.g. 'p99>4s'")
        metric, op, raw, unit = m.groups()
        if metric not in METRICS:
            raise LoadgenError(f"unknown --fail-if metric {metric!r}; known: {', '.join(METRICS)}")
        kind = METRICS[metric][0]
        value = float(raw)
        if kind == "ms":
            value *= {"s": 1000.0, "ms": 1.0, None: 1.0}.get(unit, float("nan"))
        elif kind == "fraction":
            value = value / 100 if unit == "%" else value
        if value != value or (unit == "%" and kind != "fraction") or (unit in ("s", "ms") and kind != "ms"):
            raise LoadgenError(f"--fail-if {part.strip()!r}: unit {unit!r} does not fit {metric}")
        conds.append(Condition(metric=metric, op=op, value=value, text=part.strip()))
    return conds


def violations(conditions: list[Condition], runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for label, agg in runs:
        for c in conditions:
            hit, v = c.check(agg)
            if hit:
                out.append(f"{label}: {c.text} (measured {v:.4g})")
    return out


def unchecked(conditions: list[Condition], runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Conditions that could not be checked on a run (a percentile withheld for too few samples)."""
    out = []
    for label, agg in runs:
        for c in conditions:
            if METRICS[c.metric][1](agg) is None:
                out.append(f"{label}: {c.text} not checked ({c.metric} not measured in this run)")
    return out
