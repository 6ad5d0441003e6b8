"""The independent check: every figure of a generated report is recomputed from its JSONL rows by
tests/loadgen/recompute.py (which shares no code with loadgen/metrics.py) and compared with
what the Markdown prints — no difference beyond the printed rounding. Run on a session of the
embedded default (closed loops, an open loop, a sweep and the rate-limit scenario's mix of priorities and
tenants, with injected failures) and on a
local fleet with real workers, Redis, Postgres and a binding rate limit (tests/loadgen/test_report.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.loadgen.recompute import (
    Run,
    ceiling_rows,
    check_cost,
    check_jobs,
    close,
    load,
    markdown_table,
    numbers,
    table_rows,
)

TARS = str(Path(sys.executable).with_name("tars"))
CEILING_NAMES = {"concurrency", "offered rate", "rate limits", "worker slots"}


def _check(cond: bool, what: str, problems: list[str]) -> None:
    if not cond:
        problems.append(what)


def check_single_run(md: str, run: Run, problems: list[str]) -> int:
    """Every figure of a single run's Results, ceilings and resources tables and its decomposition."""
    f, t, checked = run.f, table_rows(md, run.id), 0

    def eq(row: str, value, *, index: int = 0, scale: float = 1.0) -> None:
        nonlocal checked
        nums = numbers(t[row])
        _check(bool(nums) and close(nums[index], value, scale=scale), f"{run.label}: {row} = {t[row]!r}, "
               f"recomputed {value}", problems)
        checked += 1

    def pct_of(row: str, value, index: int) -> None:
        eq(row, value, index=index, scale=100)

    eq("Requests", f["n"])
    for row, key in (("Successful", "succeeded"), ("Failed", "failed"), ("Unfinished", "unfinished")):
        eq(row, f[key])
        pct_of(row, f[key] / f["n"] if f["n"] else None, 1)
    eq("Avg Response Time", f["e2e"]["avg"])
    eq("Max Response Time", f["e2e"]["max"])
    for p in ("p50", "p95", "p99"):
        row = f"{p} Response Time"
        if f["e2e"][p] is None:
            _check(t[row].startswith("—") and f"{p} needs ≥" in t[row], f"{run.label}: {row} {t[row]!r}", problems)
            checked += 1
        else:
            eq(row, f["e2e"][p])
    for row, key in (("Queue Wait (avg / p99)", "queue"), ("Rate-Limit Wait (avg / p99)", "rlwait"),
                     ("Service Time excl. Rate-Limit Waits (avg / p99)", "service"),
                     ("Model Call Time (avg / p99)", "model")):
        avg_s, p99_s = (x.strip() for x in t[row].split("/"))
        _check(close(numbers(avg_s)[0], f[key]["avg"]) if f[key]["avg"] is not None else avg_s == "—",
               f"{run.label}: {row} avg {avg_s} vs {f[key]['avg']}", problems)
        _check(close(numbers(p99_s)[0], f[key]["p99"]) if f[key]["p99"] is not None else p99_s.startswith("—"),
               f"{run.label}: {row} p99 {p99_s} vs {f[key]['p99']}", problems)
        checked += 2
    eq("Throughput", f["throughput"])
    eq("Throughput", f["completions"], index=1)
    eq("Throughput", f["span"], index=2)
    if run.drive["kind"] == "closed" and run.drive.get("concurrency"):
        eq("C ÷ Avg Response Time", f["clients_ceiling"])
        pct_of("C ÷ Avg Response Time", f["throughput"] / f["clients_ceiling"], 1)
        pct_of("C ÷ Avg Response Time", f["idle"], 2)
        pct_of("C ÷ Avg Response Time", f["refill"], 3)
        pct_of("C ÷ Avg Response Time", f["backoff"], 4)
        # the identity the table promises: throughput <= C / average response time, as printed
        thr, ceiling = (float(numbers(t[r])[0].replace(",", "")) for r in ("Throughput", "C ÷ Avg Response Time"))
        _check(thr <= ceiling, f"{run.label}: throughput {thr} above C / avg {ceiling}", problems)
    elif run.drive["kind"] == "open":
        eq("Offered Rate", run.drive["rate_per_s"])
    name = t["Bound by"].split(" — ")[0]
    _check(name == f["binding"], f"{run.label}: bound by {name!r}, recomputed {f['binding']!r}", problems)
    eq("Bound by", f["ceilings"][f["binding"]])
    pct_of("Bound by", f["efficiency"], 1)
    pct_of("Error Rate", f["error_rate"], 0)
    eq("Retries", f["retries"])
    eq("Retries", f["api_calls"], index=1)
    eq("Rate-Limited Requests", f["rl_requests"])
    eq("Rate-Limited Requests", f["n"], index=1)
    eq("Rate-Limited Requests", f["rl_total_s"], index=2)
    eq("Attempts with Unknown Outcome", f["unknown_calls"])
    eq("Attempts with Unknown Outcome", f["unknown_usd"], index=1)
    eq("Fallbacks", f["fallbacks"])
    pct_of("Fallbacks", f["fallback_rate"], 1)
    eq("Tokens per Request", f["tokens_per_request"])
    eq("Cost", f["cost"])
    eq("Cost", f["cost_per_request"], index=1)
    for tier, (cost, calls) in f["cost_by_tier"].items():
        part = next(p for p in t["Cost by Tier"].split(", ") if p.startswith(f"{tier} "))
        _check(close(numbers(part)[0], cost) and int(numbers(part)[1]) == calls, f"{run.label}: {part}", problems)
        checked += 1
    if f["workers"]:
        eq("Workers Used", f["workers"])
        eq("Workers Used", f["jain"], index=1)
    # the ceilings table
    rows = ceiling_rows(md, run.id)
    for name, value in f["ceilings"].items():
        how, val, ratio = rows[name]
        _check(close(numbers(val)[0], value) and close(numbers(ratio)[0], f["throughput"] / value, scale=100),
               f"{run.label}: ceiling {name} {val} {ratio} vs {value}", problems)
        if name in ("concurrency", "worker slots"):
            model = f["mean_model"] if name == "concurrency" else f["slot_model"]
            _check(close(numbers(how.split("(")[0])[-1], model), f"{run.label}: {name} mean model {how}", problems)
        checked += 2
    for name in CEILING_NAMES - set(f["ceilings"]) - {"offered rate", "concurrency"}:
        _check(rows[name][1] == "—", f"{run.label}: ceiling {name} should be — here: {rows[name]}", problems)
    _check(rows["binding"][0] == f["binding"], f"{run.label}: binding row {rows['binding']}", problems)
    # resources
    if "rss_peak" in f:
        eq("Peak Memory (RSS)", f["rss_peak"])
        eq("Average Memory (RSS)", f["rss_avg"])
        eq("CPU (avg / peak)", f["cpu_avg"])
        eq("CPU (avg / peak)", f["cpu_peak"], index=1)
    # the per-priority and per-tenant lines of the analysis, and whether priority held
    section = md.split(f"Run id: `{run.id}`", 1)[1].split("\n---\n", 1)[0]
    for key in ("priority", "tenant"):
        line = next((x for x in section.splitlines() if x.startswith(f"- By {key} — ")), None)
        _check((line is not None) == bool(f[f"by_{key}"]), f"{run.label}: by {key} line {line!r}", problems)
        for k, g in f[f"by_{key}"].items():
            part = line.split(f"{key} {k}: ", 1)[1].split(f"; {key} ", 1)[0] if line and f"{key} {k}: " in line else ""
            for cell, value in ((part, g["done"]), (part.split("done,", 1)[-1], g["per_s"]),
                                (part.split("p50", 1)[-1], g["e2e"]["p50"]), (part.split("p99", 1)[-1],
                                                                               g["e2e"]["p99"])):
                ok = (cell.lstrip().startswith("—") and "needs ≥" in cell) if value is None else \
                    bool(numbers(cell)) and close(numbers(cell)[0], value)
                _check(ok, f"{run.label}: by {key} {k}: {cell!r} vs recomputed {value}", problems)
                checked += 1
    held = next((x for x in section.splitlines() if x.startswith("- Priority ")), None)
    _check((held is not None) == (f["priority_held"] is not None), f"{run.label}: priority line {held!r}", problems)
    if held and f["priority_held"]:
        hi, hi_p50, lo, lo_p50, ok, wait, share = f["priority_held"]
        nums = numbers(held)  # priority, 50 (of "p50"), its p50, priority, 50, its p50[, wait, its share]
        if share < 0.10:  # too little waiting for priority to matter: no verdict, the waits instead
            verdict = "not put to the test" in held and len(nums) >= 8 and close(nums[6], wait) \
                and close(nums[7], share, scale=100)
        else:
            verdict = held.startswith("- Priority held" if ok else "- Priority did NOT hold")
        _check(verdict and len(nums) >= 6 and close(nums[0], hi) and close(nums[2], hi_p50) and close(nums[3], lo)
               and close(nums[5], lo_p50), f"{run.label}: {held!r} vs {f['priority_held']}", problems)
        checked += 1
    # the decomposition bullet of the analysis
    if "decomposition" in f:
        section = md.split(f"Run id: `{run.id}`", 1)[1].split("\n---\n", 1)[0]
        bullet = next(line for line in section.splitlines() if line.startswith("- Where the "))
        nums = numbers(bullet)
        m, e, q, w, mo, wk, dl = f["decomposition"]
        for printed, value in zip(nums, (e, m, q, w, mo, wk, dl), strict=True):
            _check(close(printed, value), f"{run.label}: decomposition {printed} vs {value}", problems)
            checked += 1
    return checked


def check_report(directory: Path) -> dict[str, int]:
    """Recompute every figure of the report in ``directory``; returns what was checked. Fails
    listing every figure that differs beyond rounding."""
    md = (directory / "report.md").read_text()
    doc, runs = load(directory)
    problems: list[str] = []
    checked = 0
    by_id = {r.id: r for r in runs}
    for sc in doc["scenarios"]:
        if sc["sweep"]:
            axis = sc["sweep"]["axis"]
            head = "| Worker Processes |" if axis == "workers" else f"| {axis.capitalize()} |"
            table = {row[0]: row for row in markdown_table(md.split("### Scenario", 1)[1].split(sc["title"], 1)[1],
                                                           head)}
            for run_doc in sc["runs"]:
                run = by_id[run_doc["run_id"]]
                row = table[f"{run.level:g}"]
                f = run.f
                if axis == "workers":
                    expect = [f["n"], f["throughput"], None, f["e2e"]["p99"], f["cost_per_request"]]
                    cells = [row[2], row[3], None, row[5], row[6]]
                else:
                    expect = [f["n"], f["throughput"], f["e2e"]["avg"], f["e2e"]["p50"], f["e2e"]["p95"],
                              f["e2e"]["p99"], 1 - f["error_rate"], f["efficiency"]]
                    cells = [row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[9]]
                    _check(row[8] == f["binding"], f"{run.label}: sweep bound by {row[8]}", problems)
                for k, (cell, value) in enumerate(zip(cells, expect, strict=True)):
                    if cell is None:
                        continue
                    scale = 100 if (axis != "workers" and k in (6, 7)) else 1
                    _check(close(numbers(cell)[0] if numbers(cell) else cell, value, scale=scale),
                           f"{run.label}: sweep cell {cell!r} vs {value}", problems)
                    checked += 1
        else:
            checked += check_single_run(md, by_id[sc["runs"][0]["run_id"]], problems)
    # the jobs tables (the multi-agent scenario)
    for sc in doc["scenarios"]:
        for run_doc in sc["runs"]:
            if run_doc["aggregates"].get("jobs"):
                checked += check_jobs(md, directory, run_doc, problems)
            if run_doc["aggregates"].get("cost_controls") and not sc["sweep"]:
                checked += check_cost(md, directory, run_doc, problems)
    # the executive summary's table: one row per run
    for row in markdown_table(md, "| Run | Load | Population |"):
        run = next(r for r in runs if r.label == row[0])
        f = run.f
        _check(row[2] == run.pop_name, f"summary {row[0]}: population {row[2]}", problems)
        for cell, value, scale in ((row[3], f["n"], 1), (row[4], f["throughput"], 1), (row[5], f["e2e"]["p50"], 1),
                                   (row[6], f["e2e"]["p99"], 1), (row[7], f["error_rate"], 100),
                                   (row[9], f["efficiency"], 100)):
            _check(close(numbers(cell)[0] if numbers(cell) else cell, value, scale=scale),
                   f"summary {row[0]}: {cell!r} vs {value}", problems)
            checked += 1
        _check(row[8] == f["binding"], f"summary {row[0]}: bound by {row[8]}", problems)
        _check(row[10] == ("yes" if not run_invalid(doc, run.id) else "NO"), f"summary {row[0]}: valid", problems)
    # the cost analysis: every call of every run, by tier
    tiers: dict[str, list] = {}
    for run in runs:
        for cl in run.calls_all():
            acc = tiers.setdefault(cl["tier"], [0, 0, 0, 0.0, 0, 0.0, 0, 0])
            acc[0] += 1
            acc[1] += cl["input_tokens"]
            acc[2] += cl["output_tokens"]
            acc[3] += float(cl["cost_usd"])
            if cl["outcome"] in ("in_flight", "unknown") and cl["_status"] in ("succeeded", "failed"):
                acc[4] += 1
                acc[5] += float(cl["cost_usd"])
            acc[6] += cl.get("cache_write_tokens", 0)
            acc[7] += cl.get("cache_read_tokens", 0)
    cost_rows = {row[0]: row for row in markdown_table(md, "| Tier | API Calls |")}
    for tier, (calls, tin, tout, cost, ucalls, ucost, cw, cr) in tiers.items():
        row = cost_rows[tier]
        for cell, value in ((row[1], calls), (row[2], tin), (row[3], tout), (row[4], cost), (row[7], ucalls),
                            (row[8], cw), (row[9], cr)):
            _check(close(numbers(cell)[0], value), f"cost {tier}: {cell!r} vs {value}", problems)
            checked += 1
        _check(close(numbers(row[7])[1], ucost), f"cost {tier}: unknown {row[7]!r} vs {ucost}", problems)
    assert not problems, f"{len(problems)} figure(s) differ:\n" + "\n".join(problems)
    return {"runs": len(runs), "figures": checked}


def run_invalid(doc: dict, run_id: str) -> bool:
    return not next(r for sc in doc["scenarios"] for r in sc["runs"] if r["run_id"] == run_id)["aggregates"]["valid"]


@pytest.fixture(scope="module")
def embedded_report(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("embedded-report")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env.update(XDG_DATA_HOME=str(cwd / ".data"), TARS_SIM_LATENCY="uniform:20:200", TARS_SIM_FAILURE_RATE="0.1")
    res = subprocess.run([TARS, "loadgen", "run", "baseline", "concurrent-10", "open", "degradation", "--levels", "2,8",
                          "rate-limit",
                          "--time-scale", "0.4", "--allow-invalid"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (session,) = [p for p in (cwd / "reports").iterdir() if p.is_dir()]
    return session


def test_every_figure_of_an_embedded_default_report_is_recomputed_from_its_rows(embedded_report):
    got = check_report(embedded_report)
    assert got["runs"] == 6 and got["figures"] > 200, got
    print(f"recomputed {got['figures']} figures of {got['runs']} runs: no difference beyond rounding")
