"""Aggregates of one run, computed only from its :class:`~loadgen.records.RequestRecord` list.

Definitions (the report repeats them):

* **steady window** ``[start + warm-up, end of issuing)``; requests are *in* it when their
  latency origin (intended or send time) falls inside. Warm-up and drain are outside.
* **throughput** = completions per second in the window, each request counted by the share of
  its lifetime (origin → completion) that lies in the window, so a window edge never adds or
  drops a whole request. ``completed_in_window`` is the plain count of completions.
* **Little's bound** (closed loop) = C / mean service time, service = the row's
  ``finished_at - started_at`` (what a worker spent on it, retries included), the mean taken
  over the requests the throughput counts, with the same window shares as weights. Throughput can
  reach it only if nothing else — queueing, broker, commit, notice, generator refill — takes
  time; ``ratio`` = throughput / bound is the honest efficiency figure.
* **latency** (HdrHistogram, µs resolution, 3 significant digits; percentile p is the value of
  rank round(p/100 · n) in sorted order): end-to-end = completion -
  origin, for every request in the window, failed and unfinished ones included (unfinished
  ones at the time the drain gave up); queue wait = ``started_at - submitted_at``; service as
  above; model call = the request's ``api_calls.latency_ms`` summed over its attempts (the
  provider calls alone — service minus rate-limit waits, backoff and the worker's own work).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from hdrh.histogram import HdrHistogram

from loadgen.records import UNFINISHED, RequestRecord

HDR_LOWEST_US = 1
HDR_HIGHEST_US = 24 * 3600 * 1_000_000
HDR_DIGITS = 3
PERCENTILES = (50.0, 95.0, 99.0)
DEFAULT_MAX_SEND_LAG_P99_MS = 10.0
#: A steady window shorter than this (a burst of ``count`` requests sent at once) is replaced
#: by the whole run.
MIN_WINDOW_S = 0.5


def latency_summary(values_s: Iterable[float]) -> dict[str, float | int | None]:
    """count, avg, min, p50, p95, p99, max in milliseconds (HdrHistogram percentiles)."""
    h = HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)
    n, total = 0, 0.0
    lo, hi = math.inf, -math.inf
    for v in values_s:
        us = max(HDR_LOWEST_US, min(HDR_HIGHEST_US, round(v * 1e6)))
        h.record_value(us)
        n += 1
        total += v
        lo, hi = min(lo, v), max(hi, v)
    if n == 0:
        return {"count": 0, "avg": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}
    out: dict[str, float | int | None] = {"count": n, "avg": total / n * 1000, "min": lo * 1000}
    for p in PERCENTILES:
        out[f"p{p:g}"] = h.get_value_at_percentile(p) / 1000
    out["max"] = hi * 1000
    return out


def _overlap_share(a: float, b: float, w0: float, w1: float) -> float:
    if b <= a:
        return 1.0 if w0 <= b < w1 else 0.0
    return max(0.0, min(b, w1) - max(a, w0)) / (b - a)


def in_window(records: Sequence[RequestRecord], window: tuple[float, float]) -> list[RequestRecord]:
    w0, w1 = window
    return [r for r in records if w0 <= r.origin < w1]


def compute(
    records: Sequence[RequestRecord], *, kind: str, window: tuple[float, float], started_at: float,
    load_end: float, ended_at: float, concurrency: int | None = None, rate_per_s: float | None = None,
    max_send_lag_p99_ms: float = DEFAULT_MAX_SEND_LAG_P99_MS,
) -> dict[str, Any]:
    w0, w1 = window
    notes: list[str] = []
    if w1 - w0 < MIN_WINDOW_S and records:
        last = max((r.done_at for r in records if r.done_at is not None), default=ended_at)
        notes.append(f"the steady window was only {w1 - w0:.2f} s (a burst, or a warm-up that outlasted the load "
                     f"phase): throughput and latency cover the whole run, from the first request to the last "
                     f"completion ({last - started_at:.2f} s)")
        w0, w1 = started_at, max(last, started_at + 1e-6) + 1e-9
        window = (w0, w1)
    steady = in_window(records, window)
    if not steady and records:
        notes.append("the steady window holds no request (run shorter than its warm-up); all requests used")
        steady = list(records)
        w0, w1 = started_at, load_end
    dur = max(w1 - w0, 1e-9)
    done = [r for r in records if r.done_at is not None]
    completions = sum(_overlap_share(r.origin, r.done_at, w0, w1) for r in done)  # type: ignore[arg-type]
    successes = sum(_overlap_share(r.origin, r.done_at, w0, w1) for r in done  # type: ignore[arg-type]
                    if r.status == "succeeded")
    completed_in_window = sum(1 for r in done if w0 <= r.done_at < w1)  # type: ignore[operator]

    def e2e(r: RequestRecord) -> float:
        return (r.done_at if r.done_at is not None else ended_at) - r.origin

    services = [r.finished_at - r.started_at for r in steady
                if r.started_at is not None and r.finished_at is not None and r.status != UNFINISHED]
    waits = [r.started_at - r.submitted_at for r in steady if r.started_at is not None and r.submitted_at is not None]
    lat = {
        "e2e": latency_summary(e2e(r) for r in steady),
        "e2e_succeeded": latency_summary(e2e(r) for r in steady if r.status == "succeeded"),
        "queue_wait": latency_summary(waits),
        "service": latency_summary(services),
        "ratelimit_wait": latency_summary(r.ratelimit_wait_ms / 1000 for r in steady if r.api_calls),
        "model_call": latency_summary(r.model_ms / 1000 for r in steady if r.model_ms is not None),
    }
    throughput = completions / dur
    little = None
    # Little's bound uses the mean service time of the very requests the throughput counts,
    # weighted by the same window shares; since no request's service exceeds its lifetime,
    # the ratio cannot exceed 1 (short runs of few, unequal requests would otherwise scatter it).
    weighted = [(_overlap_share(r.origin, r.done_at, w0, w1), r.finished_at - r.started_at) for r in done  # type: ignore[arg-type]
                if r.started_at is not None and r.finished_at is not None]
    share_sum = sum(w for w, _ in weighted)
    if kind == "closed" and concurrency and share_sum > 0:
        mean_service = sum(w * s for w, s in weighted) / share_sum
        bound = concurrency / mean_service
        little = {"concurrency": concurrency, "mean_service_ms": mean_service * 1000, "bound_per_s": bound,
                  "ratio": throughput / bound}
    lags = [r.sent_at - r.intended_at for r in records if r.sent_at is not None and r.intended_at is not None]
    send_lag = latency_summary(max(0.0, v) for v in lags)
    invalid: list[str] = []
    if kind == "open" and send_lag["count"] and (send_lag["p99"] or 0) > max_send_lag_p99_ms:
        invalid.append(f"generator fell behind: p99 send lag {send_lag['p99']:.1f} ms > {max_send_lag_p99_ms:g} ms")
    return {
        "kind": kind,
        "window": {"start": w0, "end": w1, "duration_s": dur, "warmup_s": w0 - started_at,
                   "drain_s": ended_at - load_end, "completed_in_window": completed_in_window},
        "requests": _counts(records, steady),
        "throughput": {"completions_per_s": throughput, "successes_per_s": successes / dur,
                       "offered_per_s": rate_per_s},
        "little": little,
        "latency_ms": lat,
        "send_lag_ms": send_lag,
        "valid": not invalid,
        "invalid_reasons": invalid,
        "retries": _retries(records),
        "rate_limit": _rate_limit(records),
        "fallbacks": _fallbacks(records),
        "cost": _cost(records),
        "workers": _workers(records),
        "notes": notes,
    }


def _counts(records: Sequence[RequestRecord], steady: Sequence[RequestRecord]) -> dict[str, Any]:
    def split(rs: Sequence[RequestRecord]) -> dict[str, Any]:
        ok = sum(1 for r in rs if r.status == "succeeded")
        failed = [r for r in rs if r.status != "succeeded"]
        return {"total": len(rs), "succeeded": ok, "failed": len(failed),
                "unfinished": sum(1 for r in rs if r.status == UNFINISHED),
                "error_rate": len(failed) / len(rs) if rs else 0.0,
                "failures_by_reason": dict(Counter(r.reason or "unknown" for r in failed).most_common())}
    return {"run": split(records), "window": split(steady)}


def _retries(records: Sequence[RequestRecord]) -> dict[str, Any]:
    calls = sum(r.api_calls for r in records)
    retried = [r for r in records if r.api_calls > 1]
    return {"api_calls": calls, "retries": sum(r.api_calls - 1 for r in retried), "requests_retried": len(retried),
            "requests_recovered": sum(1 for r in retried if r.status == "succeeded")}


def _rate_limit(records: Sequence[RequestRecord]) -> dict[str, Any]:
    waited = [r for r in records if r.calls_waited > 0]
    waits_s = [r.ratelimit_wait_ms / 1000 for r in waited]
    return {"requests_waited": len(waited), "calls_waited": sum(r.calls_waited for r in waited),
            "total_wait_ms": sum(r.ratelimit_wait_ms for r in records),
            "per_waiting_request_ms": latency_summary(waits_s)}


def _fallbacks(records: Sequence[RequestRecord]) -> dict[str, Any]:
    pairs = Counter(f"{r.tier_requested}->{r.tier_used}" for r in records
                    if r.tier_used and r.tier_requested and r.tier_used != r.tier_requested)
    finished = sum(1 for r in records if r.tier_used)
    n = sum(pairs.values())
    return {"count": n, "rate": n / finished if finished else 0.0, "pairs": dict(pairs)}


def _cost(records: Sequence[RequestRecord]) -> dict[str, Any]:
    by: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                                                         "cost_usd": Decimal(0)})
    for r in records:
        tier = r.tier_used or r.tier_requested
        if tier is None:
            continue
        b = by[tier]
        b["requests"] += 1
        b["input_tokens"] += r.input_tokens
        b["output_tokens"] += r.output_tokens
        b["cost_usd"] += r.cost_usd
    total = sum((b["cost_usd"] for b in by.values()), Decimal(0))
    n = sum(b["requests"] for b in by.values())
    tin = sum(b["input_tokens"] for b in by.values())
    tout = sum(b["output_tokens"] for b in by.values())
    tiers = {t: {**b, "cost_usd": str(b["cost_usd"]),
                 "cost_per_request_usd": float(b["cost_usd"] / b["requests"]) if b["requests"] else 0.0}
             for t, b in sorted(by.items())}
    return {"total_usd": str(total), "requests": n, "per_request_usd": float(total / n) if n else 0.0,
            "input_tokens": tin, "output_tokens": tout, "tokens_per_request": (tin + tout) / n if n else 0.0,
            "usd_per_mtok": float(total / (tin + tout) * 1_000_000) if tin + tout else 0.0, "by_tier": tiers}


def _workers(records: Sequence[RequestRecord]) -> dict[str, Any]:
    c = Counter(r.worker for r in records if r.worker)
    n = sum(c.values())
    if not n:
        return {"count": 0, "share": {}, "jain_index": None, "max_share": None, "min_share": None}
    xs = list(c.values())
    return {"count": len(c), "share": {w: k / n for w, k in sorted(c.items())}, "requests": dict(sorted(c.items())),
            "jain_index": sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)),
            "max_share": max(xs) / n, "min_share": min(xs) / n}
