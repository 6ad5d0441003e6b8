"""Aggregates of one run, computed only from its :class:`~loadgen.records.RequestRecord` list.

Definitions (the report's Method repeats them; ``tests/loadgen/test_recompute.py`` checks every
printed figure against its own reading of them, sharing no code with this module):

* **Population.** Every figure of a run's tables is over one set of requests, named in the
  report: a duration-bounded run's *steady-window population* — the requests whose latency
  origin (send time in a closed loop, intended send time in an open loop) falls in
  ``[start + warm-up, end of issuing)``; a count-bounded run (a burst) has no steady state, and
  its population is every request it sent. A run whose steady window is shorter than
  :data:`MIN_STEADY_WINDOW_S` (or than its mean response time) is invalid; its figures then
  cover every request, and the report says so. Rows the generator has no sample of (their
  submit call failed after recording; the generator counted the refusal already) are in no
  population, only in the bill.
* **Latency** (ms): response time = completion - origin, failed requests included, unfinished
  ones censored when the drain gave up; queue wait = ``started_at - submitted_at``; rate-limit
  wait = the request's ``api_calls.ratelimit_wait_ms`` summed; service = ``finished_at -
  started_at`` **minus** the rate-limit waits (a wait is never service); model call = the
  request's ``api_calls.latency_ms`` summed (0 for a request that made no call).
* **Percentiles** are nearest-rank over the raw values: the p-th is the value of rank
  ``ceil(p·n/100)`` in sorted order — a value that occurred, so p50 ≤ p95 ≤ p99 ≤ max. A
  percentile needs ``n ≥ 100 / (100 - p)`` samples (p50: 2, p95: 20, p99: 100) to differ from the
  maximum; with fewer it is withheld (``None``) and the reason kept.
* **Throughput.** Closed loop: completions ÷ D, where D is the mean, over the clients that sent
  any of the population (all C of them in a steady window), of the span from the client's first
  request of the population being sent to its last one completing. A client's requests never
  overlap, so the population's latencies add up to at most C·D, hence *throughput ≤ C ÷ mean
  response time, exactly*; the gap is the clients' idle time — the generator refilling a slot
  (refill) and backoff after a refusal. Open loop:
  completions ÷ the window's length.
* **Ceilings** (req/s, from the run's inputs and the population): *concurrency* C ÷ mean model
  time (closed) or the *offered* rate (open); the fleet-wide *rate limits* of the tiers the
  population's calls used, at its calls and tokens per request; *worker slots* S ÷ mean model
  time of the calls a worker slot made (a batch-lane answer is the batch runner's). The lowest
  **binds**; efficiency = throughput ÷ the binding ceiling.
* **Validity**: see :func:`validity`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from loadgen.records import UNFINISHED, RequestRecord, unknown_outcome
from tars_tasks.codes import RequestStatus

PERCENTILES = (50, 95, 99)
#: A percentile p needs at least this many samples (100 / (100 - p)) to be anything but the max.
MIN_SAMPLES = {p: math.ceil(100 / (100 - p)) for p in PERCENTILES}
DEFAULT_MAX_SEND_LAG_P99_MS = 10.0
#: A duration-bounded run needs a steady window at least this long (and at least its mean
#: response time) to be valid.
MIN_STEADY_WINDOW_S = 1.0
#: A closed loop whose clients waited more than this share of their time for the generator to
#: send their next request measured the generator, not the fleet.
MAX_REFILL_SHARE = 0.05


# --- latency summaries -------------------------------------------------------------------------


def nearest_rank(sorted_values: Sequence[float], p: int) -> float:
    """The value of rank ceil(p·n/100) (at least 1) of ``sorted_values`` (integer arithmetic)."""
    n = len(sorted_values)
    return sorted_values[max(1, (p * n + 99) // 100) - 1]


def latency_summary(values_ms: Iterable[float]) -> dict[str, Any]:
    """count, avg, min, p50, p95, p99, max (ms); a percentile with too few samples is None,
    and ``withheld`` says why."""
    vals = sorted(values_ms)
    n = len(vals)
    out: dict[str, Any] = {"count": n, "avg": None, "min": None, "max": None, "withheld": {}}
    for p in PERCENTILES:
        out[f"p{p}"] = None
    if n == 0:
        return out
    out.update(avg=math.fsum(vals) / n, min=vals[0], max=vals[-1])
    for p in PERCENTILES:
        if n >= MIN_SAMPLES[p]:
            out[f"p{p}"] = nearest_rank(vals, p)
        else:
            out["withheld"][f"p{p}"] = f"{n} sample{'s' if n != 1 else ''}; p{p} needs ≥ {MIN_SAMPLES[p]}"
    return out


# --- the population ------------------------------------------------------------------------------


def _end(r: RequestRecord, ended_at: float) -> float:
    """When a request stopped counting: its completion, or the drain's end if it never finished."""
    return r.done_at if r.done_at is not None else ended_at


def response_ms(r: RequestRecord, ended_at: float) -> float:
    return (_end(r, ended_at) - r.origin) * 1000


def service_ms(r: RequestRecord) -> float | None:
    """The worker's time with the request, rate-limit waits taken out (None if it never ran)."""
    if r.started_at is None or r.finished_at is None or r.status == UNFINISHED:
        return None
    return (r.finished_at - r.started_at) * 1000 - r.ratelimit_wait_ms


def model_ms(r: RequestRecord) -> float:
    return r.model_ms or 0.0


def population(records: Sequence[RequestRecord], *, window: tuple[float, float], count_bounded: bool,
               started_at: float, load_end: float) -> tuple[list[RequestRecord], dict[str, Any]]:
    """The requests every figure of the run's tables is computed over, and its description."""
    sampled = [r for r in records if r.sampled]
    w0, w1 = window
    if count_bounded:
        return sampled, {"name": "whole run", "start": started_at, "end": load_end,
                         "description": "of the whole run (a count-bounded burst has no steady state)"}
    if w1 - w0 < MIN_STEADY_WINDOW_S:
        return sampled, {"name": "whole run", "start": started_at, "end": load_end,
                         "description": f"of the whole run (the steady window was only {w1 - w0:.2f} s)"}
    pop = [r for r in sampled if w0 <= r.origin < w1]
    return pop, {"name": "steady window", "start": w0, "end": w1,
                 "description": "the requests sent in the steady window"}


# --- throughput ----------------------------------------------------------------------------------


def client_spans(pop: Sequence[RequestRecord], *, ended_at: float) -> dict[Any, list[RequestRecord]]:
    """The population's requests per client, in the order they were sent."""
    by: dict[Any, list[RequestRecord]] = defaultdict(list)
    for i, r in enumerate(pop):
        by[r.slot if r.slot is not None else ("unslotted", i)].append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r.origin)
    return by


def closed_loop_clients(pop: Sequence[RequestRecord], *, concurrency: int, ended_at: float) -> dict[str, Any]:
    """D (the clients' mean span) and how the clients spent it: in requests, refill, backoff."""
    by = client_spans(pop, ended_at=ended_at)
    span = busy = refill = 0.0
    for rs in by.values():
        span += _end(rs[-1], ended_at) - rs[0].origin
        busy += sum(_end(r, ended_at) - r.origin for r in rs)
        for prev, r in itertools.pairwise(rs):
            gap = r.origin - _end(prev, ended_at)
            lag = r.origin - r.intended_at if r.intended_at is not None else gap
            refill += min(max(lag, 0.0), max(gap, 0.0))
    # the mean over the clients that sent any of the population (all C in a steady window; a
    # burst smaller than C leaves some idle): with k <= C of them, throughput <= k / mean <= C / mean
    d = span / len(by) if by else 0.0
    idle = max(span - busy, 0.0)
    return {"concurrency": concurrency, "clients_seen": len(by), "span_s": d,
            "busy_share": busy / span if span > 0 else None,
            "refill_share": refill / span if span > 0 else None,
            "backoff_share": max(idle - refill, 0.0) / span if span > 0 else None}


# --- ceilings ------------------------------------------------------------------------------------


def ceilings(pop: Sequence[RequestRecord], *, kind: str, throughput: float, concurrency: int | None,
             rate_per_s: float | None, slots: int | None, limits: Mapping[str, Any] | None) -> dict[str, Any]:
    """What could have bound the run, per :mod:`loadgen.metrics`' definitions, and which one did."""
    n = len(pop)
    mean_model = math.fsum(model_ms(r) for r in pop) / n if n else 0.0
    items: list[dict[str, Any]] = []
    if kind == "closed" and concurrency:
        items.append({"name": "concurrency", "per_s": concurrency / (mean_model / 1000) if mean_model > 0 else None,
                      "concurrency": concurrency, "mean_model_ms": mean_model})
    if kind == "open" and rate_per_s:
        items.append({"name": "offered", "per_s": rate_per_s})
    rl = rate_limit_ceiling(pop, limits=limits)
    if rl is not None:
        items.append(rl)
    if slots:
        # a batch-lane answer is the batch runner's, not a worker slot's: its call time holds no slot
        batch_ms = math.fsum(c.latency_ms for r in pop for c in r.calls if c.batch and c.latency_ms is not None)
        slot_model = (mean_model - batch_ms / n) if batch_ms and n else mean_model
        items.append({"name": "worker slots", "slots": slots, "mean_model_ms": slot_model,
                      "per_s": slots / (slot_model / 1000) if slot_model > 0 else None,
                      **({"batch_calls_excluded": True} if batch_ms else {})})
    for it in items:
        it["ratio"] = throughput / it["per_s"] if it.get("per_s") else None
    known = [it for it in items if it.get("per_s")]
    binding = min(known, key=lambda it: it["per_s"]) if known else None
    return {"items": items, "binding": binding["name"] if binding else None,
            "binding_per_s": binding["per_s"] if binding else None,
            "efficiency": throughput / binding["per_s"] if binding else None,
            "rate_limits": _limits_state(limits)}


def _limits_state(limits: Mapping[str, Any] | None) -> dict[str, Any]:
    if not limits:
        return {"enforced": False, "why": "unknown: no catalog known for this fleet"}
    return {"enforced": bool(limits.get("enforced")), "why": limits.get("why"), "source": limits.get("source")}


def rate_limit_ceiling(pop: Sequence[RequestRecord], *, limits: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Fleet-wide RPM/TPM of each tier the population's calls used, turned into requests/s (the
    interactive calls: the batch lane's answers do not pass the fleet's limiter)."""
    if not limits or not limits.get("enforced") or not pop:
        return None
    per_s = limits["utilisation"] / limits["window_s"]
    n = len(pop)
    calls: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for r in pop:
        for c in r.calls:
            if c.batch:  # a batch-lane answer: the provider's batch API, not the fleet's limiter
                continue
            calls[c.tier] += 1
            tokens[c.tier] += c.input_tokens + c.output_tokens
    tiers = []
    for tier in sorted(calls):
        lim = limits["tiers"].get(tier)
        if lim is None:
            continue
        by_rpm = lim["rpm"] * per_s * n / calls[tier]
        by_tpm = lim["tpm"] * per_s * n / tokens[tier] if tokens[tier] else None
        tiers.append({"tier": tier, "rpm": lim["rpm"], "tpm": lim["tpm"], "calls_per_request": calls[tier] / n,
                      "tokens_per_request": tokens[tier] / n, "by_rpm_per_s": by_rpm, "by_tpm_per_s": by_tpm,
                      "per_s": min(x for x in (by_rpm, by_tpm) if x is not None)})
    if not tiers:
        return None
    low = min(tiers, key=lambda t: t["per_s"])
    return {"name": "rate limits", "per_s": low["per_s"], "tier": low["tier"], "tiers": tiers,
            "utilisation": limits["utilisation"], "window_s": limits["window_s"]}


# --- validity ------------------------------------------------------------------------------------


def validity(*, kind: str, count_bounded: bool, window_s: float, pop: Sequence[RequestRecord], e2e: Mapping[str, Any],
             send_lag: Mapping[str, Any], clients: Mapping[str, Any] | None,
             max_send_lag_p99_ms: float) -> list[str]:
    """Why the run does not count (empty: it is valid). A run earns "valid" when it completed at
    least one request, had a steady window of at least MIN_STEADY_WINDOW_S and its mean
    response time (duration-bounded runs), and its generator kept up: an open loop's p99 send
    lag within ``max_send_lag_p99_ms``; a closed loop's clients waiting for the generator at most
    MAX_REFILL_SHARE of their time. The runner adds: stopped early; a mechanism the scenario
    exists for did not act."""
    out = []
    if not any(r.status == RequestStatus.SUCCEEDED for r in pop):
        out.append("no request completed successfully" if pop else "no request was sent")
    if not count_bounded:
        if window_s < MIN_STEADY_WINDOW_S:
            out.append(f"steady window {window_s:.2f} s is shorter than the {MIN_STEADY_WINDOW_S:g} s minimum")
        elif e2e.get("avg") is not None and window_s * 1000 < e2e["avg"]:
            out.append(f"steady window {window_s:.2f} s is shorter than the mean response time "
                       f"{e2e['avg'] / 1000:.2f} s")
    if kind == "open":
        p99 = send_lag.get("p99") if send_lag.get("p99") is not None else send_lag.get("max")
        if send_lag.get("count") and p99 is not None and p99 > max_send_lag_p99_ms:
            out.append(f"generator fell behind: p99 send lag {p99:.1f} ms > {max_send_lag_p99_ms:g} ms")
    if kind == "closed" and clients and (clients.get("refill_share") or 0) > MAX_REFILL_SHARE:
        out.append(f"generator fell behind: clients waited {clients['refill_share']:.1%} of their time for it to send "
                   f"their next request (> {MAX_REFILL_SHARE:.0%})")
    return out


# --- everything ----------------------------------------------------------------------------------


def compute(
    records: Sequence[RequestRecord], *, kind: str, window: tuple[float, float], started_at: float,
    load_end: float, ended_at: float, concurrency: int | None = None, rate_per_s: float | None = None,
    max_send_lag_p99_ms: float = DEFAULT_MAX_SEND_LAG_P99_MS, count_bounded: bool = False,
    slots: int | None = None, limits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    w0, w1 = window
    pop, pop_info = population(records, window=window, count_bounded=count_bounded, started_at=started_at,
                               load_end=load_end)
    n = len(pop)
    done = [r for r in pop if r.done_at is not None]
    clients = None
    if kind == "closed" and concurrency:
        clients = closed_loop_clients(pop, concurrency=concurrency, ended_at=ended_at)
        span = clients["span_s"]
    else:
        span = pop_info["end"] - pop_info["start"]
    thr = len(done) / span if span > 0 else 0.0
    ok_thr = sum(1 for r in done if r.status == RequestStatus.SUCCEEDED) / span if span > 0 else 0.0
    e2e = latency_summary(response_ms(r, ended_at) for r in pop)
    services = [s for s in (service_ms(r) for r in pop) if s is not None]
    lat = {
        "e2e": e2e,
        "e2e_succeeded": latency_summary(response_ms(r, ended_at) for r in pop if r.status == RequestStatus.SUCCEEDED),
        "queue_wait": latency_summary((r.started_at - r.submitted_at) * 1000 for r in pop
                                      if r.started_at is not None and r.submitted_at is not None),
        "ratelimit_wait": latency_summary(r.ratelimit_wait_ms for r in pop if r.api_calls),
        "service": latency_summary(services),
        "model_call": latency_summary(model_ms(r) for r in pop),
    }
    if clients is not None:
        clients["ceiling_per_s"] = concurrency / (e2e["avg"] / 1000) if e2e["avg"] else None
        clients["ratio"] = thr / clients["ceiling_per_s"] if clients["ceiling_per_s"] else None
    send_lag = latency_summary(max(0.0, r.sent_at - r.intended_at) * 1000 for r in pop
                               if r.sent_at is not None and r.intended_at is not None)
    window_s = w1 - w0
    invalid = validity(kind=kind, count_bounded=count_bounded, window_s=window_s, pop=pop, e2e=e2e,
                       send_lag=send_lag, clients=clients, max_send_lag_p99_ms=max_send_lag_p99_ms)
    return {
        "kind": kind,
        "count_bounded": count_bounded,
        "population": {**pop_info, "requests": n, "span_s": span},
        "window": {"start": w0, "end": w1, "duration_s": window_s, "warmup_s": w0 - started_at,
                   "drain_s": ended_at - load_end},
        "requests": {"run": _counts([r for r in records if r.sampled]), "window": _counts(pop)},
        "throughput": {"completions_per_s": thr, "successes_per_s": ok_thr, "completions": len(done),
                       "span_s": span, "offered_per_s": rate_per_s},
        "clients": clients,
        "ceilings": ceilings(pop, kind=kind, throughput=thr, concurrency=concurrency, rate_per_s=rate_per_s,
                             slots=slots, limits=limits),
        "latency_ms": lat,
        "send_lag_ms": send_lag,
        "valid": not invalid,
        "invalid_reasons": invalid,
        "retries": _retries(pop),
        "rate_limit": _rate_limit(pop),
        "by_priority": _breakdown(pop, key=lambda r: r.priority, span=span, ended_at=ended_at),
        "by_tenant": _breakdown(pop, key=lambda r: r.tenant, span=span, ended_at=ended_at),
        "priority_held": _contended(priority_held(pop, ended_at=ended_at), lat),
        "fallbacks": _fallbacks(pop),
        "cost": _cost(pop),
        "cost_run": _cost(records),
        "workers": _workers(pop),
        "notes": [],
    }


def _counts(rs: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = sum(1 for r in rs if r.status == RequestStatus.SUCCEEDED)
    failed = [r for r in rs if r.status == RequestStatus.FAILED]
    unfinished = sum(1 for r in rs if r.status == UNFINISHED)
    bad = [r for r in rs if r.status != RequestStatus.SUCCEEDED]
    return {"total": len(rs), "succeeded": ok, "failed": len(failed), "unfinished": unfinished,
            "error_rate": len(bad) / len(rs) if rs else 0.0,
            "failures_by_reason": dict(Counter(r.reason or "unknown" for r in bad).most_common())}


def _retries(records: Sequence[RequestRecord]) -> dict[str, Any]:
    calls = sum(r.api_calls for r in records)
    retried = [r for r in records if r.api_calls > 1]
    return {"api_calls": calls, "retries": sum(r.api_calls - 1 for r in retried), "requests_retried": len(retried),
            "requests_recovered": sum(1 for r in retried if r.status == RequestStatus.SUCCEEDED)}


def _breakdown(pop: Sequence[RequestRecord], *, key, span: float, ended_at: float) -> dict[str, Any]:
    """Per value of ``key`` (a priority, a tenant) over the same population: completions, their
    share of the span's throughput, and end-to-end latency. Empty when the population has one value."""
    groups: dict[Any, list[RequestRecord]] = {}
    for r in pop:
        groups.setdefault(key(r), []).append(r)
    if len(groups) < 2:
        return {}
    out = {}
    for k, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        done = [r for r in rs if r.done_at is not None]
        out[str(k)] = {"requests": len(rs), "completions": len(done),
                       "succeeded": sum(1 for r in done if r.status == RequestStatus.SUCCEEDED),
                       "completions_per_s": len(done) / span if span > 0 else 0.0,
                       "e2e": latency_summary(response_ms(r, ended_at) for r in rs)}
    return out


def priority_held(pop: Sequence[RequestRecord], *, ended_at: float) -> dict[str, Any] | None:
    """Highest against lowest priority of the population: their median end-to-end and whether the
    higher one was served faster (None: one priority only, or too few of either)."""
    prios = sorted({r.priority for r in pop if r.priority is not None})
    if len(prios) < 2:
        return None
    lo, hi = prios[0], prios[-1]
    p50 = {}
    for p in (lo, hi):
        p50[p] = latency_summary(response_ms(r, ended_at) for r in pop if r.priority == p)["p50"]
    if p50[lo] is None or p50[hi] is None:
        return None
    return {"high": hi, "low": lo, "high_p50_ms": p50[hi], "low_p50_ms": p50[lo], "held": p50[hi] < p50[lo]}


#: Priority is put to the test only when requests spent at least this share of their response time
#: waiting for a place (queue wait + rate-limit wait): with less, their order cannot matter and a
#: gap between the priorities' medians is the model calls' spread.
CONTENTION_SHARE = 0.10


def _contended(held: dict[str, Any] | None, lat: dict[str, Any]) -> dict[str, Any] | None:
    if held is None:
        return None
    wait = (lat["queue_wait"]["avg"] or 0.0) + (lat["ratelimit_wait"]["avg"] or 0.0)
    share = wait / lat["e2e"]["avg"] if lat["e2e"]["avg"] else 0.0
    return {**held, "wait_ms": wait, "wait_share": share, "contended": share >= CONTENTION_SHARE}


def _rate_limit(records: Sequence[RequestRecord]) -> dict[str, Any]:
    waited = [r for r in records if r.calls_waited > 0]
    return {"requests_waited": len(waited), "calls_waited": sum(r.calls_waited for r in waited),
            "total_wait_ms": math.fsum(r.ratelimit_wait_ms for r in records),
            "per_waiting_request_ms": latency_summary(r.ratelimit_wait_ms for r in waited)}


def _fallbacks(records: Sequence[RequestRecord]) -> dict[str, Any]:
    pairs = Counter(f"{r.tier_requested}->{r.tier_used}" for r in records
                    if r.tier_used and r.tier_requested and r.tier_used != r.tier_requested)
    finished = sum(1 for r in records if r.tier_used)
    n = sum(pairs.values())
    return {"count": n, "rate": n / finished if finished else 0.0, "pairs": dict(pairs)}


def _cost(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The bill, from the api_calls (one row per attempt): per tier called, with the attempts
    of unknown outcome on terminal requests (see :data:`loadgen.records.UNKNOWN_OUTCOMES`) apart."""
    by: dict[str, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "input_tokens": 0, "output_tokens": 0,
                                                         "cache_write_tokens": 0, "cache_read_tokens": 0,
                                                         "cost_usd": Decimal(0), "unknown_calls": 0,
                                                         "unknown_cost_usd": Decimal(0)})
    rows_total = Decimal(0)
    for r in records:
        rows_total += r.cost_usd
        unknown = {id(c) for c in unknown_outcome(r.calls, status=r.status)}
        for c in r.calls:
            b = by[c.tier]
            b["calls"] += 1
            b["input_tokens"] += c.input_tokens
            b["output_tokens"] += c.output_tokens
            b["cache_write_tokens"] += c.cache_write_tokens
            b["cache_read_tokens"] += c.cache_read_tokens
            b["cost_usd"] += c.cost_usd
            if id(c) in unknown:
                b["unknown_calls"] += 1
                b["unknown_cost_usd"] += c.cost_usd
    total = sum((b["cost_usd"] for b in by.values()), Decimal(0))
    n = len(records)
    tin = sum(b["input_tokens"] for b in by.values())
    tout = sum(b["output_tokens"] for b in by.values())
    unknown_calls = sum(b["unknown_calls"] for b in by.values())
    unknown_cost = sum((b["unknown_cost_usd"] for b in by.values()), Decimal(0))
    tiers = {t: {**b, "cost_usd": str(b["cost_usd"]), "unknown_cost_usd": str(b["unknown_cost_usd"])}
             for t, b in sorted(by.items())}
    return {"total_usd": str(total), "requests": n, "per_request_usd": float(total / n) if n else None,
            "input_tokens": tin, "output_tokens": tout, "tokens_per_request": (tin + tout) / n if n else None,
            "unknown_outcome_calls": unknown_calls, "unknown_outcome_usd": str(unknown_cost),
            "request_rows_usd": str(rows_total), "by_tier": tiers}


def _workers(records: Sequence[RequestRecord]) -> dict[str, Any]:
    c = Counter(r.worker for r in records if r.worker)
    n = sum(c.values())
    if not n:
        return {"count": 0, "share": {}, "jain_index": None, "max_share": None, "min_share": None}
    xs = list(c.values())
    return {"count": len(c), "share": {w: k / n for w, k in sorted(c.items())}, "requests": dict(sorted(c.items())),
            "jain_index": sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)),
            "max_share": max(xs) / n, "min_share": min(xs) / n}
