"""The cost-control figures of a run: the response cache (hit rate, hit vs model latency, dollars
saved), the dollars saved by degradation and by the batch lane (at the catalog prices the fleet ran
with, stated in the report), the interactive vs batch lanes side by side, the modes requests were
admitted under, budget refusals, and the phases table (the seed's scenario 11: phase, duration,
mode, throughput, error rate, model, cache hit rate) rebuilt from the fleet's ``mode_changes`` rows.

Computed over **every sampled request of the run** (not the steady window: a mode change or a
budget crossing is what the run is about, warm-up included). A request belongs to the phase in
which it was sent (its ``origin``); a phase's throughput counts the requests that *finished*
succeeded inside it, divided by its duration. Every figure is recomputed from
``requests-<run>.jsonl`` and ``mode-changes-<run>.jsonl`` by ``tests/loadgen/recompute.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from loadgen.metrics import latency_summary
from loadgen.records import CallRow, RequestRecord

BUDGET_REFUSED_CLIENT = "submit_error:BudgetExceeded"
#: ``answered_by`` of the answers the response cache gave at submit (exact, then semantic).
CACHE_ANSWERS = ("exact", "semantic")
BUDGET_REASON = "budget"


def _latency_ms(r: RequestRecord) -> float:
    assert r.done_at is not None
    return (r.done_at - r.origin) * 1000


#: A price's fields as the report prints them (USD per million tokens; the batch multiplier a factor).
PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "batch_multiplier")
LANES = ("interactive", "batch")
MILLION = Decimal(1_000_000)


def prices_in_force(catalog_path: Path | None) -> dict[str, dict[str, str]]:
    """Per tier, its model and the prices its calls are billed at, from the catalog the fleet ran
    with (``None``: the default catalog): every class the price list leaves out is priced at the
    input price, as the workers price it (config/pricing.py)."""
    from config.catalog import load_catalog

    out = {}
    for tier, spec in load_catalog(catalog_path).tiers.items():
        p = spec.prices
        out[tier] = {"model": spec.model, "input": str(p.input), "output": str(p.output),
                     "cache_write_5m": str(p.per_mtok("cache_write_tokens")),
                     "cache_write_1h": str(p.per_mtok("cache_write_1h_tokens")),
                     "cache_read": str(p.per_mtok("cache_read_tokens")), "batch_multiplier": str(p.batch_multiplier)}
    return out


def call_cost_at(c: CallRow, price: dict[str, str], *, batch: bool) -> Decimal:
    """What call ``c``'s tokens cost at ``price`` (the interactive price, or the batch price)."""
    p = {k: Decimal(price[k]) for k in PRICE_FIELDS}
    five_min = c.cache_write_tokens - c.cache_write_1h_tokens
    micro = (c.input_tokens * p["input"] + c.output_tokens * p["output"] + five_min * p["cache_write_5m"]
             + c.cache_write_1h_tokens * p["cache_write_1h"] + c.cache_read_tokens * p["cache_read"])
    cost = micro / MILLION
    return cost * p["batch_multiplier"] if batch else cost


def degraded(r: RequestRecord) -> bool:
    """The fleet mode or its tenant's soft budget threshold moved it to a cheaper tier: admission
    queued it on one (``tier_queued`` ≠ ``tier_requested``), or a worker found the fleet out of
    optimal mode and ran it on its tier's fallback (workers/agent.py ``_apply_fleet_mode``: below
    high priority, on a degradable tier, ``served_mode`` then the mode that moved it — admission in
    that mode would have moved it already). A breaker fallback is not degradation: in optimal mode,
    or at high priority, which keeps its tier in every mode."""
    from tars_tasks.admission import DEGRADABLE_TIERS, PRIORITY_HIGH

    if not (r.tier_requested and r.tier_queued and r.tier_used):
        return False
    if r.tier_queued != r.tier_requested:
        return True
    return (r.tier_used != r.tier_queued and r.tier_requested in DEGRADABLE_TIERS and r.priority is not None
            and r.priority < PRIORITY_HIGH and r.served_mode not in (None, "optimal"))


def savings(records: Sequence[RequestRecord], prices: dict[str, dict[str, str]] | None) -> dict[str, Any]:
    """Saved by degradation: for each succeeded degraded request, its calls' tokens at the requested
    tier's prices (same lane) minus what they cost. Saved by batch: for each call billed at the batch
    price, its tokens at its tier's interactive price minus what it cost. Estimates at the same tokens."""
    if not prices:
        return {"degradation_usd": None, "batch_usd": None, "degraded_requests": 0, "batch_calls": 0, "both": 0}
    deg = bat = Decimal(0)
    n_deg = n_bat = both = 0
    for r in records:
        is_deg = r.status == "succeeded" and degraded(r) and r.tier_requested in prices
        if is_deg:
            n_deg += 1
            deg += sum((call_cost_at(c, prices[r.tier_requested], batch=c.batch) - c.cost_usd for c in r.calls),
                       Decimal(0))
        batch_calls = [c for c in r.calls if c.batch and c.tier in prices]
        n_bat += len(batch_calls)
        both += bool(is_deg and batch_calls)
        bat += sum((call_cost_at(c, prices[c.tier], batch=False) - c.cost_usd for c in batch_calls), Decimal(0))
    return {"degradation_usd": str(deg), "batch_usd": str(bat), "degraded_requests": n_deg, "batch_calls": n_bat,
            "both": both}


def lanes(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Per lane (the one each request was submitted to): requests, succeeded, tokens by class, dollars,
    dollars per request, latency of the successes; and batch ÷ interactive dollars per request.
    None when no request of the run was submitted to the batch lane."""
    rs = [r for r in records if r.sampled]
    if not any(r.lane == "batch" for r in rs):
        return None
    rows = []
    for lane in LANES:
        mine = [r for r in rs if (r.lane or "interactive") == lane and r.submitted_at is not None]
        calls = [c for r in mine for c in r.calls]
        usd = sum((c.cost_usd for c in calls), Decimal(0))
        rows.append({"lane": lane, "requests": len(mine), "succeeded": sum(1 for r in mine if r.status == "succeeded"),
                     "api_calls": len(calls), "batch_calls": sum(1 for c in calls if c.batch),
                     "tokens": {"input_tokens": sum(c.input_tokens for c in calls),
                                "cache_write_tokens": sum(c.cache_write_tokens for c in calls),
                                "cache_read_tokens": sum(c.cache_read_tokens for c in calls),
                                "output_tokens": sum(c.output_tokens for c in calls)},
                     "usd": str(usd), "usd_per_request": str(usd / len(mine)) if mine else None,
                     "latency_ms": latency_summary(_latency_ms(r) for r in mine
                                                   if r.status == "succeeded" and r.done_at is not None)})
    inter, bat = rows
    ratio = (str(Decimal(bat["usd_per_request"]) / Decimal(inter["usd_per_request"]))
             if bat["usd_per_request"] is not None and inter["usd_per_request"] and Decimal(inter["usd_per_request"])
             else None)
    return {"rows": rows, "ratio": ratio,
            "no_row": sum(1 for r in rs if r.submitted_at is None)}


def phases(mode_changes: Sequence[dict[str, Any]], *, start: float, end: float) -> list[dict[str, Any]]:
    """The run cut at each transition: ``[{start, end, mode}]`` (the mode in force at ``start`` first)."""
    mode = "optimal"
    cuts: list[tuple[float, str]] = []
    for mc in sorted(mode_changes, key=lambda m: (m["at"], m["seq"])):
        if mc["at"] <= start:
            mode = mc["to"]
        elif mc["at"] < end:
            cuts.append((mc["at"], mc["to"]))
    out, t, m = [], start, mode
    for at, to in cuts:
        out.append({"start": t, "end": at, "mode": m})
        t, m = at, to
    out.append({"start": t, "end": end, "mode": m})
    return [p for p in out if p["end"] > p["start"]]


def figures(records: Sequence[RequestRecord], *, mode_changes: Sequence[dict[str, Any]], start: float,
            end: float, budget_usd: float | None = None, tenant: str | None = None,
            prices: dict[str, dict[str, str]] | None = None, batch_timing: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    rs = [r for r in records if r.sampled]
    ok = [r for r in rs if r.status == "succeeded"]
    exact = [r for r in ok if r.answered_by == "exact"]
    semantic = [r for r in ok if r.answered_by == "semantic"]
    model = [r for r in ok if r.answered_by not in CACHE_ANSWERS]
    spent = sum((r.cost_usd for r in records), Decimal(0))
    saved = sum((r.saved_usd for r in records), Decimal(0))
    out: dict[str, Any] = {
        "requests": len(rs), "succeeded": len(ok),
        "answered_by": dict(sorted(Counter(r.answered_by if r.answered_by in CACHE_ANSWERS else "model"
                                           for r in ok).items())),
        "hit_rate": len(exact) / len(ok) if ok else None,
        "semantic_hit_rate": len(semantic) / len(ok) if ok else None,
        "latency_exact_ms": latency_summary(_latency_ms(r) for r in exact if r.done_at is not None),
        "latency_semantic_ms": latency_summary(_latency_ms(r) for r in semantic if r.done_at is not None),
        "latency_model_ms": latency_summary(_latency_ms(r) for r in model if r.done_at is not None),
        "spent_usd": str(spent), "saved_usd": str(saved),
        "served_mode": dict(sorted(Counter(r.served_mode or "none" for r in rs if r.submitted_at is not None).items())),
    }
    saved = savings(records, prices)
    out["saved_degradation_usd"], out["saved_batch_usd"] = saved["degradation_usd"], saved["batch_usd"]
    out["savings"] = saved
    out["prices"] = prices
    out["lanes"] = lanes(records)
    out["batch_timing"] = batch_timing
    refused = sum(1 for r in rs if r.reason == BUDGET_REFUSED_CLIENT)
    failed = sum(1 for r in rs if r.reason == BUDGET_REASON)
    out["budget"] = {"limit_usd": budget_usd, "tenant": tenant, "refused": refused + failed,
                     "refused_at_submit": refused, "failed_budget": failed,
                     "overspend_usd": (str(max(Decimal(0), spent - Decimal(str(budget_usd))))
                                       if budget_usd is not None else None)}
    table = []
    for i, ph in enumerate(phases(mode_changes, start=start, end=end), start=1):
        sent = [r for r in rs if ph["start"] <= r.origin < ph["end"]]
        done_ok = [r for r in ok if r.done_at is not None and ph["start"] <= r.done_at < ph["end"]]
        sent_ok = [r for r in sent if r.status == "succeeded"]
        tiers = Counter(r.tier_used for r in sent_ok if r.tier_used)
        dur = ph["end"] - ph["start"]
        table.append({"phase": i, "start_s": ph["start"] - start, "duration_s": dur, "mode": ph["mode"],
                      "requests": len(sent), "throughput": len(done_ok) / dur if dur > 0 else None,
                      "error_rate": (sum(1 for r in sent if r.status == "failed") / len(sent)) if sent else None,
                      "model": ", ".join(f"{t} {n / len(sent_ok):.0%}" for t, n in tiers.most_common())
                      if sent_ok else "—",
                      "cache_hit_rate": (sum(1 for r in sent_ok if r.answered_by in CACHE_ANSWERS) / len(sent_ok))
                      if sent_ok else None})
    out["phases"] = table
    out["transitions"] = len([m for m in mode_changes if start < m["at"] < end])
    return out


def write_mode_changes(out_dir: Path, run_id: str, rows: Sequence[dict[str, Any]]) -> str:
    name = f"mode-changes-{run_id}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / name).open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r, separators=(",", ":"), default=str) + "\n")
    return name


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _ms(s: dict[str, Any]) -> str:
    if not s["count"]:
        return "— (none)"
    p50 = f"{s['p50']:.1f} ms" if s["p50"] is not None else f"— ({s['withheld']['p50']})"
    return f"avg {s['avg']:.1f} ms, p50 {p50} ({s['count']} requests)"


def _usd(x: str | None) -> str:
    return "—" if x is None else f"${Decimal(x):.6f}"


def _saved_rows(fig: dict[str, Any]) -> list[str]:
    s = fig.get("savings") or {}
    if fig.get("saved_degradation_usd") is None:
        return ["| Saved by degradation / by the batch lane | — (no catalog prices recorded for the run) |"]
    return [f"| Saved by degradation (estimate; {s['degraded_requests']} succeeded requests moved to a cheaper "
            f"tier) | {_usd(fig['saved_degradation_usd'])} |",
            f"| Saved by the batch lane (estimate; {s['batch_calls']} calls at the batch price) | "
            f"{_usd(fig['saved_batch_usd'])} |"]


def _savings_rule(fig: dict[str, Any]) -> list[str]:
    prices = fig.get("prices")
    if not prices:
        return []
    both = (fig.get("savings") or {}).get("both", 0)
    L = ["", "*Savings, an estimate at the same tokens (a request served otherwise might have used other token "
             "counts): **by the cache** — each hit's `saved_usd`, the cost of the call that filled the entry; "
             "**by degradation** — for each succeeded request the fleet mode or its tenant's soft budget threshold "
             "moved to a cheaper tier (admission queued it there, `tier_queued` ≠ `tier_requested`; or a worker ran "
             "it on the fallback because the fleet was out of optimal mode: below priority 9, `served_mode` not "
             "optimal; a breaker fallback is not counted), its calls' tokens by class at the requested tier's "
             "prices (in the lane the call was billed in) minus what they cost; **by the batch lane** — for each "
             "call billed at the batch price, its tokens by class at its tier's interactive price minus what it "
             "cost. Per class tokens times price ÷ 1,000,000, summed; a batch call times the batch multiplier. "
             "Prices used (USD per million tokens, the catalog the workers ran with):*"
             + (f" *{both} request(s) were both degraded and batched: each saving holds the other mechanism fixed, "
                "so the two do not add up to one counterfactual for them.*" if both else ""), "",
         "| Tier | Model | Input | Output | Cache write 5m | Cache write 1h | Cache read | Batch multiplier |",
         "|---|---|---|---|---|---|---|---|"]
    for tier, p in prices.items():
        L.append(f"| {tier} | {p['model']} | " + " | ".join(p[k] for k in PRICE_FIELDS) + " |")
    return L


def _lanes_lines(fig: dict[str, Any]) -> list[str]:
    ln = fig.get("lanes")
    if not ln:
        return []
    L = ["", "**Interactive vs batch lane** (each request under the lane it was submitted to; tokens and dollars "
             "from its api_calls rows; latency from send to completion of the successes)", "",
         "| Lane | Requests | Succeeded | Input tokens | Cache write tokens | Cache read tokens | Output tokens | "
         "Dollars | Dollars per request | Latency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ln["rows"]:
        t = r["tokens"]
        per = "—" if r["usd_per_request"] is None else f"${Decimal(r['usd_per_request']):.8f}"
        L.append(f"| {r['lane']} | {r['requests']} | {r['succeeded']} | {t['input_tokens']:,} | "
                 f"{t['cache_write_tokens']:,} | {t['cache_read_tokens']:,} | {t['output_tokens']:,} | "
                 f"${Decimal(r['usd']):.6f} | {per} | {_lat(r['latency_ms'])} |")
    ratio = "—" if ln["ratio"] is None else f"{Decimal(ln['ratio']):.4f}"
    L += ["", f"Batch ÷ interactive dollars per request: **{ratio}**"
              + (f" ({ln['no_row']} request(s) refused before a row was written belong to no lane)"
                 if ln["no_row"] else "")]
    bt = fig.get("batch_timing")
    if bt:
        L += ["", f"*A batch-lane request waits for its batch to form (the oldest waits up to "
                  f"{bt['batch_max_age_s']:g} s, `TARS_BATCH_MAX_AGE_S`), for the provider to end the batch "
                  f"({bt['provider']}), and for the runner's next poll (every {bt['batch_poll_interval_s']:g} s, "
                  "`TARS_BATCH_POLL_INTERVAL_S`): its latency above is that delay, not hidden.*"]
    return L


def _lat(s: dict[str, Any]) -> str:
    if not s["count"]:
        return "— (none)"
    parts = [f"avg {s['avg']:.1f} ms"]
    for p in ("p50", "p95"):
        parts.append(f"{p} {s[p]:.1f} ms" if s.get(p) is not None else f"{p} —")
    return ", ".join(parts)


def report_lines(fig: dict[str, Any]) -> list[str]:
    by = fig["answered_by"]
    b = fig["budget"]
    L = ["**Cost controls** (every request of the run, warm-up included)", "",
         "| Metric | Value |", "|---|---|",
         f"| Answered from the response cache (exact) | {by.get('exact', 0)} of {fig['succeeded']} succeeded "
         f"(hit rate {_pct(fig['hit_rate'])}) |",
         f"| Latency, cache hits | {_ms(fig['latency_exact_ms'])} |"]
    if by.get("semantic"):  # a run with TARS_SEMANTIC_CACHE: its hits apart from the exact ones
        L += [f"| Answered from the semantic cache | {by['semantic']} of {fig['succeeded']} succeeded "
              f"(semantic hit rate {_pct(fig['semantic_hit_rate'])}) |",
              f"| Latency, semantic hits | {_ms(fig['latency_semantic_ms'])} |"]
    L += [
         f"| Latency, model answers | {_ms(fig['latency_model_ms'])} |",
         f"| Spent (every api_calls row) | ${Decimal(fig['spent_usd']):.6f} |",
         f"| Saved by the cache (the calls not made) | ${Decimal(fig['saved_usd']):.6f} |",
         *_saved_rows(fig),
         "| Admitted under mode | " + ", ".join(f"{m} {n}" for m, n in fig["served_mode"].items()) + " |",
         f"| Mode transitions during the run | {fig['transitions']} |"]
    if b["limit_usd"] is not None:
        L += [f"| Budget of tenant {b['tenant']} | ${b['limit_usd']:.6f} per day |",
              f"| Refused for the budget | {b['refused']} ({b['refused_at_submit']} at submit with BudgetExceeded, "
              f"{b['failed_budget']} queued and failed `budget`) |",
              f"| Overspend (spent beyond the budget) | ${Decimal(b['overspend_usd']):.6f} |"]
    L += _savings_rule(fig) + _lanes_lines(fig)
    L += ["", "| Phase | Start (s) | Duration (s) | Mode | Requests | Throughput (req/s) | Error Rate | Model | "
              "Cache Hit Rate |", "|---|---|---|---|---|---|---|---|---|"]
    for p in fig["phases"]:
        tp = "—" if p["throughput"] is None else f"{p['throughput']:.2f}"
        L.append(f"| {p['phase']} | {p['start_s']:.2f} | {p['duration_s']:.2f} | {p['mode']} | {p['requests']} | "
                 f"{tp} | {_pct(p['error_rate'])} | {p['model']} | {_pct(p['cache_hit_rate'])} |")
    L += ["", "*A phase's requests are those sent in it (its error rate, model and cache hit rate are theirs); its "
              "throughput counts the successes that finished in it, ÷ its duration.*", "",
          f"Raw rows: `{fig['file']}` (the fleet's mode transitions, from `mode_changes`)", ""]
    return L
