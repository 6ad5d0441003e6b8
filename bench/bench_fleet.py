"""Fleet benchmark (issue 2): the full pipeline against bare Celery, in one run.

    .venv/bin/python bench/bench_fleet.py --processes 2 --backlog 6000 --levels 100,1000,2000

1. bare Celery: a no-op task, ``ignore_result``, same Redis, same worker processes/pool —
   drain a pre-filled backlog; tasks/s.
2. full pipeline, zero-latency simulated model: drain a pre-filled backlog of requests whose
   rows are durable in Postgres; requests/s from the rows (first start .. last finish), and
   its ratio to (1).
3. closed loop with the seed's latency (uniform 0.5-2.5 s, no injected failures): keep C in
   flight for a steady window; throughput as % of Little's bound (C / mean model latency
   measured from the api_calls rows of the window), and p99 end-to-end minus p99 model latency.

Everything runs against 127.0.0.1 and is bounded. Results print as JSON (``--out`` to save).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _fresh_db(name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    import migrations

    migrations.upgrade(url)
    return url


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = log.open("wb")
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_ready(logs: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(" ready." in p.read_text(errors="replace") for p in logs):
            return
        time.sleep(0.05)
    raise RuntimeError(f"workers not ready: {[p.read_text()[-500:] for p in logs]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _queue_len(r: redis.Redis, queue: str) -> int:
    pipe = r.pipeline()
    pipe.llen(queue)
    for i in range(1, 10):
        pipe.llen(f"{queue}:{i}")
    pipe.hlen("unacked")
    return sum(pipe.execute())


def bench_bare(*, processes: int, concurrency: int, backlog: int, tmp: Path) -> dict:
    url = "redis://127.0.0.1:6379/10"
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {"BARE_BROKER_URL": url, "PYTHONPATH": str(ROOT / "bench")}
    fill = subprocess.run([sys.executable, "-c", f"""
from bare_celery_app import app
with app.producer_or_acquire() as p:
    for i in range({backlog}):
        app.send_task("bare.noop", kwargs={{"i": i}}, producer=p)
"""], cwd=ROOT / "bench", env={**os.environ, **env}, check=True)
    assert fill.returncode == 0 and _queue_len(r, "celery") == backlog
    logs = [tmp / f"bare-{i}.log" for i in range(processes)]
    procs = [_start([sys.executable, "-m", "celery", "-A", "bare_celery_app", "worker", "-P", "gevent",
                     "-c", str(concurrency), "-n", f"bare{i}@%h", "--without-mingle", "--without-gossip",
                     "-l", "INFO"], {**env, "PYTHONPATH": str(ROOT / "bench")}, logs[i])
             for i in range(processes)]
    try:
        t0 = None
        while True:
            n = _queue_len(r, "celery")
            now = time.monotonic()
            if t0 is None and n < backlog:
                t0 = now
            if n == 0:
                t1 = now
                break
            time.sleep(0.01)
    finally:
        _stop(procs)
    return {"tasks": backlog, "seconds": t1 - t0, "tasks_per_s": backlog / (t1 - t0)}


def _unbinding_catalog() -> Path:
    """The packaged catalog with RPM/TPM raised 10,000x: the limiter runs on every call but never
    binds, so the figures measure the fleet, not the catalog's provider limits."""
    import re

    text = (ROOT / "config" / "models.toml").read_text()
    text = re.sub(r"^(rpm|tpm) = (\d+)", lambda m: f"{m[1]} = {int(m[2]) * 10_000}", text, flags=re.M)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "tars-bench-models.toml"
    path.write_text(text)
    return path


def _fleet_env(db_url: str, **extra: str) -> dict[str, str]:
    return {"TARS_BROKER_URL": "redis://127.0.0.1:6379/9", "TARS_DATABASE_URL": db_url,
            "TARS_CATALOG_PATH": str(_unbinding_catalog()),
            "TARS_NAMESPACE": f"bench{uuid.uuid4().hex[:6]}", "TARS_TASK_EVENTS": "false",
            "TARS_SIM_FAILURE_RATE": "0", **extra}


def _start_fleet(env: dict[str, str], *, processes: int, concurrency: int, tmp: Path, tag: str):
    from workers.start import worker_argv

    os.environ.update(env)
    from config.settings import get_settings

    get_settings.cache_clear()
    logs = [tmp / f"{tag}-{i}.log" for i in range(processes)]
    procs = []
    for i in range(processes):
        argv = worker_argv(tiers=["haiku", "sonnet", "opus"], concurrency=concurrency, name=f"{tag}{i}@%h",
                           loglevel="INFO", events=False)
        procs.append(_start(argv, env, logs[i]))
    return procs, logs


def bench_pipeline(*, db_url: str, processes: int, concurrency: int, backlog: int, tmp: Path) -> dict:
    from sqlalchemy import text

    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    redis.Redis.from_url("redis://127.0.0.1:6379/9").flushdb()
    env = _fleet_env(db_url, TARS_SIM_LATENCY="fixed:0")
    settings = make_settings(env)
    with TarsClient(settings=settings) as client:
        with client.engine.begin() as conn:
            conn.execute(text("TRUNCATE api_calls, requests, runs CASCADE"))
        for i in range(0, backlog, 500):
            chunk = range(i, min(backlog, i + 500))
            client.submit_many([{"role": "researcher", "prompt": f"bench {j}"} for j in chunk])
        procs, _ = _start_fleet(env, processes=processes, concurrency=concurrency, tmp=tmp, tag="zero")
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with client.engine.connect() as conn:
                    left = conn.execute(text("SELECT count(*) FROM requests WHERE status='queued'")).scalar()
                if left == 0:
                    break
                time.sleep(0.2)
            with client.engine.connect() as conn:
                row = conn.execute(text("SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)), "
                                        "count(*) FILTER (WHERE status='succeeded') FROM requests")).one()
        finally:
            _stop(procs)
    n, span, ok = int(row[0]), float(row[1]), int(row[2])
    return {"requests": n, "succeeded": ok, "seconds": span, "requests_per_s": n / span}


def _pct(values: list[float], q: float) -> float:
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(1, 3_600_000_000, 3)  # microseconds
    for v in values:
        h.record_value(max(1, int(v * 1e6)))
    return h.get_value_at_percentile(q) / 1e6


def bench_closed_loop(*, db_url: str, processes: int, concurrency: int, levels: list[int], duration_s: float,
                      warmup_s: float, tmp: Path) -> list[dict]:
    from sqlalchemy import text

    from loadgen.drivers import ClosedLoop
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    redis.Redis.from_url("redis://127.0.0.1:6379/9").flushdb()
    env = _fleet_env(db_url, TARS_SIM_LATENCY="uniform:500:2500")
    settings = make_settings(env)
    procs, logs = _start_fleet(env, processes=processes, concurrency=concurrency, tmp=tmp, tag="seed")
    out = []
    try:
        _wait_ready(logs)
        with TarsClient(settings=settings) as client:
            for c in levels:
                run_id = str(uuid.uuid4())
                with client.engine.begin() as conn:
                    conn.execute(text("INSERT INTO runs (id, name, config, started_at) VALUES "
                                      "(:i, :n, '{}', now())"), {"i": run_id, "n": f"bench-c{c}"})
                drv = ClosedLoop(producer=client, factory=lambda i: {"role": "researcher", "prompt": f"q{i}"},
                                 concurrency=c, duration_s=duration_s, warmup_s=warmup_s, run_id=run_id)
                res = drv.run()
                w0, w1 = res.window
                done = [s for s in res.samples if s.done_at is not None and w0 <= s.done_at <= w1]
                e2e = [s.done_at - s.send_start for s in done]
                with client.engine.connect() as conn:
                    lat = [float(x) / 1000 for x in conn.execute(text(
                        "SELECT a.latency_ms FROM api_calls a JOIN requests r ON r.id = a.request_id "
                        "WHERE r.run_id = :r AND a.outcome = 'ok'"), {"r": run_id}).scalars()]
                mean_model = statistics.fmean(lat)
                thr = len(done) / (w1 - w0)
                bound = c / mean_model
                out.append({
                    "concurrency": c, "window_s": w1 - w0, "completed_in_window": len(done),
                    "throughput_per_s": thr, "mean_model_latency_s": mean_model, "littles_bound_per_s": bound,
                    "pct_of_bound": 100 * thr / bound,
                    "p99_e2e_s": _pct(e2e, 99), "p99_model_s": _pct(lat, 99),
                    "p99_added_ms": 1000 * (_pct(e2e, 99) - _pct(lat, 99)),
                    "p50_added_ms": 1000 * (_pct(e2e, 50) - _pct(lat, 50)),
                    "failed": sum(1 for s in res.samples if s.status not in (None, "succeeded")),
                    "unfinished": res.unfinished,
                })
                print(json.dumps(out[-1]), flush=True)
    finally:
        _stop(procs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1200, help="greenlets per worker process")
    ap.add_argument("--backlog", type=int, default=6000)
    ap.add_argument("--levels", default="100,1000,2000")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--skip", default="", help="comma list of: bare,pipeline,closed")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tars-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    db_url = _fresh_db("tars_bench")
    result: dict = {"processes": args.processes, "concurrency_per_process": args.concurrency,
                    "cpu_count": os.cpu_count()}
    if "bare" not in skip:
        result["bare_celery_noop"] = bench_bare(processes=args.processes, concurrency=args.concurrency,
                                                backlog=args.backlog, tmp=tmp)
        print(json.dumps(result["bare_celery_noop"]), flush=True)
    if "pipeline" not in skip:
        result["pipeline_zero_latency"] = bench_pipeline(db_url=db_url, processes=args.processes,
                                                         concurrency=args.concurrency, backlog=args.backlog, tmp=tmp)
        print(json.dumps(result["pipeline_zero_latency"]), flush=True)
        if "bare_celery_noop" in result:
            result["pipeline_to_bare_ratio"] = (result["pipeline_zero_latency"]["requests_per_s"]
                                                / result["bare_celery_noop"]["tasks_per_s"])
    if "closed" not in skip:
        result["closed_loop"] = bench_closed_loop(
            db_url=db_url, processes=args.processes, concurrency=args.concurrency,
            levels=[int(x) for x in args.levels.split(",")], duration_s=args.duration, warmup_s=args.warmup, tmp=tmp)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
