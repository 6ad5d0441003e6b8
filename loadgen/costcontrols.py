"""The cost-control figures of a run: the response cache (hit rate, hit vs model latency, dollars
saved), the modes requests were admitted under, budget refusals, and the phases table (the seed's
scenario 11: phase, duration, mode, throughput, error rate, model, cache hit rate) rebuilt from the
fleet's ``mode_changes`` rows.

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
from loadgen.records import RequestRecord

BUDGET_REFUSED_CLIENT = "submit_error:BudgetExceeded"
#: ``answered_by`` of the answers the response cache gave at submit (exact, then semantic).
CACHE_ANSWERS = ("exact", "semantic")
BUDGET_REASON = "budget"


def _latency_ms(r: RequestRecord) -> float:
    assert r.done_at is not None
    return (r.done_at - r.origin) * 1000


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
            end: float, budget_usd: float | None = None, tenant: str | None = None) -> dict[str, Any]:
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
         "| Admitted under mode | " + ", ".join(f"{m} {n}" for m, n in fig["served_mode"].items()) + " |",
         f"| Mode transitions during the run | {fig['transitions']} |"]
    if b["limit_usd"] is not None:
        L += [f"| Budget of tenant {b['tenant']} | ${b['limit_usd']:.6f} per day |",
              f"| Refused for the budget | {b['refused']} ({b['refused_at_submit']} at submit with BudgetExceeded, "
              f"{b['failed_budget']} queued and failed `budget`) |",
              f"| Overspend (spent beyond the budget) | ${Decimal(b['overspend_usd']):.6f} |"]
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
