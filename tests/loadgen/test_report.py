"""A multi-scenario session on a real fleet: its report renders, its plots are PNGs, and every
figure in it is recomputed here — independently, with numpy and SQL — from the stored rows:
the ``requests`` rows of each run and the generator timings kept in its ``runs`` row."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from decimal import Decimal

import numpy as np
import psycopg
import pytest
import redis as redis_lib
from sqlalchemy import text

from loadgen.report import write_report
from loadgen.runner import Runner
from loadgen.scenarios import Scenario
from tars_tasks.db.engine import get_engine
from tests.helpers import ROOT, make_settings

pytestmark = pytest.mark.integration

SCENARIOS = [
    Scenario(name="closed-5", title="Closed loop at 5", concurrency=5, duration_s=2, warmup_s=0.5, workers=2,
             worker_concurrency=20),
    Scenario(name="sweep", title="Sweep 2 and 6", kind="sweep", levels=(2, 6), duration_s=1.5, warmup_s=0.3,
             workers=2, worker_concurrency=20),
    Scenario(name="open-20", title="Open loop at 20/s", kind="open", rate_per_s=20, arrival="poisson", seed=3,
             duration_s=2, warmup_s=0.5, workers=2, worker_concurrency=20),
]


@pytest.fixture(scope="module")
def session(pg_url, redis_url, tmp_path_factory):
    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    with get_engine(pg_url).begin() as conn:
        conn.execute(text("TRUNCATE api_calls, requests, runs, dead_letters RESTART IDENTITY CASCADE"))
    env = {"TARS_BROKER_URL": redis_url, "TARS_DATABASE_URL": pg_url, "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
           "TARS_SIM_LATENCY": "uniform:50:150", "TARS_SIM_FAILURE_RATE": "0.15", "TARS_TASK_EVENTS": "false"}
    out = tmp_path_factory.mktemp("lg-report")
    runner = Runner(settings=make_settings(env), out_dir=out, mode="local", worker_env=env)
    s = runner.run(SCENARIOS)
    paths = write_report(s, command="pytest")
    yield {"session": s, "paths": paths, "env": env, "out": out, "pg_url": pg_url}
    r.flushdb()


def _db_rows(pg_url: str, run_id: str):
    with psycopg.connect(pg_url) as conn:
        reqs = {row[0]: row for row in conn.execute(
            "SELECT id, status, submitted_at, started_at, finished_at, cost_usd, input_tokens, output_tokens, worker"
            " FROM requests WHERE run_id = %s", (run_id,))}
        calls, model_ms = conn.execute(
            "SELECT count(*), sum(a.latency_ms) FROM api_calls a JOIN requests r ON r.id = a.request_id "
            "WHERE r.run_id = %s", (run_id,)).fetchone()
        summary = conn.execute("SELECT summary FROM runs WHERE id = %s", (run_id,)).fetchone()[0]
    return reqs, calls, float(model_ms), summary


def _rank(values: np.ndarray, p: float) -> float:
    """HdrHistogram's percentile: the value of rank round(p/100 * n) (at least 1) in sorted order."""
    return float(np.sort(values)[max(1, int(p / 100 * len(values) + 0.5)) - 1])


def _recompute(pg_url: str, run_id: str) -> dict:
    reqs, calls, model_ms, summary = _db_rows(pg_url, run_id)
    drive = summary["drive"]
    cols = summary["client"]["columns"]
    client = [dict(zip(cols, row, strict=True)) for row in summary["client"]["rows"]]
    origin_key = "intended_at" if drive["kind"] == "open" else "send_start"
    w0, w1 = drive["window"]
    if w1 - w0 < 0.5:
        pytest.skip("burst run")
    inwin = [c for c in client if w0 <= c[origin_key] < w1]
    e2e = np.array([c["done_at"] - c[origin_key] for c in inwin])
    status = [reqs[c["request_id"]][1] for c in inwin]
    waits = np.array([(reqs[c["request_id"]][3] - reqs[c["request_id"]][2]).total_seconds() for c in inwin])
    svc = np.array([(reqs[c["request_id"]][4] - reqs[c["request_id"]][3]).total_seconds() for c in inwin])
    life = [(c[origin_key], c["done_at"]) for c in client]
    share = sum(max(0.0, min(b, w1) - max(a, w0)) / (b - a) for a, b in life)
    thr = share / (w1 - w0)
    out = {
        "total": len(client), "in_window": len(inwin), "failed": sum(s != "succeeded" for s in status),
        "avg": e2e.mean() * 1000, "max": e2e.max() * 1000, "throughput": thr,
        "p50": _rank(e2e, 50) * 1000, "p95": _rank(e2e, 95) * 1000, "p99": _rank(e2e, 99) * 1000,
        "wait_avg": waits.mean() * 1000, "svc_avg": svc.mean() * 1000,
        "cost": sum((Decimal(r[5]) for r in reqs.values()), Decimal(0)),
        "tokens": sum(r[6] + r[7] for r in reqs.values()), "retries": calls - len(reqs), "model_ms": model_ms,
        "workers": {w for w in (r[8] for r in reqs.values()) if w},
    }
    if drive["kind"] == "closed":  # mean service of the requests counted, weighted by their window share
        ws = []
        for c in client:
            r = reqs[c["request_id"]]
            a, b = c[origin_key], c["done_at"]
            ws.append((max(0.0, min(b, w1) - max(a, w0)) / (b - a), (r[4] - r[3]).total_seconds()))
        out["bound"] = drive["concurrency"] * sum(w for w, _ in ws) / sum(w * s for w, s in ws)
    return out


def _table(md: str, run_id: str) -> dict[str, str]:
    section = md.split(f"Run id: `{run_id}`", 1)[1].split("**Analysis:**", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| \*\*(.+?)\*\* \| (.+?) \|$", section, re.M)}


def _num(s: str) -> float:
    return float(re.search(r"[-\d,.]+", s.replace("$", "")).group(0).replace(",", ""))


def test_every_figure_in_the_report_is_recomputed_from_the_stored_rows(session):
    md = session["paths"]["markdown"].read_text()
    steps = [st for sc in session["session"].scenarios for st in sc.steps]
    assert len(steps) == 4
    for st in steps:
        a, want = st.aggregates, _recompute(session["pg_url"], st.run_id)
        lat = a["latency_ms"]["e2e"]
        assert a["requests"]["run"]["total"] == want["total"]
        assert a["requests"]["window"]["total"] == want["in_window"] == lat["count"]
        assert a["requests"]["window"]["failed"] == want["failed"]
        assert lat["avg"] == pytest.approx(want["avg"], rel=1e-9)
        assert lat["max"] == pytest.approx(want["max"], rel=1e-9)
        for p in ("p50", "p95", "p99"):  # HdrHistogram keeps 3 significant digits
            assert lat[p] == pytest.approx(want[p], rel=2e-3, abs=0.01), p
        assert a["throughput"]["completions_per_s"] == pytest.approx(want["throughput"], rel=1e-9)
        assert a["latency_ms"]["queue_wait"]["avg"] == pytest.approx(want["wait_avg"], abs=1e-3)
        assert a["latency_ms"]["service"]["avg"] == pytest.approx(want["svc_avg"], abs=1e-3)
        if "bound" in want:
            assert a["little"]["bound_per_s"] == pytest.approx(want["bound"], rel=1e-6)
        run_model_ms = sum(r.model_ms or 0 for r in st.records)
        assert run_model_ms == pytest.approx(want["model_ms"], abs=0.01)
        assert Decimal(a["cost"]["total_usd"]) == want["cost"]
        assert a["cost"]["input_tokens"] + a["cost"]["output_tokens"] == want["tokens"]
        assert a["retries"]["retries"] == want["retries"]
        assert set(a["workers"]["share"]) == want["workers"]
        if st.level is None:  # a single-run scenario: its Results table in the Markdown
            t = _table(md, st.run_id)
            assert t["Total Requests"].startswith(f"{want['total']} ({want['in_window']} in the steady window)")
            assert _num(t["Failed"]) == want["failed"]
            for row, key in (("Avg Response Time", "avg"), ("p50 Response Time", "p50"),
                             ("p95 Response Time", "p95"), ("p99 Response Time", "p99"), ("Max Response Time", "max")):
                # printed to the millisecond, from a histogram of 3 significant digits
                assert _num(t[row]) == pytest.approx(want[key], abs=0.5 + 2e-3 * want[key]), row
            assert _num(t["Throughput"]) == pytest.approx(want["throughput"], abs=0.006)
            assert _num(t["Cost"]) == pytest.approx(float(want["cost"]), abs=0.00006)
        else:  # a sweep level: its row of the sweep table
            row = next(line for line in md.splitlines() if line.startswith(f"| {st.level:g} | "))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert _num(cells[1]) == pytest.approx(want["throughput"], abs=0.006)
            assert _num(cells[5]) == pytest.approx(want["p99"], abs=0.5 + 2e-3 * want["p99"])


def test_a_multi_scenario_report_renders_every_scenario_and_its_plots_are_valid_pngs(session):
    import matplotlib.image as mpimg

    md = session["paths"]["markdown"].read_text()
    for i, sc in enumerate(SCENARIOS, 1):
        assert f"### Scenario {i}: {sc.title}" in md
    assert "## Executive Summary" in md and "## Cost Analysis" in md
    assert "Little's Bound" in md and "Send Lag" in md  # closed and open loop figures both present
    assert "retries over" in md  # the 15% injected failure rate shows as retries
    pngs = [p for k, p in session["paths"].items() if k.endswith(".png")]
    assert {p.name for p in pngs} == {"throughput_vs_concurrency.png", "latency_vs_concurrency.png",
                                      "memory_over_time.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-16:]
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({p.name})" in md
    assert (session["out"] / "report.json").stat().st_size > 0
    assert len(list(session["out"].glob("requests-*.jsonl"))) == 4


def test_compare_puts_two_runs_of_the_database_side_by_side(session):
    steps = [st for sc in session["session"].scenarios for st in sc.steps]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TARS_")}
    env.update(session["env"])
    res = subprocess.run([sys.executable, "-m", "tars_tasks.cli", "loadgen", "compare", steps[0].run_id,
                          steps[1].run_id], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert steps[0].run_id in res.stdout and steps[1].run_id in res.stdout
    assert "p99" in res.stdout and "throughput" in res.stdout
    p99 = steps[0].aggregates["latency_ms"]["e2e"]["p99"]
    assert f"{p99:.4g}" in res.stdout
