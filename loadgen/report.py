"""The Markdown report (the seed's layout, every number measured) and the JSON of every aggregate.

Every table says which requests it covers (its *population*), and every figure in it is
computed over those requests only (see :mod:`loadgen.metrics`). Analysis bullets restate or
combine table figures; each one states a measured relation and only the sentences the data
support appear.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from loadgen.fmt import DASH, mib, ms, num, pct, percentile, rate, usd
from loadgen.runner import ScenarioResult, Session, StepResult

REPORT_MD = "report.md"
REPORT_JSON = "report.json"

CEILING_TEXT = {"concurrency": "concurrency", "offered": "offered rate", "rate limits": "rate limits",
                "worker slots": "worker slots"}


# --- JSON ------------------------------------------------------------------------------------------


def session_json(session: Session) -> dict[str, Any]:
    return {
        "session": session.id, "started_at": session.started_at, "finished_at": session.finished_at,
        "environment": session.environment,
        "scenarios": [{
            "name": r.scenario.name, "title": r.scenario.title, "config": r.scenario.config(), "sweep": r.sweep,
            "not_exercised": r.not_exercised,
            "runs": [{"run_id": s.run_id, "label": s.label, "level": s.level, "config": s.config, "drive": s.drive,
                      "aggregates": s.aggregates, "records_file": f"requests-{s.run_id}.jsonl",
                      "samples_file": f"samples-{s.run_id}.jsonl"} for s in r.steps],
        } for r in session.scenarios],
    }


def all_steps(session: Session) -> list[StepResult]:
    return [s for r in session.scenarios for s in r.steps]


# --- shared phrases --------------------------------------------------------------------------------


def population_caption(step: StepResult) -> str:
    a = step.aggregates
    p, run = a["population"], a["requests"]["run"]
    t0 = step.drive["started_at"]
    where = (f"sent in the steady window, {p['start'] - t0:.1f}-{p['end'] - t0:.1f} s after the start "
             f"({p['end'] - p['start']:.1f} s)" if p["name"] == "steady window" else p["description"])
    n = p["requests"]
    out = f"*Population: the {n} request{'s' if n != 1 else ''} {where}"
    if p["name"] == "steady window":
        out += (f"; the run sent {run['total']}, and the {run['total'] - n} outside the window (warm-up, drain) "
                "are in no figure of this table")
    return out + ".*"


def bound_phrase(a: dict[str, Any]) -> str:
    c = a.get("ceilings") or {}
    if not c.get("binding"):
        return DASH
    return f"{CEILING_TEXT[c['binding']]} — {rate(c['binding_per_s'])}, achieved {pct(c['efficiency'])}"


def _ceiling_how(it: dict[str, Any]) -> str:
    if it["name"] == "concurrency":
        return f"C ÷ mean model time = {it['concurrency']} ÷ {ms(it['mean_model_ms'])}"
    if it["name"] == "offered":
        return "the schedule's arrival rate"
    if it["name"] == "worker slots":
        return (f"slots ÷ mean model time = {it['slots']:,} ÷ {ms(it['mean_model_ms'])}"
                + (" (worker calls only: batch-lane answers hold no slot)" if it.get("batch_calls_excluded") else ""))
    parts = []
    for t in it["tiers"]:
        parts.append(f"{t['tier']}: {t['rpm']:,} rpm, {t['tpm']:,} tpm at {t['calls_per_request']:.2f} calls and "
                     f"{t['tokens_per_request']:,.0f} tokens per request")
    return "; ".join(parts) + f" (x {it['utilisation']:g} utilisation, per {it['window_s']:g} s)"


# --- tables ----------------------------------------------------------------------------------------


def results_table(step: StepResult) -> list[str]:
    a = step.aggregates
    win = a["requests"]["window"]
    lat = a["latency_ms"]
    e2e, wait, rlw, svc, mc = lat["e2e"], lat["queue_wait"], lat["ratelimit_wait"], lat["service"], lat["model_call"]
    n = win["total"]
    c = a["cost"]
    thr = a["throughput"]

    def share(k: int) -> str:
        return pct(k / n if n else None)

    rows = [
        ("Requests", f"{n}"),
        ("Successful", f"{win['succeeded']} ({share(win['succeeded'])})"),
        ("Failed", f"{win['failed']} ({share(win['failed'])})"
         + (f" — {', '.join(f'{k}: {v}' for k, v in win['failures_by_reason'].items() if k != 'unfinished')}"
            if win["failed"] else "")),
        ("Unfinished", f"{win['unfinished']} ({share(win['unfinished'])})"),
        ("Avg Response Time", ms(e2e["avg"])),
        ("p50 Response Time", percentile(e2e, "p50")),
        ("p95 Response Time", percentile(e2e, "p95")),
        ("p99 Response Time", percentile(e2e, "p99")),
        ("Max Response Time", ms(e2e["max"])),
        ("Queue Wait (avg / p99)", f"{ms(wait['avg'])} / {percentile(wait, 'p99', reason=False)}"),
        ("Rate-Limit Wait (avg / p99)", f"{ms(rlw['avg'])} / {percentile(rlw, 'p99', reason=False)}"),
        ("Service Time excl. Rate-Limit Waits (avg / p99)",
         f"{ms(svc['avg'])} / {percentile(svc, 'p99', reason=False)}"),
        ("Model Call Time (avg / p99)", f"{ms(mc['avg'])} / {percentile(mc, 'p99', reason=False)}"),
    ]
    if a["kind"] == "closed" and a.get("clients"):
        cl = a["clients"]
        rows.append(("Throughput", f"{rate(thr['completions_per_s'])} ({thr['completions']} completions ÷ "
                                   f"{thr['span_s']:.2f} s, the clients' mean span)"))
        idle = 1 - cl["busy_share"] if cl["busy_share"] is not None else None
        rows.append(("C ÷ Avg Response Time", f"{rate(cl['ceiling_per_s'])} — throughput is {pct(cl['ratio'])} of it; "
                                              f"clients idle {pct(idle)} (refill {pct(cl['refill_share'])}, "
                                              f"backoff {pct(cl['backoff_share'])})"))
    else:
        rows.append(("Throughput", f"{rate(thr['completions_per_s'])} ({thr['completions']} completions ÷ "
                                   f"{thr['span_s']:.2f} s)"))
    if a["kind"] == "open":
        sl = a["send_lag_ms"]
        rows.append(("Offered Rate", rate(thr["offered_per_s"])))
        rows.append(("Send Lag (p50 / p99 / max)",
                     f"{percentile(sl, 'p50', reason=False)} / {percentile(sl, 'p99', reason=False)} / "
                     f"{ms(sl['max'], digits=1)}"))
    rl = a["rate_limit"]
    rows += [
        ("Bound by", bound_phrase(a)),
        ("Error Rate", pct(win["error_rate"], digits=2)),
        ("Retries", f"{a['retries']['retries']} over {a['retries']['api_calls']} API calls"),
        ("Rate-Limited Requests",
         f"{rl['requests_waited']} of {n} waited, {rl['total_wait_ms'] / 1000:,.1f} s in total"),
        ("Attempts with Unknown Outcome", f"{c['unknown_outcome_calls']} ({usd(c['unknown_outcome_usd'])}, billed, "
                                          "outcome unknown)"),
        ("Fallbacks", f"{a['fallbacks']['count']} ({pct(a['fallbacks']['rate'])})"),
        ("Tokens per Request", num(c["tokens_per_request"])),
        ("Cost", f"{usd(c['total_usd'])} total, {usd(c['per_request_usd'], digits=5)} per request"),
        ("Cost by Tier", ", ".join(f"{t} {usd(b['cost_usd'])} ({b['calls']} calls)" for t, b in c["by_tier"].items())
         or DASH),
    ]
    w = a["workers"]
    if w["count"]:
        rows.append(("Workers Used", f"{w['count']} (Jain index {w['jain_index']:.3f})"))
    return ["| Metric | Value |", "|--------|-------|"] + [f"| **{k}** | {v} |" for k, v in rows]


def ceilings_table(step: StepResult) -> list[str]:
    a = step.aggregates
    c = a.get("ceilings") or {}
    out = ["| Ceiling | How | Value | Throughput ÷ Ceiling |", "|---|---|---|---|"]
    names = {it["name"] for it in c.get("items", [])}
    for it in c.get("items", []):
        out.append(f"| {CEILING_TEXT[it['name']]} | {_ceiling_how(it)} | {rate(it.get('per_s'))} | "
                   f"{pct(it.get('ratio'))} |")
    if "rate limits" not in names:
        state = c.get("rate_limits") or {}
        why = state.get("why") or "no call was made"
        out.append(f"| rate limits | not a ceiling here: {why} | {DASH} | {DASH} |")
    if "worker slots" not in names:
        out.append(f"| worker slots | unknown for this fleet | {DASH} | {DASH} |")
    out.append(f"| **binding** | **{CEILING_TEXT.get(c.get('binding'), DASH)}** | **{rate(c.get('binding_per_s'))}** | "
               f"**{pct(c.get('efficiency'))}** |")
    return out


def resources_table(step: StepResult) -> list[str]:
    res = step.aggregates.get("resources") or {}
    if not res.get("sampled"):
        return ["*Resources: not sampled (no worker process reachable from this host).*"]
    growth = DASH if res["growth_mib_per_min"] is None else f"{res['growth_mib_per_min']:+.2f} MiB/min"
    if res.get("growth_ci95_mib_per_min"):
        lo, hi = res["growth_ci95_mib_per_min"]
        growth += f" (95% CI {lo:+.2f} to {hi:+.2f}, over {res['steady_span_s']:.0f} s)"
    return [f"*Resources of {res['processes']}: {res['samples']} samples over the whole run.*", "",
            "| Metric | Value |", "|--------|-------|",
            f"| **Peak Memory (RSS)** | {mib(res['rss_peak_mib'])} |",
            f"| **Average Memory (RSS)** | {mib(res['rss_avg_mib'])} |",
            f"| **Memory Growth after Warm-up** | {growth} |",
            f"| **Leak Indicator** | {res['leak']} (threshold {res['leak_threshold_mib_per_min']:g} MiB/min) |",
            f"| **CPU (avg / peak)** | {res['cpu_avg_percent']:.0f}% / {res['cpu_peak_percent']:.0f}% "
            "(100% = one core) |"]


def configuration(step: StepResult, *, sweep: bool = False) -> list[str]:
    cfg, d = step.config, step.drive
    out = []
    if d["kind"] == "closed":
        out.append(f"- Driver: closed loop, {d['concurrency']} requests in flight" if d.get("concurrency") else
                   f"- Driver: jobs in a closed loop, {d.get('jobs_concurrency')} jobs in flight")
    else:
        out.append(f"- Driver: open loop, {cfg['arrival']} arrivals at {cfg['rate_per_s']:g} req/s "
                   f"(seed {cfg['seed']})")
    bound = f"{cfg['count']} requests" if cfg.get("count") is not None else f"{cfg['duration_s']:g} s"
    if cfg.get("job_template"):
        bound = f"{cfg['count']} jobs of {cfg['job_template']}"
    if sweep:
        out.append(f"- Bound per level: {bound}; a warm-up of {cfg['warmup_s']:g} s (closed loop: and until every "
                   "slot has completed once) and the drain are excluded from each level's steady window")
    else:
        out.append(f"- Bound: {bound}; warm-up {d['window'][0] - d['started_at']:.1f} s and drain "
                   f"{d['ended_at'] - d['load_end']:.1f} s excluded (steady window "
                   f"{d['window'][1] - d['window'][0]:.1f} s)")
    roles = ", ".join(f"{r} {w:.0%}" for r, w in cfg["roles"].items())
    out.append(f"- Request mix: {roles}" if not cfg.get("job_template") else
               f"- Request mix: the template's steps (roles from config/jobs.toml); {cfg.get('reject_share', 0):.0%} "
               "of the jobs get one rejection from their validator")
    out.append(f"- Fleet: {cfg['fleet']}")
    rl = cfg.get("rate_limits") or {}
    if rl.get("enforced"):
        out.append("- Rate limits: " + ", ".join(f"{t} {v['rpm']:,} rpm / {v['tpm']:,} tpm" for t, v in
                                                  rl["tiers"].items()) + f" ({rl['source']})")
    elif rl:
        out.append(f"- Rate limits: not enforced — {rl.get('why')}")
    out.append(f"- Run id: `{step.run_id}`")
    return out


def sweep_table(result: ScenarioResult) -> list[str]:
    axis = result.sweep["axis"] if result.sweep else "level"
    head = (f"| {axis.capitalize()} | Requests | Throughput | Avg Response | p50 | p95 | p99 | Success Rate | "
            "Bound by | Efficiency | Valid |")
    out = [head, "|" + "---|" * 11]
    for s in result.steps:
        a = s.aggregates
        e = a["latency_ms"]["e2e"]
        w = a["requests"]["window"]
        c = a.get("ceilings") or {}
        out.append(f"| {s.level:g} | {w['total']} | {rate(a['throughput']['completions_per_s'])} | {ms(e['avg'])} | "
                   f"{percentile(e, 'p50', reason=False)} | {percentile(e, 'p95', reason=False)} | "
                   f"{percentile(e, 'p99', reason=False)} | {pct(1 - w['error_rate'] if w['total'] else None)} | "
                   f"{CEILING_TEXT.get(c.get('binding'), DASH)} | {pct(c.get('efficiency'))} | "
                   f"{'yes' if a['valid'] else 'NO'} |")
    return out


def sweep_findings(result: ScenarioResult) -> list[str]:
    sw = result.sweep or {}
    out = []
    if sw.get("knee") is not None:
        if sw.get("broke_at") is not None:
            out.append(f"Knee at {sw['axis']} = {sw['knee']:g}: the next level ({sw['broke_at']:g}) broke — "
                       + "; ".join(sw["why"]) + ".")
        else:
            out.append(f"No knee within the levels run: every level up to {sw['knee']:g} stayed healthy.")
    elif sw.get("broke_at") is not None:
        out.append(f"Already the lightest level ({sw['broke_at']:g}) was unhealthy: " + "; ".join(sw["why"]) + ".")
    if sw.get("stopped"):
        out.append(f"Sweep stopped at over-saturation ({sw['stopped']['why']}); not run: "
                   + ", ".join(f"{x:g}" for x in sw["stopped"]["not_run"]) + ".")
    steps = result.steps
    if len(steps) > 1 and sw.get("axis") == "workers":
        base = steps[0].aggregates["throughput"]["completions_per_s"]
        for s in steps[1:]:
            t = s.aggregates["throughput"]["completions_per_s"]
            f = s.level / steps[0].level
            if base > 0:
                out.append(f"{s.level:g} worker processes: {t / base:.2f}x the throughput of {steps[0].level:g} "
                           f"({t / base / f:.0%} scaling efficiency).")
    if len(steps) > 1 and sw.get("axis") == "concurrency":
        best = max(steps, key=lambda s: s.aggregates["throughput"]["completions_per_s"])
        out.append(f"Highest throughput {rate(best.aggregates['throughput']['completions_per_s'])} at "
                   f"concurrency {best.level:g}.")
    withheld = sorted({k for s in steps for k in s.aggregates["latency_ms"]["e2e"]["withheld"]})
    if withheld:
        out.append("A — in the table: fewer samples than the percentile needs (p50: 2, p95: 20, p99: 100); "
                   f"withheld at some level: {', '.join(withheld)}.")
    return out


def scaling_table(result: ScenarioResult) -> list[str]:
    out = ["| Worker Processes | Concurrency | Requests | Throughput | Efficiency | p99 | Cost/Request | Bound by | "
           "Valid |", "|" + "---|" * 9]
    base = result.steps[0].aggregates["throughput"]["completions_per_s"] if result.steps else 0
    n0 = result.steps[0].level or 1 if result.steps else 1
    for s in result.steps:
        a = s.aggregates
        t = a["throughput"]["completions_per_s"]
        eff = t / (base * (s.level or 1) / n0) if base else None
        c = a.get("ceilings") or {}
        out.append(f"| {s.level:g} | {s.drive['concurrency']} | {a['requests']['window']['total']} | {rate(t)} | "
                   f"{pct(eff, digits=0)} | {percentile(a['latency_ms']['e2e'], 'p99', reason=False)} | "
                   f"{usd(a['cost']['per_request_usd'], digits=5)} | {CEILING_TEXT.get(c.get('binding'), DASH)} | "
                   f"{'yes' if a['valid'] else 'NO'} |")
    return out


def cost_by_tier(steps: Sequence[StepResult]) -> list[str]:
    """Every API call of every request of every run (warm-up and drain included: a provider bills them)."""
    tiers: dict[str, dict[str, Any]] = {}
    for s in steps:
        for t, b in s.aggregates["cost_run"]["by_tier"].items():
            acc = tiers.setdefault(t, {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cache_write_tokens": 0,
                                       "cache_read_tokens": 0, "cost": Decimal(0), "unknown_calls": 0,
                                       "unknown_cost": Decimal(0)})
            acc["calls"] += b["calls"]
            for k in ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens"):
                acc[k] += b.get(k, 0)
            acc["cost"] += Decimal(b["cost_usd"])
            acc["unknown_calls"] += b["unknown_calls"]
            acc["unknown_cost"] += Decimal(b["unknown_cost_usd"])
    out = ["| Tier | API Calls | Input Tokens | Output Tokens | Cost | Cost/Call | $/M tokens | "
           "Unknown-Outcome Attempts | Cache-Write Tokens | Cache-Read Tokens |", "|" + "---|" * 10]
    total = {"calls": 0, "cost": Decimal(0), "unknown_calls": 0, "unknown_cost": Decimal(0)}
    for t, b in sorted(tiers.items()):
        tok = b["input_tokens"] + b["cache_write_tokens"] + b["cache_read_tokens"] + b["output_tokens"]
        out.append(f"| {t} | {b['calls']:,} | {b['input_tokens']:,} | {b['output_tokens']:,} | {usd(b['cost'])} | "
                   f"{usd(b['cost'] / b['calls'] if b['calls'] else None, digits=5)} | "
                   f"{usd(b['cost'] / tok * 1_000_000 if tok else None, digits=2)} | "
                   f"{b['unknown_calls']} ({usd(b['unknown_cost'])}) | {b['cache_write_tokens']:,} | "
                   f"{b['cache_read_tokens']:,} |")
        for k in total:
            total[k] += b[k]
    out.append(f"| **all** | **{total['calls']:,}** | | | **{usd(total['cost'])}** | | | "
               f"**{total['unknown_calls']} ({usd(total['unknown_cost'])})** | | |")
    return out


# --- analysis --------------------------------------------------------------------------------------


def decomposition(step: StepResult) -> dict[str, Any] | None:
    """Mean response time of the population's requests that ran, split into where it went."""
    ran = [r for r in step.records if r.started_at is not None and r.finished_at is not None and r.done_at is not None
           and r.submitted_at is not None and r.status != "unfinished"]
    pop = step.aggregates["population"]
    if pop["name"] == "steady window":
        ran = [r for r in ran if pop["start"] <= r.origin < pop["end"] and r.sampled]
    else:
        ran = [r for r in ran if r.sampled]
    if not ran:
        return None
    n = len(ran)
    e2e = math.fsum((r.done_at - r.origin) * 1000 for r in ran) / n
    queue = math.fsum((r.started_at - r.submitted_at) * 1000 for r in ran) / n
    rlw = math.fsum(r.ratelimit_wait_ms for r in ran) / n
    model = math.fsum(r.model_ms or 0.0 for r in ran) / n
    worker = math.fsum((r.finished_at - r.started_at) * 1000 - r.ratelimit_wait_ms - (r.model_ms or 0.0)
                       for r in ran) / n
    return {"n": n, "e2e": e2e, "queue": queue, "ratelimit": rlw, "model": model, "worker": worker,
            "delivery": e2e - queue - rlw - model - worker}


def analyse_step(step: StepResult, *, previous: StepResult | None = None) -> list[str]:
    a = step.aggregates
    lat = a["latency_ms"]
    e2e = lat["e2e"]
    win = a["requests"]["window"]
    out: list[str] = []
    thr = a["throughput"]["completions_per_s"]
    c = a.get("ceilings") or {}
    if c.get("binding"):
        ties = [CEILING_TEXT[it["name"]] for it in c["items"] if it["name"] != c["binding"] and it.get("per_s")
                and math.isclose(it["per_s"], c["binding_per_s"], rel_tol=1e-9)]
        line = (f"Throughput {rate(thr)} is {pct(c['efficiency'])} of the binding ceiling, "
                f"{CEILING_TEXT[c['binding']]} ({rate(c['binding_per_s'])}"
                + (f"; {' and '.join(ties)} the same" if ties else "") + ").")
        if c["efficiency"] is not None and c["efficiency"] < 0.8:
            line += (" No named ceiling explains the gap: the fleet's own work around the model calls (queueing, "
                     "delivery, commits, notices) or the machine held it back.")
        out.append(line)
    d = decomposition(step)
    if d:
        out.append(f"Where the {ms(d['e2e'])} average response time of the {d['n']} requests that ran went: "
                   f"{ms(d['queue'], digits=1)} queue wait, {ms(d['ratelimit'], digits=1)} rate-limit wait, "
                   f"{ms(d['model'], digits=1)} model calls, {ms(d['worker'], digits=1)} the worker's own work "
                   f"(breaker, limiter, attempt rows, backoff between retries) and {ms(d['delivery'], digits=1)} "
                   "delivery (submit, broker, commit, notice).")
    if a["kind"] == "open":
        offered = a["throughput"]["offered_per_s"]
        if offered:
            out.append(f"Offered {rate(offered)} on a schedule fixed in advance; {rate(thr)} completed "
                       f"({pct(thr / offered)} of offered). Latency is measured from the intended send time, so any "
                       "send lag is inside the latency figures too.")
    withheld = e2e.get("withheld") or {}
    if withheld:
        out.append("Withheld percentiles (shown as —): " + "; ".join(f"{k}: {v}" for k, v in withheld.items())
                   + ". A longer run (--duration) gives tail figures.")
    if win["failed"] or win["unfinished"]:
        reasons = ", ".join(f"{k} {v}" for k, v in win["failures_by_reason"].items())
        out.append(f"{win['failed'] + win['unfinished']} of {win['total']} requests did not succeed "
                   f"({pct(win['error_rate'], digits=2)}): {reasons}. Their latencies are in the figures above.")
    elif win["total"]:
        out.append(f"No failure among the {win['total']} requests of the population.")
    rl = a["rate_limit"]
    if rl["requests_waited"]:
        rw = lat["ratelimit_wait"]
        line = (f"{rl['requests_waited']} of {win['total']} requests waited for fleet-wide rate-limit capacity, "
                f"{ms(rw['avg'])} per request on average")
        if e2e["avg"]:
            line += f" ({pct(rw['avg'] / e2e['avg'])} of the average response time)"
        out.append(line + "; the waits are shown on their own and are not in the service time.")
    out += _breakdown_lines(a)
    cost = a["cost"]
    if cost["unknown_outcome_calls"]:
        out.append(f"{cost['unknown_outcome_calls']} attempts ended with their outcome unknown (the worker died or "
                   f"never reported): {usd(cost['unknown_outcome_usd'])} of the cost is theirs — billed, outcome "
                   "unknown.")
    fb = a["fallbacks"]
    if fb["count"]:
        pairs = ", ".join(f"{k} {v}" for k, v in fb["pairs"].items())
        out.append(f"{fb['count']} requests ({pct(fb['rate'])}) ran on a fallback tier: {pairs}.")
    w = a["workers"]
    if w["count"] > 1:
        out.append(f"{w['count']} workers served requests; shares {pct(w['min_share'])}-{pct(w['max_share'])} against "
                   f"an even {pct(1 / w['count'])}, Jain fairness index {w['jain_index']:.3f}.")
    res = a.get("resources") or {}
    if res.get("sampled") and res.get("growth_mib_per_min") is not None:
        verdict = {"growing": "growth above the threshold throughout the window — a leak, an unbounded buffer, or "
                              "warm-up allocation that a longer run (memory-5m) would tell apart",
                   "flat": "no growth above the threshold",
                   "inconclusive": "too short, or too noisy, to tell"}[res["leak"]]
        out.append(f"Memory: leak indicator **{res['leak']}** — {verdict}.")
    if cost["requests"] and cost["per_request_usd"] is not None:
        out.append(f"{usd(cost['total_usd'])} for the {cost['requests']} requests of the population: "
                   f"{usd(cost['per_request_usd'], digits=5)} and {num(cost['tokens_per_request'])} tokens per request "
                   "(from their api_calls rows, every attempt).")
    if previous is not None and previous.drive.get("concurrency") and step.drive.get("concurrency"):
        p_thr = previous.aggregates["throughput"]["completions_per_s"]
        if p_thr > 0:
            cr = step.drive["concurrency"] / previous.drive["concurrency"]
            tr = thr / p_thr
            out.append(f"Against {previous.label}: {cr:.1f}x the concurrency gave {tr:.2f}x the throughput "
                       f"(scaling efficiency {tr / cr:.0%}).")
    if not a["valid"]:
        out.append("**Run INVALID:** " + "; ".join(a["invalid_reasons"]) + ".")
    out.extend(n[:1].upper() + n[1:] + ("" if n.endswith(".") else ".") for n in a.get("notes", []))
    return out


# --- document --------------------------------------------------------------------------------------


def _cost_section(step: StepResult) -> list[str]:
    fig = step.aggregates.get("cost_controls")
    if not fig:
        return []
    from loadgen.costcontrols import report_lines

    return report_lines(fig)


def _jobs_section(step: StepResult) -> list[str]:
    fig = step.aggregates.get("jobs")
    if not fig:
        return []
    from loadgen.jobs import report_lines

    return [*report_lines(fig), ""]


def summary_table(session: Session) -> list[str]:
    out = ["| Run | Load | Population | Requests | Throughput | p50 | p99 | Error Rate | Bound by | Efficiency | "
           "Valid |", "|" + "---|" * 11]
    for s in all_steps(session):
        a = s.aggregates
        load = (f"C={s.drive['concurrency']}" if s.drive.get("concurrency") else
                f"{s.drive.get('jobs_concurrency')} jobs" if s.drive.get("jobs_concurrency") else
                f"{s.drive['rate_per_s']:g}/s")
        e = a["latency_ms"]["e2e"]
        c = a.get("ceilings") or {}
        out.append(f"| {s.label} | {load} | {a['population']['name']} | {a['requests']['window']['total']} | "
                   f"{rate(a['throughput']['completions_per_s'])} | {percentile(e, 'p50', reason=False)} | "
                   f"{percentile(e, 'p99', reason=False)} | {pct(a['requests']['window']['error_rate'], digits=2)} | "
                   f"{CEILING_TEXT.get(c.get('binding'), DASH)} | {pct(c.get('efficiency'))} | "
                   f"{'yes' if a['valid'] else 'NO'} |")
    return out


def executive_summary(session: Session) -> list[str]:
    steps = all_steps(session)
    if not steps:
        return ["- No run."]
    out = []
    best = max(steps, key=lambda s: s.aggregates["throughput"]["completions_per_s"])
    out.append(f"- **Peak throughput:** {rate(best.aggregates['throughput']['completions_per_s'])} ({best.label}, "
               f"bound by {CEILING_TEXT.get((best.aggregates.get('ceilings') or {}).get('binding'), DASH)})")
    heavy = max(steps, key=lambda s: s.drive.get("concurrency") or 0)
    he = heavy.aggregates["latency_ms"]["e2e"]
    out.append(f"- **Response time at the highest concurrency run ({heavy.label}):** p50 "
               f"{percentile(he, 'p50', reason=False)}, p99 {percentile(he, 'p99', reason=False)}, max {ms(he['max'])}")
    rates = [1 - s.aggregates["requests"]["window"]["error_rate"] for s in steps
             if s.aggregates["requests"]["window"]["total"]]
    if rates:
        out.append(f"- **Success rate:** {pct(min(rates), digits=2)} to {pct(max(rates), digits=2)} across runs")
    bound = {}
    for s in steps:
        b = (s.aggregates.get("ceilings") or {}).get("binding")
        if b:
            bound.setdefault(CEILING_TEXT[b], []).append(s.label)
    if bound:
        out.append("- **What bound the runs:** " + "; ".join(f"{k} ({len(v)} run{'s' if len(v) > 1 else ''})"
                                                            for k, v in bound.items()))
    mem = [s for s in steps if (s.aggregates.get("resources") or {}).get("sampled")]
    if mem:
        peak = max(mem, key=lambda s: s.aggregates["resources"]["rss_peak_mib"])
        out.append(f"- **Memory:** peak {mib(peak.aggregates['resources']['rss_peak_mib'])} ({peak.label}; "
                   f"{peak.aggregates['resources']['processes']})")
    for r in session.scenarios:
        if r.sweep and r.sweep.get("knee") is not None:
            if r.sweep.get("broke_at") is not None:
                out.append(f"- **Knee ({r.scenario.name}):** {r.sweep['axis']} = {r.sweep['knee']:g}, breaking at "
                           f"{r.sweep['broke_at']:g}")
            else:  # a knee is the last healthy level before one that broke: none broke
                out.append(f"- **Knee ({r.scenario.name}):** none within the levels run — every level up to "
                           f"{r.sweep['axis']} = {r.sweep['knee']:g} stayed healthy")
    invalid = [s for s in steps if not s.aggregates["valid"]]
    if invalid:
        out.append("- **INVALID runs:** " + "; ".join(f"{s.label}: {', '.join(s.aggregates['invalid_reasons'])}"
                                                   for s in invalid))
    missing = [n for r in session.scenarios for n in r.not_exercised]
    if missing:
        out.append(f"- **Not exercised:** {len(missing)} item(s), listed per scenario below")
    return out


METHOD = [
    "- **One population per table.** A run's Results, ceilings and summary-table row are computed over the same "
    "requests, named above each table: a duration-bounded run's *steady-window population* — the requests sent "
    "(closed loop) or scheduled (open loop) between the end of the warm-up and the moment the generator stopped "
    "issuing, followed to their completion — or, for a count-bounded burst, every request of the run. Warm-up and "
    "drain requests are in no figure of those tables (they are in the cost analysis, which covers every call).",
    "- **Latency**: response time = completion - send time (closed loop) or - intended send time (open loop, no "
    "coordinated omission); failed requests included, unfinished ones counted until the drain gave up. Queue wait = "
    "started - submitted; rate-limit wait = the request's `api_calls.ratelimit_wait_ms`; service = finished - "
    "started - rate-limit wait (a wait is never service); model call = its `api_calls.latency_ms`, every attempt.",
    "- **Percentiles** are nearest-rank over the raw values (the p-th is the value of rank ⌈p·n/100⌉): values that "
    "occurred, so p50 ≤ p95 ≤ p99 ≤ max. One needs n ≥ 100/(100-p) samples (p50: 2, p95: 20, p99: 100), else it "
    "is shown as — with the reason.",
    "- **Throughput** (closed loop) = completions ÷ D, D = the clients' mean span from their first request of the "
    "population to its last completion. A client's requests never overlap, so **throughput ≤ C ÷ average response "
    "time holds exactly**; the gap is the clients' idle time (the generator refilling, backoff after a refusal), "
    "and a run whose clients waited more than 5% of their time for the generator is invalid. Open loop: "
    "completions ÷ the steady window.",
    "- **Ceilings** (what could bind, from the same population): concurrency = C ÷ mean model time (closed loop) "
    "or the offered rate (open loop); the fleet-wide rate limits (RPM and TPM x utilisation) of the tiers the calls "
    "used, at the population's calls and tokens per request; worker slots ÷ mean model time of the calls workers "
    "made (a batch-lane answer is the batch runner's, not a slot's). The lowest binds, and "
    "efficiency = throughput ÷ the binding ceiling.",
    "- **Valid** means: at least one request succeeded; a steady window of at least 1 s and at least the average "
    "response time (duration-bounded runs); the generator on schedule (open loop: p99 send lag within the limit); "
    "not stopped early; and the mechanism the scenario exists for acted (e.g. the rate limiter made requests wait, "
    "with the scenario's limits applied). The CLI exits 3 when a run is invalid, unless `--allow-invalid`.",
    "- **Cost**: from the `api_calls` rows — one per attempt, what a provider bills. Attempts of a finished request "
    "whose outcome is unknown (`in_flight` or `unknown`: the worker died) keep their estimated tokens and cost and "
    "are counted on their own line, never as $0.",
]


def render_markdown(session: Session, *, plots: dict[str, str] | None = None, command: str | None = None) -> str:
    env = session.environment
    steps = all_steps(session)
    invalid = sum(1 for s in steps if not s.aggregates["valid"])
    status = "✅ every run valid" if not invalid else f"⚠️ INVALID: {invalid} of {len(steps)} run(s)"
    L = [
        "# TARS Load Testing & Scaling Results", "",
        f"**Generated:** {session.finished_at}  ",
        f"**Session:** `{session.id}` ({len(steps)} run(s), {env.get('wall_time_s', DASH)} s wall time)  ",
        f"**System:** TARS fleet — {env['fleet_mode']} fleet on {env['host']} ({env['cpus']} CPUs, "
        f"{env['memory_gb']} GiB)  ",
        f"**Status:** {status}", "", "---", "", "## Executive Summary", "",
        *executive_summary(session), "",
        "*Each row: that run's population (see the Method) — the steady window's requests, or the whole run's.*", "",
        *summary_table(session), "", "---", "", "## Test Environment", "",
        "### System Configuration", "",
        f"- Fleet mode: {env['fleet_mode']}",
        f"- Broker: `{env['broker']}`; database: `{env['database']}`",
        f"- Python {env['python']} on {env['platform']}",
        f"- Simulated provider latency: {env.get('sim_latency') or 'per tier, from the model catalog'}; "
        f"failure rate: {env.get('sim_failure_rate') if env.get('sim_failure_rate') is not None else 'per tier'}",
        "- Capabilities present in the code base: " + ", ".join(
            f"{k} {'yes' if v else 'no'}" for k, v in env["capabilities_present"].items()),
        "", "### Method", "", *METHOD, "", "---", "", "## Test Results", "",
    ]
    n = 0
    previous_closed: StepResult | None = None
    for r in session.scenarios:
        n += 1
        L += [f"### Scenario {n}: {r.scenario.title}", ""]
        if r.scenario.description:
            L += [f"*{r.scenario.description}*", ""]
        if r.sweep:
            first = r.steps[0]
            L += ["**Configuration:**", ""]
            L += [f"- Levels ({r.sweep['axis']}): " + ", ".join(f"{x:g}" for x in r.scenario.levels)]
            L += [line for line in configuration(first, sweep=True)[1:] if not line.startswith("- Run id")]
            L += ["- Run ids: " + ", ".join(f"`{s.run_id}`" for s in r.steps), "", "**Results:**", "",
                  "*Each row: that level's population (the requests sent in its steady window).*", ""]
            L += scaling_table(r) if r.sweep["axis"] == "workers" else sweep_table(r)
            L += ["", "**Analysis:**", ""]
            L += [f"- {x}" for x in sweep_findings(r)]
            for s in r.steps:
                L += [f"- *{s.label}:* " + " ".join(analyse_step(s)[:2])]
                if not s.aggregates["valid"]:
                    L += [f"  **INVALID:** {'; '.join(s.aggregates['invalid_reasons'])}."]
        else:
            s = r.steps[0]
            L += ["**Configuration:**", "", *configuration(s), "", "**Results:**", "", population_caption(s), "",
                  *results_table(s), "", *_jobs_section(s), *_cost_section(s),
                  "**What bound the run** (ceilings over the same population):", "",
                  *ceilings_table(s), "", *resources_table(s), "", "**Analysis:**", ""]
            prev = previous_closed if s.drive["kind"] == "closed" and previous_closed is not None and (
                s.drive.get("concurrency") and previous_closed.drive["concurrency"] < s.drive["concurrency"]) else None
            L += [f"- {x}" for x in analyse_step(s, previous=prev)]
            if s.drive["kind"] == "closed" and s.drive.get("concurrency"):
                previous_closed = s
        if r.not_exercised:
            L += ["", "**Not exercised:**", ""] + [f"- {x}" for x in r.not_exercised]
        L += ["", "---", ""]
    L += ["## Cost Analysis", "",
          "*Population: every API call of every request of every run in this session, warm-up and drain included "
          "(a provider bills them all), by the tier that was called.*", "", *cost_by_tier(steps), ""]
    if plots:
        L += ["## Plots", ""]
        for name in plots:
            L += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", ""]
    L += ["## Reproduce", "", f"- Command: `{command}`" if command else "- Command: (API call)",
          "- Every figure above is recomputed from `requests-<run-id>.jsonl` (one line per request, with its "
          "api_calls) and `samples-<run-id>.jsonl` (memory/CPU samples) in this directory, or from the `requests` "
          "and `api_calls` rows (`run_id`) and the `runs` row's stored generator timings in the database.", ""]
    return "\n".join(L)


def write_report(session: Session, *, command: str | None = None) -> dict[str, Path]:
    from loadgen.plots import write_plots

    out = session.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(all_steps(session), out)
    (out / REPORT_JSON).write_text(json.dumps(session_json(session), indent=1, default=str))
    (out / REPORT_MD).write_text(render_markdown(session, plots=plots, command=command))
    return {"markdown": out / REPORT_MD, "json": out / REPORT_JSON, **{k: Path(v) for k, v in plots.items()}}


def _breakdown_lines(a: dict) -> list[str]:
    """Per priority and per tenant: throughput and latency, and whether priority held (runs that mix them)."""
    out = []
    for what, key in (("priority", "by_priority"), ("tenant", "by_tenant")):
        groups = a.get(key) or {}
        if not groups:
            continue
        parts = [f"{what} {k}: {g['completions']} done, {g['completions_per_s']:.2f}/s, e2e p50 "
                 f"{percentile(g['e2e'], 'p50')}, p99 {percentile(g['e2e'], 'p99')}" for k, g in groups.items()]
        out.append(f"By {what} — " + "; ".join(parts) + ".")
    held = a.get("priority_held")
    if held:
        both = (f"priority {held['high']} p50 {ms(held['high_p50_ms'])} against priority {held['low']} p50 "
                f"{ms(held['low_p50_ms'])}")
        if held.get("contended", True):
            out.append(f"Priority {'held' if held['held'] else 'did NOT hold'}: {both}.")
        else:  # nothing queued: the order requests were taken in could not matter
            out.append(f"Priority not put to the test: {both}, but requests waited only {ms(held['wait_ms'])} on "
                       f"average for a place (queue and rate-limit waits, {pct(held['wait_share'])} of the response "
                       "time), too little for their order to matter.")
    return out
