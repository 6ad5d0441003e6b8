"""The Markdown report (the seed's layout, every number measured) and the JSON of every aggregate.

Analysis bullets are computed from the aggregates: each one states a measured relation
(a ratio, a share, a slope and its interval) and only the sentences the data support appear.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from loadgen.fmt import DASH, mb, ms, num, pct, rate, usd
from loadgen.runner import ScenarioResult, Session, StepResult

REPORT_MD = "report.md"
REPORT_JSON = "report.json"


# --- JSON ------------------------------------------------------------------------------------------


def session_json(session: Session) -> dict[str, Any]:
    return {
        "session": session.id, "started_at": session.started_at, "finished_at": session.finished_at,
        "environment": session.environment,
        "scenarios": [{
            "name": r.scenario.name, "title": r.scenario.title, "config": r.scenario.config(), "sweep": r.sweep,
            "not_exercised": r.not_exercised,
            "runs": [{"run_id": s.run_id, "label": s.label, "level": s.level, "config": s.config, "drive": s.drive,
                      "aggregates": s.aggregates, "records_file": f"requests-{s.run_id}.jsonl"} for s in r.steps],
        } for r in session.scenarios],
    }


def all_steps(session: Session) -> list[StepResult]:
    return [s for r in session.scenarios for s in r.steps]


# --- analysis --------------------------------------------------------------------------------------


def analyse_step(step: StepResult, *, previous: StepResult | None = None) -> list[str]:
    a = step.aggregates
    lat = a["latency_ms"]
    e2e, wait, svc = lat["e2e"], lat["queue_wait"], lat["service"]
    win = a["requests"]["window"]
    out: list[str] = []
    thr = a["throughput"]["completions_per_s"]
    little = a.get("little")
    if little:
        line = (f"Throughput {thr:.2f} req/s is {little['ratio']:.1%} of Little's bound {little['bound_per_s']:.2f} "
                f"req/s ({little['concurrency']} in flight ÷ {little['mean_service_ms']:,.0f} ms mean service time "
                f"of the requests completing in the window).")
        if e2e["avg"] is not None and svc["avg"] is not None:
            other = e2e["avg"] - svc["avg"] - (wait["avg"] or 0)
            line += (f" Per request, {wait['avg'] or 0:,.1f} ms went to queue wait and {other:,.1f} ms to broker, "
                     f"commit, notice and generator overhead on top of the service time.")
        out.append(line)
    if a["kind"] == "open":
        offered = a["throughput"]["offered_per_s"]
        out.append(f"Offered {offered:.2f} req/s on a schedule fixed in advance; {thr:.2f} req/s completed in the "
                   f"steady window ({thr / offered:.1%} of offered)." if offered else f"{thr:.2f} req/s completed.")
        lag = a["send_lag_ms"]
        if lag["count"]:
            out.append(f"Send lag (intended → published): p50 {ms(lag['p50'], digits=2)}, "
                       f"p99 {ms(lag['p99'], digits=2)}, max {ms(lag['max'], digits=1)}; latency is measured from the "
                       "intended time, so any lag is inside the latency figures too.")
    if e2e["avg"] and wait["avg"] is not None and wait["avg"] > 0.2 * e2e["avg"]:
        slots = step.config.get("fleet_slots")
        c = step.drive.get("concurrency")
        line = f"Queue wait averaged {wait['avg']:,.0f} ms — {wait['avg'] / e2e['avg']:.0%} of end-to-end latency"
        if slots and c:
            line += f": {c} in flight against {slots} worker slots"
            if c < slots:
                line += (", so requests were not waiting for a free slot but for the broker to hand the message to "
                         "a worker (delivery or polling delay)")
        out.append(line + ".")
    mc = lat.get("model_call") or {}
    if mc.get("avg") is not None and svc["avg"]:
        rw = (lat.get("ratelimit_wait") or {}).get("avg") or 0.0
        out.append(f"Of the {svc['avg']:,.0f} ms mean service time of the requests sent in the window, "
                   f"{mc['avg']:,.0f} ms were provider calls, "
                   f"{rw:,.1f} ms rate-limit waits and {svc['avg'] - mc['avg'] - rw:,.1f} ms the worker's own work "
                   "(breaker, limiter, attempt rows, backoff between retries).")
    if e2e["p99"] is not None and svc["p99"] is not None:
        out.append(f"p99 end-to-end {ms(e2e['p99'])} vs p99 service {ms(svc['p99'])}: the fleet added "
                   f"{e2e['p99'] - svc['p99']:,.0f} ms at the tail; p99/p50 = {e2e['p99'] / e2e['p50']:.2f}.")
    if win["failed"]:
        reasons = ", ".join(f"{k} {v}" for k, v in win["failures_by_reason"].items())
        out.append(f"{win['failed']} of {win['total']} requests in the window failed ({win['error_rate']:.2%}): "
                   f"{reasons}. Their latencies are included in the figures above.")
    elif win["total"]:
        out.append(f"No failure among the {win['total']} requests of the steady window.")
    rt = a["retries"]
    if rt["retries"]:
        out.append(f"{rt['retries']} retries over {rt['api_calls']} API calls; {rt['requests_recovered']} of "
                   f"{rt['requests_retried']} retried requests then succeeded.")
    rl = a["rate_limit"]
    if rl["requests_waited"]:
        w = rl["per_waiting_request_ms"]
        line = (f"{rl['requests_waited']} requests waited for rate-limit capacity (avg {ms(w['avg'])}, "
                f"p99 {ms(w['p99'])}, total {rl['total_wait_ms'] / 1000:,.1f} s)")
        rw = lat.get("ratelimit_wait") or {}
        if rw.get("avg") is not None and svc["avg"]:
            line += f"; that is {rw['avg'] / svc['avg']:.1%} of the mean service time, which includes it"
        out.append(line + ".")
    fb = a["fallbacks"]
    if fb["count"]:
        pairs = ", ".join(f"{k} {v}" for k, v in fb["pairs"].items())
        out.append(f"{fb['count']} requests ({fb['rate']:.1%}) ran on a fallback tier: {pairs}.")
    w = a["workers"]
    if w["count"] > 1:
        out.append(f"{w['count']} workers served requests; shares {w['min_share']:.1%}-{w['max_share']:.1%} against "
                   f"an even {1 / w['count']:.1%}, Jain fairness index {w['jain_index']:.3f}.")
    res = a.get("resources") or {}
    if res.get("sampled"):
        line = f"RSS of {res['processes']}: peak {mb(res['rss_peak_mb'])}, average {mb(res['rss_avg_mb'])}"
        if res["growth_mb_per_min"] is not None:
            lo, hi = res["growth_ci95_mb_per_min"]
            verdict = {"growing": ("growth above the threshold throughout the window — a leak, an unbounded buffer, "
                                   "or warm-up allocation that a longer run (memory-5m) would tell apart"
                                   if res["steady_span_s"] < 120 else
                                   "growth above the threshold throughout the window — a leak or an unbounded buffer"),
                       "flat": "no growth above the threshold",
                       "inconclusive": (f"sampled for less than {res.get('leak_min_span_s', 0):g} s after warm-up, "
                                        "too short to tell" if res["steady_span_s"] < res.get("leak_min_span_s", 0)
                                        else "the interval includes the threshold; a longer run is needed to tell"),
                       }[res["leak"]]
            line += (f"; after warm-up it changed by {res['growth_mb_per_min']:+.2f} MB/min (95% CI {lo:+.2f} to "
                     f"{hi:+.2f}) over {res['steady_span_s']:.0f} s — leak indicator **{res['leak']}** "
                     f"(threshold {res['leak_threshold_mb_per_min']:g} MB/min): {verdict}")
        out.append(line + ".")
        done = a["requests"]["run"]["total"]
        if done and res.get("cpu_avg_percent") is not None:
            out.append(f"CPU of the same processes: {res['cpu_avg_percent']:.0f}% average, "
                       f"{res['cpu_peak_percent']:.0f}% peak (100% = one core).")
    c = a["cost"]
    if c["requests"]:
        out.append(f"{usd(c['total_usd'])} for {c['requests']} requests: {usd(c['per_request_usd'], digits=5)} and "
                   f"{c['tokens_per_request']:,.0f} tokens per request (from the request rows, not estimated).")
    if previous is not None and previous.drive.get("concurrency") and step.drive.get("concurrency"):
        p_thr = previous.aggregates["throughput"]["completions_per_s"]
        if p_thr > 0:
            cr = step.drive["concurrency"] / previous.drive["concurrency"]
            tr = thr / p_thr
            out.append(f"Against {previous.label}: {cr:.1f}x the concurrency gave {tr:.2f}x the throughput "
                       f"(scaling efficiency {tr / cr:.0%}).")
    if not a["valid"]:
        out.append("**Run invalid:** " + "; ".join(a["invalid_reasons"]) + ".")
    out.extend(n[:1].upper() + n[1:] + ("" if n.endswith(".") else ".") for n in a.get("notes", []))
    return out


# --- tables ----------------------------------------------------------------------------------------


def results_table(step: StepResult) -> list[str]:
    a = step.aggregates
    run, win = a["requests"]["run"], a["requests"]["window"]
    e2e, wait, svc = a["latency_ms"]["e2e"], a["latency_ms"]["queue_wait"], a["latency_ms"]["service"]
    res = a.get("resources") or {}
    c = a["cost"]
    rows = [
        ("Total Requests", f"{run['total']} ({win['total']} in the steady window)"),
        ("Successful", f"{win['succeeded']} ({pct(win['succeeded'] / win['total'] if win['total'] else None)})"),
        ("Failed", f"{win['failed']} ({pct(win['error_rate'])})"
         + (f" — {', '.join(f'{k}: {v}' for k, v in win['failures_by_reason'].items())}" if win["failed"] else "")),
        ("Avg Response Time", ms(e2e["avg"])),
        ("p50 Response Time", ms(e2e["p50"])),
        ("p95 Response Time", ms(e2e["p95"])),
        ("p99 Response Time", ms(e2e["p99"])),
        ("Max Response Time", ms(e2e["max"])),
        ("Queue Wait (avg / p99)", f"{ms(wait['avg'])} / {ms(wait['p99'])}"),
        ("Service Time (avg / p99)", f"{ms(svc['avg'])} / {ms(svc['p99'])}"),
        ("Model Call Time (avg / p99)", f"{ms(a['latency_ms']['model_call']['avg'])} / "
                                        f"{ms(a['latency_ms']['model_call']['p99'])}"),
        ("Throughput", rate(a["throughput"]["completions_per_s"])),
    ]
    if a.get("little"):
        li = a["little"]
        rows.append(("Little's Bound (C / mean service)", f"{rate(li['bound_per_s'])} — achieved {pct(li['ratio'])}"))
    if a["kind"] == "open":
        rows.append(("Offered Rate", rate(a["throughput"]["offered_per_s"])))
        rows.append(("Send Lag (p50 / p99 / max)", " / ".join(ms(a["send_lag_ms"][k], digits=2)
                                                              for k in ("p50", "p99", "max"))))
    rows += [
        ("Error Rate", pct(win["error_rate"], digits=2)),
        ("Retries", f"{a['retries']['retries']} over {a['retries']['api_calls']} API calls"),
        ("Rate-Limit Waits", f"{a['rate_limit']['requests_waited']} requests, "
                             f"{a['rate_limit']['total_wait_ms'] / 1000:,.1f} s in total"),
        ("Fallbacks", f"{a['fallbacks']['count']} ({pct(a['fallbacks']['rate'])})"),
        ("Tokens per Request", num(c["tokens_per_request"])),
        ("Cost", f"{usd(c['total_usd'])} total, {usd(c['per_request_usd'], digits=5)} per request"),
    ]
    if res.get("sampled"):
        rows += [
            ("Peak Memory (RSS)", mb(res["rss_peak_mb"])),
            ("Average Memory (RSS)", mb(res["rss_avg_mb"])),
            ("Memory Growth after Warm-up", DASH if res["growth_mb_per_min"] is None else
             f"{res['growth_mb_per_min']:+.2f} MB/min"),
            ("Leak Indicator", res["leak"]),
            ("CPU (avg / peak)", f"{res['cpu_avg_percent']:.0f}% / {res['cpu_peak_percent']:.0f}%"),
        ]
    else:
        rows.append(("Memory", "not sampled (no worker process reachable from this host)"))
    w = a["workers"]
    if w["count"]:
        rows.append(("Workers Used", f"{w['count']} (Jain index {w['jain_index']:.3f})"))
    return ["| Metric | Value |", "|--------|-------|"] + [f"| **{k}** | {v} |" for k, v in rows]


def configuration(step: StepResult, *, sweep: bool = False) -> list[str]:
    cfg, d = step.config, step.drive
    out = []
    if d["kind"] == "closed":
        out.append(f"- Driver: closed loop, {d['concurrency']} requests in flight")
    else:
        out.append(f"- Driver: open loop, {cfg['arrival']} arrivals at {cfg['rate_per_s']:g} req/s "
                   f"(seed {cfg['seed']})")
    bound = f"{cfg['count']} requests" if cfg.get("count") is not None else f"{cfg['duration_s']:g} s"
    if sweep:
        out.append(f"- Bound per level: {bound}; a warm-up of {cfg['warmup_s']:g} s (closed loop: and until every "
                   "slot has completed once) and the drain are excluded from each level's steady window")
    else:
        out.append(f"- Bound: {bound}; warm-up {d['window'][0] - d['started_at']:.1f} s and drain "
                   f"{d['ended_at'] - d['load_end']:.1f} s excluded (steady window "
                   f"{d['window'][1] - d['window'][0]:.1f} s)")
    roles = ", ".join(f"{r} {w:.0%}" for r, w in cfg["roles"].items())
    out.append(f"- Request mix: {roles}")
    out.append(f"- Fleet: {cfg['fleet']}")
    out.append(f"- Run id: `{step.run_id}`")
    return out


def sweep_table(result: ScenarioResult) -> list[str]:
    axis = result.sweep["axis"] if result.sweep else "level"
    head = f"| {axis.capitalize()} | Throughput | Avg Response | p50 | p95 | p99 | Success Rate | Little Ratio |"
    out = [head, "|" + "---|" * 8]
    for s in result.steps:
        a = s.aggregates
        e = a["latency_ms"]["e2e"]
        w = a["requests"]["window"]
        li = a.get("little") or {}
        out.append(f"| {s.level:g} | {rate(a['throughput']['completions_per_s'])} | {ms(e['avg'])} | {ms(e['p50'])} | "
                   f"{ms(e['p95'])} | {ms(e['p99'])} | {pct(1 - w['error_rate'] if w['total'] else None)} | "
                   f"{pct(li.get('ratio'))} |")
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
            out.append(f"{s.level:g} worker processes: {t / base:.2f}x the throughput of {steps[0].level:g} "
                       f"({t / base / f:.0%} scaling efficiency).")
    if len(steps) > 1 and sw.get("axis") == "concurrency":
        best = max(steps, key=lambda s: s.aggregates["throughput"]["completions_per_s"])
        out.append(f"Highest throughput {rate(best.aggregates['throughput']['completions_per_s'])} at "
                   f"concurrency {best.level:g}.")
    return out


def scaling_table(result: ScenarioResult) -> list[str]:
    out = ["| Worker Processes | Concurrency | Throughput | Efficiency | p99 | Cost/Request |", "|" + "---|" * 6]
    base = result.steps[0].aggregates["throughput"]["completions_per_s"] if result.steps else 0
    n0 = result.steps[0].level or 1 if result.steps else 1
    for s in result.steps:
        a = s.aggregates
        t = a["throughput"]["completions_per_s"]
        eff = t / (base * (s.level or 1) / n0) if base else None
        out.append(f"| {s.level:g} | {s.drive['concurrency']} | {rate(t)} | {pct(eff, digits=0)} | "
                   f"{ms(a['latency_ms']['e2e']['p99'])} | {usd(a['cost']['per_request_usd'], digits=5)} |")
    return out


def cost_by_tier(steps: Sequence[StepResult]) -> list[str]:
    tiers: dict[str, dict[str, Any]] = {}
    for s in steps:
        for t, b in s.aggregates["cost"]["by_tier"].items():
            acc = tiers.setdefault(t, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost": Decimal(0)})
            acc["requests"] += b["requests"]
            acc["input_tokens"] += b["input_tokens"]
            acc["output_tokens"] += b["output_tokens"]
            acc["cost"] += Decimal(b["cost_usd"])
    out = ["| Tier | Requests | Input Tokens | Output Tokens | Cost | Cost/Request | $/M tokens |", "|" + "---|" * 7]
    for t, b in sorted(tiers.items()):
        tok = b["input_tokens"] + b["output_tokens"]
        out.append(f"| {t} | {b['requests']:,} | {b['input_tokens']:,} | {b['output_tokens']:,} | {usd(b['cost'])} | "
                   f"{usd(b['cost'] / b['requests'] if b['requests'] else None, digits=5)} | "
                   f"{usd(b['cost'] / tok * 1_000_000 if tok else None, digits=2)} |")
    return out


# --- document --------------------------------------------------------------------------------------


def summary_table(session: Session) -> list[str]:
    out = ["| Run | Load | Requests | Throughput | p50 | p99 | Error Rate | Valid |", "|" + "---|" * 8]
    for s in all_steps(session):
        a = s.aggregates
        load = f"C={s.drive['concurrency']}" if s.drive["kind"] == "closed" else f"{s.drive['rate_per_s']:g}/s"
        e = a["latency_ms"]["e2e"]
        out.append(f"| {s.label} | {load} | {a['requests']['run']['total']} | "
                   f"{rate(a['throughput']['completions_per_s'])} | {ms(e['p50'])} | {ms(e['p99'])} | "
                   f"{pct(a['requests']['window']['error_rate'], digits=2)} | {'yes' if a['valid'] else 'NO'} |")
    return out


def executive_summary(session: Session) -> list[str]:
    steps = all_steps(session)
    if not steps:
        return ["- No run."]
    out = []
    best = max(steps, key=lambda s: s.aggregates["throughput"]["completions_per_s"])
    out.append(f"- **Peak throughput:** {rate(best.aggregates['throughput']['completions_per_s'])} ({best.label})")
    heavy = max(steps, key=lambda s: s.drive.get("concurrency") or 0)
    he = heavy.aggregates["latency_ms"]["e2e"]
    out.append(f"- **Response time at the highest concurrency run ({heavy.label}):** p50 {ms(he['p50'])}, "
               f"p99 {ms(he['p99'])}")
    rates = [1 - s.aggregates["requests"]["window"]["error_rate"] for s in steps
             if s.aggregates["requests"]["window"]["total"]]
    if rates:
        out.append(f"- **Success rate:** {pct(min(rates), digits=2)} to {pct(max(rates), digits=2)} across runs")
    ratios = [(s.label, s.aggregates["little"]["ratio"]) for s in steps if s.aggregates.get("little")]
    if ratios:
        lo = min(ratios, key=lambda x: x[1])
        out.append(f"- **Achieved / Little's bound:** {pct(lo[1])} at worst ({lo[0]}), "
                   f"{pct(max(r for _, r in ratios))} at best")
    mem = [s for s in steps if (s.aggregates.get("resources") or {}).get("sampled")]
    if mem:
        peak = max(mem, key=lambda s: s.aggregates["resources"]["rss_peak_mb"])
        verdicts: dict[str, int] = {}
        for s in mem:
            verdicts[s.aggregates["resources"]["leak"]] = verdicts.get(s.aggregates["resources"]["leak"], 0) + 1
        out.append(f"- **Memory:** peak {mb(peak.aggregates['resources']['rss_peak_mb'])} ({peak.label}); leak "
                   "indicator " + ", ".join(f"{k} in {v} run(s)" for k, v in sorted(verdicts.items())))
    for r in session.scenarios:
        if r.sweep and r.sweep.get("knee") is not None:
            out.append(f"- **Knee ({r.scenario.name}):** {r.sweep['axis']} = {r.sweep['knee']:g}"
                       + (f", breaking at {r.sweep['broke_at']:g}" if r.sweep.get("broke_at") is not None else ""))
    invalid = [s for s in steps if not s.aggregates["valid"]]
    if invalid:
        out.append("- **Invalid runs:** " + "; ".join(f"{s.label}: {', '.join(s.aggregates['invalid_reasons'])}"
                                                   for s in invalid))
    missing = [n for r in session.scenarios for n in r.not_exercised]
    if missing:
        out.append(f"- **Not exercised:** {len(missing)} item(s), listed per scenario below")
    return out


def render_markdown(session: Session, *, plots: dict[str, str] | None = None, command: str | None = None) -> str:
    env = session.environment
    steps = all_steps(session)
    invalid = sum(1 for s in steps if not s.aggregates["valid"])
    status = "✅ every run valid" if not invalid else f"⚠️ {invalid} of {len(steps)} run(s) invalid"
    L = [
        "# TARS Load Testing & Scaling Results", "",
        f"**Generated:** {session.finished_at}  ",
        f"**Session:** `{session.id}` ({len(steps)} run(s), {env.get('wall_time_s', DASH)} s wall time)  ",
        f"**System:** TARS fleet — {env['fleet_mode']} fleet on {env['host']} ({env['cpus']} CPUs, "
        f"{env['memory_gb']} GB)  ",
        f"**Status:** {status}", "", "---", "", "## Executive Summary", "",
        *executive_summary(session), "", *summary_table(session), "", "---", "", "## Test Environment", "",
        "### System Configuration", "",
        f"- Fleet mode: {env['fleet_mode']}",
        f"- Broker: `{env['broker']}`; database: `{env['database']}`",
        f"- Python {env['python']} on {env['platform']}",
        f"- Simulated provider latency: {env.get('sim_latency') or 'per tier, from the model catalog'}; "
        f"failure rate: {env.get('sim_failure_rate') if env.get('sim_failure_rate') is not None else 'per tier'}",
        "- Capabilities present in the code base: " + ", ".join(
            f"{k} {'yes' if v else 'no'}" for k, v in env["capabilities_present"].items()),
        "", "### Method", "",
        "- Steady window: from the end of the warm-up to the moment the generator stopped issuing; requests "
        "count in it by their latency origin. The drain (waiting for the last requests) is outside.",
        "- Throughput: completions per second in the steady window, each request weighted by the share of its "
        "lifetime inside the window.",
        "- Latency: HdrHistogram (3 significant digits) of completion - origin, origin = send time (closed loop) "
        "or intended send time (open loop, no coordinated omission); failed and unfinished requests included. "
        "Queue wait = started - submitted and service = finished - started, from the request rows.",
        "- Little's bound (closed loop): C / mean service time; the ratio achieved / bound is the efficiency.",
        "- Tokens and cost: summed from the request rows (which sum their api_calls), every request of the run.",
        "", "---", "", "## Test Results", "",
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
            L += ["- Run ids: " + ", ".join(f"`{s.run_id}`" for s in r.steps), "", "**Results:**", ""]
            L += scaling_table(r) if r.sweep["axis"] == "workers" else sweep_table(r)
            L += ["", "**Analysis:**", ""]
            L += [f"- {x}" for x in sweep_findings(r)]
            for s in r.steps:
                L += [f"- *{s.label}:* " + " ".join(analyse_step(s)[:3])]
        else:
            s = r.steps[0]
            L += ["**Configuration:**", "", *configuration(s), "", "**Results:**", "", *results_table(s), "",
                  "**Analysis:**", ""]
            prev = previous_closed if s.drive["kind"] == "closed" and previous_closed is not None and (
                previous_closed.drive["concurrency"] < s.drive["concurrency"]) else None
            L += [f"- {x}" for x in analyse_step(s, previous=prev)]
            if s.drive["kind"] == "closed":
                previous_closed = s
        if r.not_exercised:
            L += ["", "**Not exercised:**", ""] + [f"- {x}" for x in r.not_exercised]
        L += ["", "---", ""]
    L += ["## Cost Analysis", "", "Per tier over every run of this session (tier actually used):", "",
          *cost_by_tier(steps), ""]
    if plots:
        L += ["## Plots", ""]
        for name in plots:
            L += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", ""]
    L += ["## Reproduce", "", f"- Command: `{command}`" if command else "- Command: (API call)",
          "- Every figure above is recomputed from `requests-<run-id>.jsonl` in this directory, or from the "
          "`requests` rows (`run_id`) and the `runs` row's stored generator timings in the database.", ""]
    return "\n".join(L)


def write_report(session: Session, *, command: str | None = None) -> dict[str, Path]:
    from loadgen.plots import write_plots

    out = session.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(all_steps(session), out)
    (out / REPORT_JSON).write_text(json.dumps(session_json(session), indent=1, default=str))
    (out / REPORT_MD).write_text(render_markdown(session, plots=plots, command=command))
    return {"markdown": out / REPORT_MD, "json": out / REPORT_JSON, **{k: Path(v) for k, v in plots.items()}}
