"""An independent reading of a loadgen report directory: every figure recomputed from the raw
rows (``requests-<run>.jsonl``, ``samples-<run>.jsonl``) and the run's *inputs* in
``report.json`` (its window, concurrency, slots and rate limits — never its aggregates), from
the definitions in the report's Method. It imports nothing from ``loadgen``: the point is a
second implementation that would disagree if ``loadgen/metrics.py`` were wrong.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024 * 1024
UNKNOWN = {"in_flight", "unknown"}
MIN_N = {50: 2, 95: 20, 99: 100}


def nearest_rank(values: list[float], p: int) -> float | None:
    if len(values) < MIN_N[p]:
        return None
    s = np.sort(np.asarray(values, dtype=float))
    rank = -(-p * len(s) // 100)  # ceil(p * n / 100), in integers
    return float(s[max(rank, 1) - 1])


def stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"n": len(values), "avg": float(np.mean(values)) if values else None,
                                    "max": float(np.max(values)) if values else None}
    for p in (50, 95, 99):
        out[f"p{p}"] = nearest_rank(values, p) if values else None
    return out


class Run:
    """One run of a report, recomputed."""

    def __init__(self, doc: dict[str, Any], directory: Path) -> None:
        self.id, self.label, self.level = doc["run_id"], doc["label"], doc["level"]
        self.drive, self.config = doc["drive"], doc["config"]
        lines = (directory / doc["records_file"]).read_text().splitlines()
        self.all = [json.loads(x) for x in lines if x.strip()]
        samples_file = directory / doc.get("samples_file", f"samples-{self.id}.jsonl")
        self.samples = [json.loads(x) for x in samples_file.read_text().splitlines() if x.strip()] \
            if samples_file.exists() else []
        self.ended = self.drive["ended_at"]
        self._population()
        self._figures()

    # --- the population -----------------------------------------------------------------------------

    def _population(self) -> None:
        d = self.drive
        sampled = [r for r in self.all if r.get("sampled", True)]
        w0, w1 = d["window"]
        if d.get("count_bounded") or w1 - w0 < 1.0:
            self.pop, self.pop_name, self.start, self.end = sampled, "whole run", d["started_at"], d["load_end"]
        else:
            self.pop = [r for r in sampled if w0 <= r["origin"] < w1]
            self.pop_name, self.start, self.end = "steady window", w0, w1

    def end_of(self, r: dict[str, Any]) -> float:
        return r["done_at"] if r["done_at"] is not None else self.ended

    # --- every figure -------------------------------------------------------------------------------

    def _figures(self) -> None:
        pop, n = self.pop, len(self.pop)
        f: dict[str, Any] = {"n": n, "run_total": len([r for r in self.all if r.get("sampled", True)])}
        status = Counter(r["status"] for r in pop)
        f["succeeded"], f["failed"], f["unfinished"] = status["succeeded"], status["failed"], status["unfinished"]
        f["error_rate"] = (n - status["succeeded"]) / n if n else 0.0
        f["e2e"] = stats([(self.end_of(r) - r["origin"]) * 1000 for r in pop])
        f["queue"] = stats([(r["started_at"] - r["submitted_at"]) * 1000 for r in pop
                            if r["started_at"] is not None and r["submitted_at"] is not None])
        waits = {id(r): sum(c["ratelimit_wait_ms"] for c in r["calls"]) for r in pop}
        f["rlwait"] = stats([waits[id(r)] for r in pop if r["calls"]])
        f["service"] = stats([(r["finished_at"] - r["started_at"]) * 1000 - waits[id(r)] for r in pop
                              if r["started_at"] is not None and r["finished_at"] is not None
                              and r["status"] != "unfinished"])
        model = [sum(c["latency_ms"] for c in r["calls"] if c["latency_ms"] is not None) for r in pop]
        f["model"] = stats(model)
        done = [r for r in pop if r["done_at"] is not None]
        f["completions"] = len(done)
        if self.drive["kind"] == "closed" and self.drive.get("concurrency"):  # (a jobs run has no client slots)
            by: dict[Any, list[dict]] = defaultdict(list)
            for i, r in enumerate(pop):
                by[r["slot"] if r["slot"] is not None else ("x", i)].append(r)
            spans = busy = refill = 0.0
            for rs in by.values():
                rs.sort(key=lambda r: r["origin"])
                spans += self.end_of(rs[-1]) - rs[0]["origin"]
                busy += sum(self.end_of(r) - r["origin"] for r in rs)
                for a, b in itertools.pairwise(rs):
                    gap = b["origin"] - self.end_of(a)
                    lag = b["origin"] - b["intended_at"] if b["intended_at"] is not None else gap
                    refill += min(max(lag, 0.0), max(gap, 0.0))
            f["span"] = spans / len(by) if by else 0.0
            f["idle"], f["refill"] = 1 - busy / spans, refill / spans
            f["backoff"] = max(spans - busy - refill, 0.0) / spans
        else:
            f["span"] = self.end - self.start
        f["throughput"] = len(done) / f["span"] if f["span"] > 0 else 0.0
        # per priority and per tenant (runs that mix them): completions, their rate over the same span, e2e
        for key in ("priority", "tenant"):
            groups: dict[str, list[dict]] = defaultdict(list)
            for r in pop:
                groups[str(r.get(key))].append(r)
            f[f"by_{key}"] = {k: {"done": sum(1 for r in rs if r["done_at"] is not None),
                                  "e2e": stats([(self.end_of(r) - r["origin"]) * 1000 for r in rs])}
                              for k, rs in groups.items()} if len(groups) > 1 else {}
            for g in f[f"by_{key}"].values():
                g["per_s"] = g["done"] / f["span"] if f["span"] > 0 else 0.0
        prios = sorted({r["priority"] for r in pop if r.get("priority") is not None})
        f["priority_held"] = None
        if len(prios) > 1:
            lo, hi = (stats([(self.end_of(r) - r["origin"]) * 1000 for r in pop if r.get("priority") == p])["p50"]
                      for p in (prios[0], prios[-1]))
            if lo is not None and hi is not None:
                wait = (f["queue"]["avg"] or 0.0) + (f["rlwait"]["avg"] or 0.0)
                f["priority_held"] = (prios[-1], hi, prios[0], lo, hi < lo, wait,
                                      wait / f["e2e"]["avg"] if f["e2e"]["avg"] else 0.0)
        c = self.drive.get("concurrency")
        if self.drive["kind"] == "closed" and c:
            f["clients_ceiling"] = c / (f["e2e"]["avg"] / 1000)
        mean_model = float(np.mean(model)) if model else 0.0
        ceilings: dict[str, float] = {}
        if self.drive["kind"] == "closed" and c and mean_model > 0:
            ceilings["concurrency"] = c / (mean_model / 1000)
        if self.drive["kind"] == "open":
            ceilings["offered rate"] = self.drive["rate_per_s"]
        lim = self.config.get("rate_limits") or {}
        if lim.get("enforced") and n:
            calls, tokens = Counter(), Counter()
            for r in pop:
                for cl in r["calls"]:
                    if cl.get("batch"):  # the batch lane's answers do not pass the fleet's limiter
                        continue
                    calls[cl["tier"]] += 1
                    tokens[cl["tier"]] += cl["input_tokens"] + cl["output_tokens"]
            per_s = lim["utilisation"] / lim["window_s"]
            tiers = [min(lim["tiers"][t]["rpm"] * per_s * n / calls[t],
                         lim["tiers"][t]["tpm"] * per_s * n / tokens[t] if tokens[t] else math.inf)
                     for t in calls if t in lim["tiers"]]
            if tiers:
                ceilings["rate limits"] = min(tiers)
        # worker slots: only the calls a worker made (a batch-lane answer, ``batch``, is the batch runner's)
        slot_model = float(np.mean([sum(c["latency_ms"] for c in r["calls"] if c["latency_ms"] is not None
                                        and not c.get("batch")) for r in pop])) if pop else 0.0
        if self.config.get("fleet_slots") and slot_model > 0:
            ceilings["worker slots"] = self.config["fleet_slots"] / (slot_model / 1000)
        f["mean_model"], f["slot_model"] = mean_model, slot_model
        f["ceilings"] = ceilings
        f["binding"] = min(ceilings, key=ceilings.get) if ceilings else None
        f["efficiency"] = f["throughput"] / ceilings[f["binding"]] if ceilings else None
        calls = [cl for r in pop for cl in r["calls"]]
        f["api_calls"] = len(calls)
        f["retries"] = sum(max(0, len(r["calls"]) - 1) for r in pop)
        f["rl_requests"] = sum(1 for r in pop if any(cl["ratelimit_wait_ms"] > 0 for cl in r["calls"]))
        f["rl_total_s"] = sum(waits.values()) / 1000
        unk = [cl for r in pop if r["status"] in ("succeeded", "failed") for cl in r["calls"]
               if cl["outcome"] in UNKNOWN]
        f["unknown_calls"], f["unknown_usd"] = len(unk), sum((Decimal(cl["cost_usd"]) for cl in unk), Decimal(0))
        used = [r for r in pop if r["tier_used"]]
        f["fallbacks"] = sum(1 for r in used if r["tier_requested"] and r["tier_used"] != r["tier_requested"])
        f["fallback_rate"] = f["fallbacks"] / len(used) if used else 0.0
        f["cost"] = sum((Decimal(cl["cost_usd"]) for cl in calls), Decimal(0))
        f["cost_per_request"] = float(f["cost"] / n) if n else None
        f["tokens_per_request"] = sum(cl["input_tokens"] + cl["output_tokens"] for cl in calls) / n if n else None
        by_tier: dict[str, list] = defaultdict(lambda: [Decimal(0), 0])
        for cl in calls:
            by_tier[cl["tier"]][0] += Decimal(cl["cost_usd"])
            by_tier[cl["tier"]][1] += 1
        f["cost_by_tier"] = dict(by_tier)
        workers = Counter(r["worker"] for r in pop if r["worker"])
        xs = list(workers.values())
        f["workers"] = len(workers)
        f["jain"] = sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs else None
        ran = [r for r in pop if None not in (r["started_at"], r["finished_at"], r["done_at"], r["submitted_at"])
               and r["status"] != "unfinished"]
        if ran:
            m = len(ran)
            e = sum((r["done_at"] - r["origin"]) * 1000 for r in ran) / m
            q = sum((r["started_at"] - r["submitted_at"]) * 1000 for r in ran) / m
            w = sum(waits[id(r)] for r in ran) / m
            mo = sum(sum(cl["latency_ms"] or 0 for cl in r["calls"]) for r in ran) / m
            wk = sum((r["finished_at"] - r["started_at"]) * 1000 - waits[id(r)]
                     - sum(cl["latency_ms"] or 0 for cl in r["calls"]) for r in ran) / m
            f["decomposition"] = [m, e, q, w, mo, wk, e - q - w - mo - wk]
        if self.samples:
            by_t: dict[float, list] = defaultdict(lambda: [0, 0.0])
            for s in self.samples:
                by_t[s["t"]][0] += s["rss"]
                by_t[s["t"]][1] += s["cpu_percent"]
            rss = [v[0] / MIB for _, v in sorted(by_t.items())]
            cpu = [v[1] for _, v in sorted(by_t.items())]
            f["rss_peak"], f["rss_avg"] = max(rss), sum(rss) / len(rss)
            f["cpu_avg"], f["cpu_peak"] = sum(cpu) / len(cpu), max(cpu)
        self.f = f

    def calls_all(self) -> list[dict[str, Any]]:
        """Every API call of the run (warm-up, drain and rows without a sample included)."""
        return [dict(cl, _status=r["status"]) for r in self.all for cl in r["calls"]]


def load(directory: Path) -> tuple[dict[str, Any], list[Run]]:
    doc = json.loads((directory / "report.json").read_text())
    return doc, [Run(run, directory) for sc in doc["scenarios"] for run in sc["runs"]]


# --- reading the Markdown ----------------------------------------------------------------------------


def table_rows(md: str, run_id: str) -> dict[str, str]:
    section = md.split(f"Run id: `{run_id}`", 1)[1].split("**Analysis:**", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| \*\*(.+?)\*\* \| (.+?) \|$", section, re.M)}


def ceiling_rows(md: str, run_id: str) -> dict[str, list[str]]:
    section = md.split(f"Run id: `{run_id}`", 1)[1].split("**What bound the run**", 1)[1].split("*Resources", 1)[0]
    out = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| Ceiling", "|---")):
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def markdown_table(md: str, header_start: str) -> list[list[str]]:
    """Rows of the table whose header line starts with ``header_start`` (cells stripped of **)."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")])
    return rows


NUM = re.compile(r"-?[\d,]*\.?\d+")


def numbers(text: str) -> list[str]:
    return NUM.findall(text.replace("$", ""))


def close(printed: str, value: float | Decimal | None, *, scale: float = 1.0) -> bool:
    """``printed`` (a number as the report prints it) is ``value`` up to the printed rounding."""
    if value is None:
        return printed.strip().startswith("—")
    digits = printed.split(".")[1] if "." in printed else ""
    half = 0.5 * 10 ** -len(digits)
    return abs(float(printed.replace(",", "")) - float(value) * scale) <= half + 1e-9 * abs(float(value) * scale)


# --- jobs (the multi-agent scenario) --------------------------------------------------------------


def job_figures(directory: Path, run_doc: dict[str, Any]) -> dict[str, Any]:
    """The jobs table recomputed from ``jobs-<run>.jsonl`` (times, the template's graph) and the run's
    ``requests-<run>.jsonl`` (each step request's worker and api_calls): not from any aggregate."""
    jobs = [json.loads(x) for x in (directory / run_doc["aggregates"]["jobs"]["file"]).read_text().splitlines()
            if x.strip()]
    reqs = {r["id"]: r for r in (json.loads(x) for x in (directory / run_doc["records_file"]).read_text()
                                 .splitlines() if x.strip())}
    done = [j for j in jobs if j["finished_at"] is not None and j["status"] != "running"]
    lat = [j["finished_at"] - j["submitted_at"] for j in done]

    def step_lat(s):
        return s["finished_at"] - s["submitted_at"]

    def critical(j) -> float:
        finished = [s for s in j["steps"] if s["finished_at"] is not None]
        if not finished:
            return 0.0
        cur = max(finished, key=lambda s: s["finished_at"])
        total = step_lat(cur)
        while True:
            preds = [s for s in finished if s["step"] in j["graph"].get(cur["step"], ())
                     and s["finished_at"] <= cur["submitted_at"]]
            if not preds:
                return total
            cur = max(preds, key=lambda s: s["finished_at"])
            total += step_lat(cur)

    crit = [critical(j) for j in done]
    sums = [sum(step_lat(s) for s in j["steps"] if s["finished_at"] is not None) for j in done]
    by_tier: dict[str, Decimal] = defaultdict(Decimal)
    workers: Counter = Counter()
    for j in jobs:
        for s in j["steps"]:
            r = reqs[s["request_id"]]
            for cl in r["calls"]:
                by_tier[cl["tier"]] += Decimal(cl["cost_usd"])
            if r["worker"]:
                workers[r["worker"]] += 1
    d = run_doc["drive"]
    span = d["ended_at"] - d["started_at"]
    counts = sorted(workers.values())
    mean = sum(counts) / len(counts)
    n = len(jobs)
    total = sum(by_tier.values(), Decimal(0))
    return {"n": n, "lat": stats(lat), "crit": sum(crit) / len(crit), "sums": sum(sums) / len(sums),
            "e2e": sum(lat) / len(lat), "total": total, "per_job": total / n,
            "per_job_by_tier": {t: c / n for t, c in by_tier.items()}, "workers": dict(workers), "span": span,
            "share": (counts[0], counts[-1], mean,
                      math.sqrt(sum((x - mean) ** 2 for x in counts) / len(counts)) / mean)}


def check_jobs(md: str, directory: Path, run_doc: dict[str, Any], problems: list[str]) -> int:
    """Every figure of a run's jobs table against :func:`job_figures`; returns how many were checked."""
    f = job_figures(directory, run_doc)
    marker = f"Raw rows: `{run_doc['aggregates']['jobs']['file']}`"
    section = md.split(marker, 1)[0].rsplit("**Jobs**", 1)[1]
    rows = {r[0]: r[1] for r in markdown_table(section, "| Metric | Value |")}
    checked = 0

    def eq(cell: str, index: int, value, what: str) -> None:
        nonlocal checked
        nums = numbers(cell)
        if value is None:
            ok = "—" in cell
        else:
            ok = len(nums) > index and close(nums[index], value)
        if not ok:
            problems.append(f"jobs {what}: {cell!r} vs recomputed {value}")
        checked += 1

    eq(rows["Jobs"], 0, f["n"], "count")
    lat = rows["Job completion time"]
    for k in ("avg", "p50", "p95", "p99", "max"):
        eq(lat.split(k, 1)[1].removeprefix(" "), 0, f["lat"][k], f"completion {k}")
    eq(rows["Critical path (avg per job)"], 0, f["crit"], "critical path")
    eq(rows["Sum of step latencies (avg per job)"], 0, f["sums"], "sum of step latencies")
    eq(rows["Scheduling overhead (avg end to end minus critical path)"], 0, f["e2e"] - f["crit"], "overhead")
    eq(rows["Parallelism (sum of step latencies ÷ critical path)"], 0, f["sums"] / f["crit"], "parallelism")
    eq(rows["Cost per job"], 0, f["per_job"], "cost per job")
    eq(rows["Cost per job"], 1, f["total"], "total cost")
    for tier, c in f["per_job_by_tier"].items():
        eq(rows[f"Cost per job, {tier}"], 0, c, f"cost per job {tier}")
    lo, hi, mean, cv = f["share"]
    share = rows["Steps per worker"]
    for i, v in enumerate((lo, hi, mean, cv)):
        eq(share, i, v, "steps per worker")
    per = {r[0]: r for r in markdown_table(section, "| Worker | Steps |")}
    for w, count in f["workers"].items():
        eq(per[w][1], 0, count, f"steps of {w}")
        eq(per[w][2], 0, count / f["span"], f"steps per second of {w}")
    if len(per) != len(f["workers"]):
        problems.append(f"jobs: {len(per)} worker rows, recomputed {len(f['workers'])}")
    return checked


# --- cost controls (cache, modes, budgets; the overload-150 phases table) ----------------------------


#: ``answered_by`` of a cache answer at submit.
CACHED = ("exact", "semantic")


def cost_figures(directory: Path, run_doc: dict[str, Any]) -> dict[str, Any]:
    """The cost-control section recomputed from ``requests-<run>.jsonl`` and ``mode-changes-<run>.jsonl``
    (every sampled request of the run; a request's phase is the one it was sent in)."""
    rows = [json.loads(x) for x in (directory / run_doc["records_file"]).read_text().splitlines() if x.strip()]
    changes = [json.loads(x) for x in (directory / run_doc["aggregates"]["cost_controls"]["file"]).read_text()
               .splitlines() if x.strip()]
    drive = run_doc["drive"]
    start, end = drive["started_at"], drive["ended_at"]
    rs = [r for r in rows if r.get("sampled", True)]
    ok = [r for r in rs if r["status"] == "succeeded"]
    hits = [r for r in ok if r.get("answered_by") == "exact"]
    lat = lambda group: [(r["done_at"] - r["origin"]) * 1000 for r in group if r["done_at"] is not None]  # noqa: E731
    f: dict[str, Any] = {"succeeded": len(ok), "hits": len(hits), "hit_rate": len(hits) / len(ok) if ok else None,
                         "lat_hit": lat(hits), "lat_model": lat([r for r in ok if r.get("answered_by") not in CACHED]),
                         "spent": sum(Decimal(r["cost_usd"]) for r in rows),
                         "saved": sum(Decimal(r.get("saved_usd", "0")) for r in rows),
                         "modes": Counter(r.get("served_mode") or "none" for r in rs if r["submitted_at"] is not None),
                         "budget": sum(1 for r in rs if r["reason"] in ("submit_error:BudgetExceeded", "budget"))}
    f.update(_savings(rows, (run_doc.get("config") or {}).get("prices")))
    f["lanes"] = _lanes(rs)
    mode, cuts = "optimal", []
    for c in sorted(changes, key=lambda c: (c["at"], c["seq"])):
        if c["at"] <= start:
            mode = c["to"]
        elif c["at"] < end:
            cuts.append((c["at"], c["to"]))
    bounds = [start] + [a for a, _ in cuts] + [end]
    modes = [mode] + [m for _, m in cuts]
    phases = []
    for a, b, m in zip(bounds, bounds[1:], modes, strict=False):
        if b <= a:
            continue
        sent = [r for r in rs if a <= r["origin"] < b]
        sent_ok = [r for r in sent if r["status"] == "succeeded"]
        done_ok = [r for r in ok if r["done_at"] is not None and a <= r["done_at"] < b]
        phases.append({"start": a - start, "dur": b - a, "mode": m, "n": len(sent), "tp": len(done_ok) / (b - a),
                       "err": sum(1 for r in sent if r["status"] == "failed") / len(sent) if sent else None,
                       "hit": sum(1 for r in sent_ok if r.get("answered_by") in CACHED) / len(sent_ok)
                       if sent_ok else None})
    f["phases"] = phases
    return f


def _at(call: dict[str, Any], price: dict[str, str], *, batch: bool) -> Decimal:
    """A call's tokens times the price of each class ÷ 1e6 (times the batch multiplier for a batch call)."""
    cw1h = call.get("cache_write_1h_tokens", 0)
    usd = (Decimal(call["input_tokens"]) * Decimal(price["input"])
           + Decimal(call["output_tokens"]) * Decimal(price["output"])
           + Decimal(call.get("cache_write_tokens", 0) - cw1h) * Decimal(price["cache_write_5m"])
           + Decimal(cw1h) * Decimal(price["cache_write_1h"])
           + Decimal(call.get("cache_read_tokens", 0)) * Decimal(price["cache_read"])) / Decimal(10**6)
    return usd * Decimal(price["batch_multiplier"]) if batch else usd


def _savings(rows: list[dict[str, Any]], prices: dict[str, dict[str, str]] | None) -> dict[str, Any]:
    """Saved by degradation (succeeded, queued on another tier than requested: its calls at the requested
    tier's price in the same lane, minus their cost) and by batch (batch calls at the interactive price,
    minus their cost); and every call's cost against the stated prices (they are what it was billed at)."""
    if not prices:
        return {"deg": None, "bat": None, "n_deg": 0, "n_bat": 0, "mispriced": []}
    deg = bat = Decimal(0)
    n_deg = n_bat = 0
    mispriced = []
    for r in rows:
        asked, queued, used = r.get("tier_requested"), r.get("tier_queued"), r.get("tier_used")
        # moved by admission (queued elsewhere), or by a worker in a non-optimal mode (below priority 9, on
        # sonnet/opus: the tiers the mode degrades; served_mode is then the mode that moved it)
        moved = bool(asked and queued and used) and (asked != queued or (
            used != queued and asked in ("sonnet", "opus") and r.get("priority") is not None and r["priority"] < 9
            and r.get("served_mode") not in (None, "optimal")))
        if r["status"] == "succeeded" and moved:
            n_deg += 1
            for cl in r["calls"]:
                deg += _at(cl, prices[asked], batch=cl.get("batch", False)) - Decimal(cl["cost_usd"])
        for cl in r["calls"]:
            if abs(_at(cl, prices[cl["tier"]], batch=cl.get("batch", False)) - Decimal(cl["cost_usd"])) > Decimal(
                    "1e-9"):
                mispriced.append((r["id"], cl["tier"], cl["cost_usd"]))
            if cl.get("batch"):
                n_bat += 1
                bat += _at(cl, prices[cl["tier"]], batch=False) - Decimal(cl["cost_usd"])
    return {"deg": deg, "bat": bat, "n_deg": n_deg, "n_bat": n_bat, "mispriced": mispriced}


def _lanes(rs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if not any(r.get("lane") == "batch" for r in rs):
        return None
    out = []
    for lane in ("interactive", "batch"):
        mine = [r for r in rs if (r.get("lane") or "interactive") == lane and r["submitted_at"] is not None]
        calls = [cl for r in mine for cl in r["calls"]]
        usd = sum((Decimal(cl["cost_usd"]) for cl in calls), Decimal(0))
        lat = [(r["done_at"] - r["origin"]) * 1000 for r in mine if r["status"] == "succeeded" and r["done_at"]
               is not None]
        out.append({"lane": lane, "n": len(mine), "ok": sum(1 for r in mine if r["status"] == "succeeded"),
                    "tokens": [sum(cl[k] for cl in calls) for k in ("input_tokens", "cache_write_tokens",
                                                                     "cache_read_tokens", "output_tokens")],
                    "usd": usd, "per": usd / len(mine) if mine else None, "lat": stats(lat)})
    i, b = out
    ratio = b["per"] / i["per"] if b["per"] is not None and i["per"] else None
    return [*out, ratio]


def check_cost(md: str, directory: Path, run_doc: dict[str, Any], problems: list[str]) -> int:
    """Every figure of a run's cost-control section against :func:`cost_figures`."""
    f = cost_figures(directory, run_doc)
    marker = f"Raw rows: `{run_doc['aggregates']['cost_controls']['file']}`"
    section = md.split(marker, 1)[0].rsplit("**Cost controls**", 1)[1]
    rows = {r[0]: r[1] for r in markdown_table(section, "| Metric | Value |")}
    checked = 0

    def eq(cell: str, index: int, value, what: str, scale: float = 1.0) -> None:
        nonlocal checked
        nums = numbers(cell)
        ok = ("—" in cell) if value is None else (len(nums) > index and close(nums[index], value, scale=scale))
        if not ok:
            problems.append(f"cost controls {what}: {cell!r} vs recomputed {value}")
        checked += 1

    hits = rows["Answered from the response cache (exact)"]
    eq(hits, 0, f["hits"], "hits")
    eq(hits, 1, f["succeeded"], "succeeded")
    eq(hits.split("hit rate", 1)[1], 0, f["hit_rate"], "hit rate", 100)
    for key, vals in (("Latency, cache hits", f["lat_hit"]), ("Latency, model answers", f["lat_model"])):
        if vals:
            eq(rows[key], 0, float(np.mean(vals)), f"{key} avg")
            eq(rows[key], 2, nearest_rank(vals, 50), f"{key} p50")  # (the "50" of "p50" is number 1)
    eq(rows["Spent (every api_calls row)"], 0, f["spent"], "spent")
    eq(rows["Saved by the cache (the calls not made)"], 0, f["saved"], "saved")
    printed = dict(re.findall(r"(\w+) (\d+)", rows["Admitted under mode"]))
    if {k: int(v) for k, v in printed.items()} != dict(f["modes"]):
        problems.append(f"cost controls modes: {printed} vs recomputed {dict(f['modes'])}")
    checked += 1
    if "Refused for the budget" in rows:
        eq(rows["Refused for the budget"], 0, f["budget"], "budget refusals")
    if f["deg"] is not None:
        prefix = lambda p: next(v for k, v in rows.items() if k.startswith(p))  # noqa: E731
        eq(prefix("Saved by degradation"), 0, f["deg"], "saved by degradation")
        eq(next(k for k in rows if k.startswith("Saved by degradation")), 0, f["n_deg"], "degraded requests")
        eq(prefix("Saved by the batch lane"), 0, f["bat"], "saved by batch")
        eq(next(k for k in rows if k.startswith("Saved by the batch lane")), 0, f["n_bat"], "batch calls")
        printed = {r[0]: r[1:] for r in markdown_table(section, "| Tier | Model |")}
        for tier, p in run_doc["config"]["prices"].items():
            want = [p["model"], p["input"], p["output"], p["cache_write_5m"], p["cache_write_1h"], p["cache_read"],
                    p["batch_multiplier"]]
            if printed.get(tier) != want:
                problems.append(f"cost controls prices of {tier}: {printed.get(tier)} vs the run's {want}")
            checked += 1
        if f["mispriced"]:
            problems.append(f"cost controls: {len(f['mispriced'])} call(s) not billed at the stated prices, "
                            f"e.g. {f['mispriced'][:3]}")
    if f["lanes"] is not None:
        *lanes, ratio = f["lanes"]
        table = {r[0]: r for r in markdown_table(section, "| Lane |")}
        for ln in lanes:
            row = table[ln["lane"]]
            for cell, value, what in ((row[1], ln["n"], "requests"), (row[2], ln["ok"], "succeeded"),
                                      *((row[3 + k], v, f"tokens {k}") for k, v in enumerate(ln["tokens"])),
                                      (row[7], ln["usd"], "dollars"), (row[8], ln["per"], "dollars per request")):
                eq(cell, 0, value, f"lane {ln['lane']} {what}")
            if ln["lat"]["n"]:
                eq(row[9].split("avg", 1)[1], 0, ln["lat"]["avg"], f"lane {ln['lane']} latency avg")
                for k in ("p50", "p95"):
                    eq(row[9].split(k, 1)[1], 0, ln["lat"][k], f"lane {ln['lane']} latency {k}")
        line = next(x for x in section.splitlines() if x.startswith("Batch ÷ interactive dollars per request"))
        eq(line.split("request", 1)[1], 0, ratio, "batch / interactive ratio")
    table = markdown_table(section, "| Phase |")
    if len(table) != len(f["phases"]):
        problems.append(f"cost controls: {len(table)} phases, recomputed {len(f['phases'])}")
    for row, p in zip(table, f["phases"], strict=False):
        eq(row[1], 0, p["start"], "phase start")
        eq(row[2], 0, p["dur"], "phase duration")
        if row[3] != p["mode"]:
            problems.append(f"cost controls phase mode {row[3]} vs {p['mode']}")
        eq(row[4], 0, p["n"], "phase requests")
        eq(row[5], 0, p["tp"], "phase throughput")
        eq(row[6], 0, p["err"], "phase error rate", 100)
        eq(row[8], 0, p["hit"], "phase cache hit rate", 100)
    return checked
