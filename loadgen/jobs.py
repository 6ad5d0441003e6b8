"""The multi-agent scenario: real jobs (``research-write-validate`` by default) driven in a closed loop.

The driver keeps ``concurrency`` jobs in flight until ``count`` were submitted, then waits for all
of them. Every step is an ordinary request with the run's ``run_id``, so the request-level tables
of the report are computed as for any run (one sample per step request, from its row: queued →
finished). :func:`job_figures` adds the seed's scenario-6 figures over the jobs; ``jobs-<run>.jsonl``
holds one line per job (its steps, their times, workers and the template's graph) for the
independent recomputation (tests/loadgen/recompute.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loadgen.drivers import ClientSample, DriveResult
from loadgen.records import DbRow

REJECT = '<<sim-answer:{"valid": false, "problems": ["simulated: cite your sources"]}>>'
TOPICS = ("the physics", "the history", "the open questions", "the measurements", "the controversies")


def job_input(i: int, *, seed: int, reject_share: float) -> dict[str, Any]:
    """Job *i*'s input: three topics; a seeded share of them get one rejection from the validator."""
    rng = random.Random(seed * 7_000_003 + i)
    return {"question": f"[{i}] What is known about topic {i}?", "topics": rng.sample(TOPICS, 3),
            "reviewer_notes": [REJECT] if rng.random() < reject_share else []}


def drive_jobs(*, client, template: str, count: int, concurrency: int, run_id: str, seed: int,
               reject_share: float, timeout_s: float, on_progress: Callable | None = None) -> tuple[list[str], float,
                                                                                                   float, int]:
    """Submit ``count`` jobs, ``concurrency`` at a time; returns (job ids, start, end, unfinished)."""
    from tars_tasks.jobs.tables import JOB_RUNNING, Job

    jobs = Job.__table__.c
    ids: list[str] = []
    pending: set[str] = set()
    start = time.time()
    deadline = time.monotonic() + timeout_s
    while (len(ids) < count or pending) and time.monotonic() < deadline:
        while len(ids) < count and len(pending) < concurrency:
            h = client.submit_job(template=template, input=job_input(len(ids), seed=seed, reject_share=reject_share),
                                  tenant="loadgen", run_id=run_id)
            ids.append(h.id)
            pending.add(h.id)
        time.sleep(0.05)
        with client.engine.connect() as conn:
            running = set(conn.execute(select(jobs.id).where(jobs.id.in_(list(pending)),
                                                             jobs.status == JOB_RUNNING)).scalars())
        pending = running
        if on_progress is not None:
            on_progress(len(ids), len(ids) - len(pending))
    return ids, start, time.time(), len(pending)


def samples_from_rows(rows: Mapping[str, DbRow]) -> list[ClientSample]:
    """One sample per step request: sent when its row was queued, done when it finished."""
    out = []
    for r in rows.values():
        done = r.finished_at if r.status in ("succeeded", "failed") else None
        out.append(ClientSample(request_id=r.id, intended_at=r.submitted_at, send_start=r.submitted_at,
                                sent_at=r.submitted_at, done_at=done, status=r.status if done else None,
                                done_via="row"))
    return out


def drive_result(*, rows: Mapping[str, DbRow], start: float, end: float, concurrency: int,
                 unfinished: int) -> DriveResult:
    return DriveResult(kind="closed", samples=samples_from_rows(rows), started_at=start, window=(start, end),
                       load_end=end, ended_at=end, concurrency=None, count_bounded=True, unfinished=unfinished,
                       extra={"jobs_concurrency": concurrency})


#: The samples a completion-time percentile needs (the report's rule: p50 2, p95 20, p99 100).
MIN_N = {50: 2, 95: 20, 99: 100}


def nearest_rank(values: Sequence[float], p: int, *, min_n: int) -> float | None:
    if len(values) < min_n:
        return None
    s = sorted(values)
    return s[max(math.ceil(p * len(s) / 100), 1) - 1]


def job_lines(views) -> list[dict[str, Any]]:
    """What ``jobs-<run>.jsonl`` holds: per job its times and steps, and the template's graph."""
    out = []
    for j in views:
        graph = {s.name: sorted(set(s.after) | {v.name for v in j.definition.steps if v.revises == s.name})
                 for s in j.definition.steps} if j.definition else {}
        out.append({"id": j.id, "status": j.status, "submitted_at": j.submitted_at.timestamp(),
                    "finished_at": j.finished_at.timestamp() if j.finished_at else None, "graph": graph,
                    "steps": [{"label": s.label, "step": s.step, "request_id": s.request_id, "status": s.status,
                               "worker": s.worker, "tier": s.tier,
                               "submitted_at": s.submitted_at.timestamp(),
                               "finished_at": s.finished_at.timestamp() if s.finished_at else None}
                              for s in j.steps]})
    return out


def job_figures(views, *, run_start: float, run_end: float, workers: int | None) -> dict[str, Any]:
    """The scenario-6 table: completion time, steps per worker per second, critical path vs the sum of
    step latencies, cost per job by tier, and how evenly the worker processes shared the steps."""
    done = [j for j in views if j.done]
    lat = [j.latency_s for j in done if j.latency_s is not None]
    crit = [j.critical_path_s() for j in done]
    sums = [j.step_latency_sum_s() for j in done]
    steps = [s for j in views for s in j.steps]
    ran = [s for s in steps if s.worker]
    by_worker = Counter(s.worker for s in ran)
    span = max(run_end - run_start, 1e-9)
    cost_by_tier: dict[str, Decimal] = defaultdict(Decimal)
    for j in views:
        for tier, c in j.cost_by_tier.items():
            cost_by_tier[tier] += c
    total = sum((j.cost_usd for j in views), Decimal(0))
    n = len(views)
    per_worker = sorted(by_worker.values())
    mean = sum(per_worker) / len(per_worker) if per_worker else 0
    cv = (math.sqrt(sum((x - mean) ** 2 for x in per_worker) / len(per_worker)) / mean) if mean else None
    statuses = Counter(j.status for j in views)
    return {
        "jobs": n, "by_status": dict(statuses), "template": views[0].template if views else None,
        "completion_s": {"n": len(lat), "avg": sum(lat) / len(lat) if lat else None,
                         "p50": nearest_rank(lat, 50, min_n=MIN_N[50]),
                         "p95": nearest_rank(lat, 95, min_n=MIN_N[95]), "p99": nearest_rank(lat, 99, min_n=MIN_N[99]),
                         "max": max(lat) if lat else None},
        "steps": len(steps), "steps_ran": len(ran), "steps_cancelled": sum(s.failure_reason == "cancelled"
                                                                           for s in steps),
        "revisions": sum(s.revision > 0 and j.definition is not None and j.definition.validator_of(s.step) is not None
                         for j in views for s in j.steps),
        "span_s": span,
        "steps_per_worker": dict(sorted(by_worker.items())),
        "workers_seen": len(by_worker), "workers_expected": workers,
        "steps_per_worker_per_s": {w: c / span for w, c in sorted(by_worker.items())},
        "share": {"min": per_worker[0] if per_worker else None, "max": per_worker[-1] if per_worker else None,
                  "mean": mean, "cv": cv},
        "critical_path_s": {"avg": sum(crit) / len(crit) if crit else None},
        "step_latency_sum_s": {"avg": sum(sums) / len(sums) if sums else None},
        "e2e_s": {"avg": sum(lat) / len(lat) if lat else None},
        "cost_usd": {"total": str(total), "per_job": str(total / n) if n else None,
                     "by_tier": {t: str(c) for t, c in sorted(cost_by_tier.items())},
                     "per_job_by_tier": {t: str(c / n) for t, c in sorted(cost_by_tier.items())} if n else {}},
    }


def write_jobs_file(out_dir: Path, run_id: str, views) -> str:
    name = f"jobs-{run_id}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / name).open("w") as fh:
        for line in job_lines(views):
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
    return name


def check_figures(fig: Mapping[str, Any]) -> list[str]:
    """Why the run is invalid (empty: valid): nothing finished, or the figures do not add up."""
    bad = []
    if not fig["jobs"] or not fig["completion_s"]["n"]:
        bad.append("no job finished")
    if sum(fig["steps_per_worker"].values()) != fig["steps_ran"]:
        bad.append("steps per worker do not add up to the steps that ran")
    if Decimal(fig["cost_usd"]["total"]) != sum((Decimal(c) for c in fig["cost_usd"]["by_tier"].values()),
                                                Decimal(0)):
        bad.append("cost by tier does not add up to the total")
    if fig["by_status"].get("running"):
        bad.append(f"{fig['by_status']['running']} job(s) still running when the run ended")
    return bad


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"



def _pct_s(c: Mapping[str, Any], p: int) -> str:
    """A completion-time percentile, or "—" with the reason it was withheld."""
    v, n = c[f"p{p}"], c["n"]
    if v is not None or not n:
        return _s(v)
    return f"— ({n} sample{'s' if n != 1 else ''}; p{p} needs ≥ {MIN_N[p]})"


def report_lines(fig: Mapping[str, Any]) -> list[str]:
    """The jobs section of a run (the seed's scenario-6 table, with the figures it is made of)."""
    c = fig["completion_s"]
    n = fig["jobs"]
    share = fig["share"]
    crit, sums, e2e = fig["critical_path_s"]["avg"], fig["step_latency_sum_s"]["avg"], fig["e2e_s"]["avg"]
    status = ", ".join(f"{k} {v}" for k, v in sorted(fig["by_status"].items()))
    lines = [f"**Jobs** (`{fig['template']}`; population: every job of the run, {n}; its steps are the requests "
             "above):", "",
             "| Metric | Value |", "|---|---|",
             f"| Jobs | {n} ({status}) |",
             f"| Steps | {fig['steps']} ({fig['steps_ran']} ran on a worker, {fig['steps_cancelled']} cancelled; "
             f"{fig['revisions']} revision(s) sent back by a validator) |",
             f"| Job completion time | avg {_s(c['avg'])}, p50 {_pct_s(c, 50)}, p95 {_pct_s(c, 95)}, "
             f"p99 {_pct_s(c, 99)}, max {_s(c['max'])} (n={c['n']}) |",
             f"| Critical path (avg per job) | {_s(crit)} |",
             f"| Sum of step latencies (avg per job) | {_s(sums)} |",
             f"| Scheduling overhead (avg end to end minus critical path) | "
             f"{_s(None if e2e is None or crit is None else e2e - crit)} |",
             f"| Parallelism (sum of step latencies ÷ critical path) | "
             f"{'—' if not crit or sums is None else f'{sums / crit:.2f}'} |",
             f"| Cost per job | ${Decimal(fig['cost_usd']['per_job'] or 0):.6f} (total "
             f"${Decimal(fig['cost_usd']['total']):.6f}) |"]
    for tier, cost in fig["cost_usd"]["per_job_by_tier"].items():
        lines.append(f"| Cost per job, {tier} | ${Decimal(cost):.6f} |")
    cv = share["cv"]
    lines += [f"| Worker processes that ran steps | {fig['workers_seen']} of {fig['workers_expected']} |",
              f"| Steps per worker | min {share['min']}, max {share['max']}, mean {share['mean']:.1f}, "
              f"coefficient of variation {'—' if cv is None else f'{cv:.2f}'} |", "",
              "| Worker | Steps | Steps per second (over the run's " + f"{fig['span_s']:.2f} s) |", "|---|---|---|"]
    for w, count in fig["steps_per_worker"].items():
        lines.append(f"| {w} | {count} | {fig['steps_per_worker_per_s'][w]:.2f} |")
    lines += ["", "*Job completion time: job submitted → its last step recorded. A step's latency: its request "
              "queued → finished (queue wait included). Critical path: from the last step to finish back through "
              "the latest-finishing step each could have waited for. Cost: the sum of the job's requests' "
              "api_calls; per job = total ÷ jobs. Raw rows: `" + fig["file"] + "`.*"]
    return lines
