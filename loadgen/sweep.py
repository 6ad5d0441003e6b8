"""Sweep analysis: where the fleet's knee is and when to stop adding load.

Per level we know throughput, p99, error rate and the efficiency against its binding ceiling.

* A level is **healthy** when its error rate is at most ``max_error_rate``, its p99 at most
  ``p99_factor`` x the lightest level's p99 (judged only when both levels have enough samples for
  a p99: a slowest response is one sample — a retry, a cold connection — not a tail, so a level
  without a p99 is judged by its errors and efficiency alone) and its efficiency (throughput ÷ the binding ceiling) at
  least ``min_efficiency`` (open loop: it completes at least ``1 - drop_tolerance`` of the offered
  rate). The **knee** is the last healthy level before the first unhealthy one.
* The sweep **stops** (over-saturation) after a level whose throughput fell more than
  ``drop_tolerance`` below the best level so far, whose error rate exceeds twice the limit (and
  is above the limit with 95% confidence: one failure among six requests is not evidence), whose
  efficiency is under half the minimum and lower than the previous level's (more load made it
  worse; the lightest level's overhead alone is not saturation), or (open loop) which completed
  under half the offered rate — more load there only builds a backlog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import sqrt
from typing import Any


@dataclass(frozen=True, slots=True)
class KneePolicy:
    max_error_rate: float = 0.05
    p99_factor: float = 2.0
    min_efficiency: float = 0.8
    drop_tolerance: float = 0.10


@dataclass(frozen=True, slots=True)
class Level:
    level: float
    throughput: float
    p99_ms: float | None
    error_rate: float
    #: throughput ÷ the binding ceiling (see loadgen.metrics)
    efficiency: float | None
    binding: str | None = None
    #: open loop: the offered arrival rate
    offered: float | None = None
    #: requests behind ``error_rate`` (0: unknown, the rate is taken at face value)
    requests: int = 0
    #: ``p99_ms`` is the level's slowest response: too few samples for a p99 (the report shows —)
    p99_is_max: bool = False


def error_rate_lower_bound(rate: float, n: int, *, z: float = 1.96) -> float:
    """Wilson score interval's lower end for ``rate`` observed over ``n`` requests (95% by default)."""
    if n <= 0:
        return rate
    centre = rate + z * z / (2 * n)
    spread = z * sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def level_of(level: float, aggregates: dict[str, Any]) -> Level:
    c = aggregates.get("ceilings") or {}
    e2e = aggregates["latency_ms"]["e2e"]
    return Level(level=level, throughput=aggregates["throughput"]["completions_per_s"],
                 p99_ms=e2e["p99"] if e2e["p99"] is not None else e2e["max"],
                 error_rate=aggregates["requests"]["window"]["error_rate"], efficiency=c.get("efficiency"),
                 binding=c.get("binding"), offered=aggregates["throughput"].get("offered_per_s"),
                 requests=aggregates["requests"]["window"]["total"], p99_is_max=e2e["p99"] is None)


def _tail(lv: Level) -> str:
    return "slowest response (too few samples for a p99)" if lv.p99_is_max else "p99"


def unhealthy_because(lv: Level, first: Level, policy: KneePolicy) -> list[str]:
    why = []
    if lv.error_rate > policy.max_error_rate:
        why.append(f"error rate {lv.error_rate:.1%} > {policy.max_error_rate:.0%}")
    if (lv.p99_ms is not None and first.p99_ms and not lv.p99_is_max and not first.p99_is_max
            and lv.p99_ms > policy.p99_factor * first.p99_ms):
        why.append(f"{_tail(lv)} {lv.p99_ms:,.0f} ms > {policy.p99_factor:g}x the lightest level's {_tail(first)} "
                   f"{first.p99_ms:,.0f} ms")
    if lv.efficiency is not None and lv.efficiency < policy.min_efficiency:
        why.append(f"throughput only {lv.efficiency:.0%} of its binding ceiling ({lv.binding})")
    if lv.offered and lv.throughput < (1 - policy.drop_tolerance) * lv.offered:
        why.append(f"completed {lv.throughput:.2f} of {lv.offered:.2f} req/s offered")
    return why


def oversaturated_because(levels: Sequence[Level], policy: KneePolicy) -> str | None:
    """Why the sweep should stop after the last of ``levels`` (None: carry on)."""
    last = levels[-1]
    best = max(levels[:-1], key=lambda lv: lv.throughput, default=None)
    if best is not None and last.throughput < (1 - policy.drop_tolerance) * best.throughput:
        return (f"throughput fell to {last.throughput:.2f} req/s at {last.level:g}, below the "
                f"{best.throughput:.2f} req/s reached at {best.level:g}")
    if (last.error_rate > 2 * policy.max_error_rate
            and error_rate_lower_bound(last.error_rate, last.requests) > policy.max_error_rate):
        return f"error rate {last.error_rate:.1%} at {last.level:g}"
    if last.offered and last.throughput < 0.5 * last.offered:
        return f"only {last.throughput:.2f} of {last.offered:.2f} req/s offered completed at {last.level:g}"
    previous = levels[-2] if len(levels) > 1 else None
    if (last.efficiency is not None and last.efficiency < policy.min_efficiency / 2
            and previous is not None and previous.efficiency is not None
            and last.efficiency < previous.efficiency):
        return f"throughput only {last.efficiency:.0%} of its binding ceiling ({last.binding}) at {last.level:g}"
    return None


def find_knee(levels: Sequence[Level], policy: KneePolicy) -> dict[str, Any]:
    if not levels:
        return {"knee": None, "broke_at": None, "why": []}
    first = levels[0]
    for i, lv in enumerate(levels):
        why = unhealthy_because(lv, first, policy)
        if why:
            return {"knee": levels[i - 1].level if i else None, "broke_at": lv.level, "why": why}
    return {"knee": levels[-1].level, "broke_at": None, "why": []}
