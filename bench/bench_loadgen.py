"""Generator capacity: the arrival rate one loadgen process keeps on schedule.

A rate is *kept* when every scheduled arrival was sent and the p99 send lag (intended send
time → the submit call returned, i.e. recorded and published) is at most 5 ms. The same
open-loop driver, schedule and lag measurement are used for three submit paths, in one run:

* ``null``   — a producer that does nothing: the cost of the schedule/driver machinery alone;
* ``tars``   — :class:`tars_tasks.client.TarsClient` (validate, route, INSERT the request rows
  into Postgres, publish to Redis): what ``tars loadgen`` really does;
* ``celery`` — a bare Celery ``send_task`` (``apply_async``) per arrival on the same broker,
  no database: the publishing floor.

Plus, for scale, an unpaced loop of bare ``send_task`` calls (messages per second flat out).
No workers run: messages stay queued in a Redis database of their own, flushed afterwards, and
the rows go to a Postgres database created and dropped by the benchmark.

    .venv/bin/python bench/bench_loadgen.py --rates 250,500,1000,2000,4000 --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAG_LIMIT_MS = 5.0


class _Listener:
    def __init__(self) -> None:
        self.callbacks = []

    def on_done(self, cb) -> None:
        self.callbacks.append(cb)


class _Handle:
    __slots__ = ("id",)

    def __init__(self, rid: str) -> None:
        self.id = rid


class NullProducer:
    """Accepts everything instantly and never completes anything."""

    def __init__(self) -> None:
        self.listener = _Listener()
        self._n = 0

    def submit_many(self, specs, *, run_id=None):
        out = []
        for _ in specs:
            self._n += 1
            out.append(_Handle(f"n{self._n}"))
        return out

    def get_many(self, ids):
        return []


class BareCeleryProducer:
    """One ``send_task`` per request on a pooled producer — no validation, no database."""

    def __init__(self, app, queue: str) -> None:
        self.app = app
        self.queue = queue
        self.listener = _Listener()

    def submit_many(self, specs, *, run_id=None):
        out = []
        with self.app.producer_or_acquire() as producer:
            for spec in specs:
                rid = str(uuid.uuid4())
                self.app.send_task("tars.bench_noop", kwargs=spec, task_id=rid, queue=self.queue,
                                   routing_key=self.queue, producer=producer)
                out.append(_Handle(rid))
        return out

    def get_many(self, ids):
        return []


def factory(i: int) -> dict:
    return {"role": "researcher", "prompt": f"bench {i}", "tenant": "bench"}


def run_rate(producer, *, rate: float, duration_s: float) -> dict:
    from loadgen.drivers import OpenLoop
    from loadgen.schedule import make_schedule

    schedule = make_schedule(rate_per_s=rate, arrival="constant", duration_s=duration_s)
    drive = OpenLoop(producer=producer, factory=factory, schedule=schedule, rate_per_s=rate, arrival="constant",
                     drain_timeout_s=0.0, max_in_flight=10**9).run()
    lags = np.array([(s.sent_at - s.intended_at) * 1000 for s in drive.samples])
    span = drive.samples[-1].sent_at - drive.samples[0].intended_at if drive.samples else 0.0
    p99 = float(np.percentile(lags, 99)) if len(lags) else float("nan")
    return {"rate": rate, "scheduled": len(schedule), "sent": len(drive.samples),
            "achieved_per_s": len(drive.samples) / span if span > 0 else 0.0,
            "lag_p50_ms": float(np.percentile(lags, 50)), "lag_p99_ms": p99, "lag_max_ms": float(lags.max()),
            "kept": len(drive.samples) == len(schedule) and p99 <= LAG_LIMIT_MS}


def unpaced_send_task(app, queue: str, n: int) -> float:
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("tars.bench_noop", kwargs={"i": i}, queue=queue, routing_key=queue, producer=producer)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="250,500,1000,2000,4000")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    import psycopg
    import redis

    dbname = f"tars_bench_lg_{uuid.uuid4().hex[:6]}"
    base = args.pg_admin_url.rsplit("/", 1)[0]
    with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    pg_url = f"{base}/{dbname}"
    r = redis.Redis.from_url(args.redis_url)
    r.flushdb()
    results: dict[str, list[dict]] = {"null": [], "tars": [], "celery": []}
    try:
        import migrations
        from config.settings import Settings
        from tars_tasks.celery_app import make_app
        from tars_tasks.client import TarsClient

        migrations.upgrade(pg_url)
        settings = Settings(_env_file=None, broker_url=args.redis_url, database_url=pg_url,
                            namespace=f"bench{uuid.uuid4().hex[:6]}", task_events=False)
        client = TarsClient(settings=settings)
        app = make_app(settings)
        bare = BareCeleryProducer(app, "tars.bench")
        bare.submit_many([{"warm": 1}])
        client.submit_many([{"role": "researcher", "prompt": "warm", "tenant": "bench"}])
        for rate in rates:
            for name, prod in (("null", NullProducer()), ("tars", client), ("celery", bare)):
                res = run_rate(prod, rate=rate, duration_s=args.duration)
                results[name].append(res)
                print(f"{name:6s} {rate:7.0f}/s  sent {res['sent']:6d}/{res['scheduled']:<6d} "
                      f"achieved {res['achieved_per_s']:8.1f}/s  lag p50 {res['lag_p50_ms']:7.2f} ms  "
                      f"p99 {res['lag_p99_ms']:8.2f} ms  max {res['lag_max_ms']:8.2f} ms  "
                      f"{'KEPT' if res['kept'] else 'behind'}", flush=True)
                r.flushdb()
        flat_out = unpaced_send_task(app, "tars.bench", 20_000)
        print(f"bare send_task unpaced: {flat_out:,.0f} messages/s")
        client.close()
    finally:
        r.flushdb()
        from tars_tasks.db.engine import dispose_engines

        dispose_engines()
        with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    capacity = {name: max((x["rate"] for x in rs if x["kept"]), default=0.0) for name, rs in results.items()}
    print("capacity (highest rate kept, p99 send lag <= 5 ms): "
          + ", ".join(f"{k} {v:,.0f}/s" for k, v in capacity.items()))
    if args.json:
        args.json.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "duration_s": args.duration,
                                         "results": results, "capacity": capacity,
                                         "unpaced_send_task_per_s": flat_out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
