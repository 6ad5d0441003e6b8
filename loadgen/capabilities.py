"""What the fleet under test can do, probed — so a report never claims a feature it lacked.

A capability counts as *exercised* in a run only if the run's data show it acting (a wait,
a refusal, a mode switch); being importable is not enough.
"""

from __future__ import annotations

import importlib.util
from typing import Any

CAPABILITY_TEXT = {
    "fleet_rate_limiter": "fleet-wide rate limiter (workers/ratelimit.py)",
    "degradation_modes": "graceful degradation modes (optimal → high load → critical; seen as requests run on a "
                         "cheaper tier than requested)",
    "admission_control": "admission control (refusing requests with Overloaded)",
    "worker_processes": "several worker processes",
    "response_cache": "exact response cache (tars_tasks/cache.py; answers at submit, needs TARS_CACHE_URL)",
    "budgets": "tenant budgets (tars_tasks/budgets.py; refusals with BudgetExceeded or failure reason budget)",
    "batch_lane": "the providers' batch lane (workers/batchlane/: calls at the batch price by tars batch-runner)",
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe() -> dict[str, bool]:
    """Present in this code base (importable), whether or not a run exercises it."""
    return {
        "fleet_rate_limiter": _has("workers.ratelimit"),
        "degradation_modes": _has("tars_tasks.degradation") or _has("tars_tasks.admission"),
        "admission_control": _has("tars_tasks.admission"),
        "worker_processes": True,
        "response_cache": _has("tars_tasks.cache"),
        "budgets": _has("tars_tasks.budgets"),
        "batch_lane": _has("workers.batchlane.runner"),
    }


def exercised(name: str, aggregates: dict[str, Any], *, fleet_processes: int | None) -> bool:
    if name == "fleet_rate_limiter":
        if aggregates["rate_limit"]["requests_waited"] > 0:
            return True
        # With dispatch (docs/DISPATCH.md) requests wait in staging, not in the limiter: the limit
        # acted if it is what bound the run and the run reached it.
        c = aggregates.get("ceilings") or {}
        rl = next((it for it in c.get("items", []) if it.get("name") == "rate limits"), None)
        return bool(rl and c.get("binding") == "rate limits" and (rl.get("ratio") or 0) >= 0.9)
    if name == "admission_control":
        return any(k.startswith("rejected:") for k in aggregates["requests"]["run"]["failures_by_reason"])
    if name == "degradation_modes":
        return aggregates["fallbacks"]["count"] > 0
    if name == "worker_processes":
        return (fleet_processes or 0) > 1 or aggregates["workers"]["count"] > 1
    cc = aggregates.get("cost_controls") or {}
    if name == "response_cache":
        return (cc.get("answered_by") or {}).get("exact", 0) > 0
    if name == "budgets":
        return (cc.get("budget") or {}).get("refused", 0) > 0
    if name == "batch_lane":
        return (cc.get("savings") or {}).get("batch_calls", 0) > 0
    return False


def not_exercised(required: tuple[str, ...], aggregates: dict[str, Any], *, fleet_processes: int | None,
                  present: dict[str, bool]) -> list[str]:
    """One sentence per required capability the run did not exercise, saying why."""
    out = []
    for name in required:
        if exercised(name, aggregates, fleet_processes=fleet_processes):
            continue
        text = CAPABILITY_TEXT.get(name, name)
        if name == "worker_processes":
            out.append(f"{text}: the fleet under test ran {fleet_processes or 'an unknown number of'} worker "
                       f"process(es) and {aggregates['workers']['count']} distinct worker(s) served requests")
        elif not present.get(name, False):
            out.append(f"{text}: not present in this code base, so not exercised")
        else:
            out.append(f"{text}: present, but no request in this run shows it acting")
    return out
