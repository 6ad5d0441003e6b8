"""Priority and fairness under a binding rate limit (issue 9), with real worker processes.

    .venv/bin/python bench/bench_priority.py all --out /tmp/bench_priority.json
    .venv/bin/python bench/bench_priority.py priority --low 600
    .venv/bin/python bench/bench_priority.py flood --flood 10000

* **priority** — two haiku workers (``--slots`` 200 gevent slots each), the fleet limit set to
  ``--rpm`` (600) through a catalog override, ``--low`` low-priority requests (priority 0)
  submitted at once, ``--high`` (10) high-priority ones (priority 9) ``--high-delay-s`` (8 s)
  later. From the Postgres rows: the high requests' end-to-end (``finished_at - submitted_at``)
  median and p99, their queue wait (``started_at - submitted_at``), how many low requests
  finished before the first high one, and the call rate in the steady part (``api_calls.started_at``
  per second, from 5 s after the first call to 5 s before the last) against the limit.
* **flood** — the same two workers at ``--flood-rpm`` (the packaged catalog's haiku limit,
  4,000 rpm, so a 10,000 flood drains in ~2.5 min): tenant ``small`` submits ``--small`` (10)
  requests to an idle fleet (the baseline), then tenant ``big`` submits ``--flood`` requests and
  ``small`` its 10 right after; the small tenant's median end-to-end with and without the flood,
  and how many of the big tenant's requests finished before the small tenant's last. The run stops
  once the small tenant's requests are done (the rest of the flood is discarded).

Simulated provider latency uniform 500-2500 ms (the seed's), no injected failures, task events off.
Redis db 15 (``--redis-url``) and Postgres database ``tars_bench_dispatch`` (``--pg-db``, created
afresh) on 127.0.0.1; every wait is bounded. ``--set KEY=VALUE`` passes extra ``TARS_*`` settings
to producer and workers (``--set TARS_DISPATCH_ENABLED=false``: the old path, publish and wait in
the limiter inside a worker slot). Results print as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet import _fresh_db, _start, _stop, _wait_ready  # noqa: E402

#: Defaults; ``--redis-url`` / ``--pg-db`` (or TARS_BENCH_REDIS_URL / TARS_BENCH_PG_DB) move them.
_DEFAULT_REDIS_URL = os.environ.get("TARS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
REDIS_URL = _DEFAULT_REDIS_URL
PG_DB = os.environ.get("TARS_BENCH_PG_DB", "tars_bench_dispatch")
SUBMIT_CHUNK = 500


def _nearest_rank(values: list[float], q: float) -> float:
    """The q-th percentile as a value that occurred (nearest rank)."""
    xs = sorted(values)
    k = max(1, -(-len(xs) * q // 100))  # ceil(n q / 100)
    return xs[int(k) - 1]


class Fleet:
    """Two (``workers``) haiku worker processes with a catalog override, on a flushed Redis db."""

    def __init__(self, *, db_url: str, rpm: int, workers: int, slots: int, tmp: Path, tag: str,
                 extra_env: dict[str, str]) -> None:
        from loadgen.fleet import write_catalog_override

        redis.Redis.from_url(REDIS_URL).flushdb()
        catalog = write_catalog_override({"rpm": rpm}, base=None, directory=tmp)
        self.rpm = rpm
        self.env = {"TARS_BROKER_URL": REDIS_URL, "TARS_DATABASE_URL": db_url, "TARS_CATALOG_PATH": str(catalog),
                    "TARS_NAMESPACE": f"bp{uuid.uuid4().hex[:8]}", "TARS_TASK_EVENTS": "false",
                    "TARS_SIM_FAILURE_RATE": "0", "TARS_SIM_LATENCY": "uniform:500:2500", **extra_env}
        from workers.start import worker_argv

        logs = [tmp / f"{tag}-{i}.log" for i in range(workers)]
        self.procs = [_start(worker_argv(tiers=["haiku"], concurrency=slots, pool="gevent", name=f"{tag}{i}@%h",
                                         loglevel="INFO", events=False), self.env, logs[i])
                      for i in range(workers)]
        try:
            _wait_ready(logs)
        except BaseException:
            self.stop()
            raise

    def client(self):
        from tars_tasks.client import TarsClient
        from tests.helpers import make_settings

        return TarsClient(settings=make_settings(self.env))

    def stop(self) -> None:
        _stop(self.procs)
        redis.Redis.from_url(REDIS_URL).flushdb()


def _truncate(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("TRUNCATE api_calls, requests, runs, dead_letters CASCADE"))


def _submit(client, specs: list[dict]) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(specs), SUBMIT_CHUNK):
        ids += [h.id for h in client.submit_many(specs[i : i + SUBMIT_CHUNK])]
    return ids


def _wait_terminal(engine, ids: list[str], *, timeout_s: float) -> None:
    from sqlalchemy import text

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = conn.execute(text("SELECT count(*) FROM requests WHERE id = ANY(:ids) "
                                     "AND status NOT IN ('succeeded', 'failed')"), {"ids": ids}).scalar()
        if left == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"requests not terminal after {timeout_s:.0f}s")


def _rows(engine, ids: list[str]) -> list[dict]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT id, tenant, priority, status, error, submitted_at, started_at, finished_at FROM requests "
            "WHERE id = ANY(:ids)"), {"ids": ids})]


def _call_starts(engine) -> list[datetime]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT started_at FROM api_calls")).scalars())


def _steady_rate(starts: list[datetime], *, trim_s: float = 5.0) -> tuple[float, float, int]:
    """Calls per second between ``trim_s`` after the first call and ``trim_s`` before the last."""
    t0 = starts[0].timestamp() + trim_s
    t1 = starts[-1].timestamp() - trim_s
    n = sum(1 for s in starts if t0 <= s.timestamp() < t1)
    return n / (t1 - t0), t1 - t0, n


def _errors(rows: list[dict]) -> dict[str, int]:
    """Failed requests by the first words of their error."""
    out: dict[str, int] = {}
    for r in rows:
        if r["status"] != "succeeded":
            key = " ".join(str(r["error"]).split()[:4])
            out[key] = out.get(key, 0) + 1
    return out


def _e2e(rows: list[dict]) -> list[float]:
    return [(r["finished_at"] - r["submitted_at"]).total_seconds() for r in rows]


def bench_priority(*, db_url: str, low: int, high: int, high_delay_s: float, rpm: int, workers: int, slots: int,
                   tmp: Path, extra_env: dict[str, str]) -> dict:
    fleet = Fleet(db_url=db_url, rpm=rpm, workers=workers, slots=slots, tmp=tmp, tag=f"prio{low}",
                  extra_env=extra_env)
    try:
        with fleet.client() as client:
            _truncate(client.engine)
            t0 = time.monotonic()
            low_ids = _submit(client, [{"role": "researcher", "prompt": f"low {i}", "priority": "low"}
                                       for i in range(low)])
            submit_low_s = time.monotonic() - t0
            time.sleep(max(0.0, t0 + high_delay_s - time.monotonic()))
            high_ids = _submit(client, [{"role": "researcher", "prompt": f"high {i}", "priority": "high"}
                                        for i in range(high)])
            _wait_terminal(client.engine, low_ids + high_ids, timeout_s=(low + high) / (rpm / 60) * 1.5 + 120)
            lows, highs = _rows(client.engine, low_ids), _rows(client.engine, high_ids)
            starts = _call_starts(client.engine)
    finally:
        fleet.stop()
    first_high = min(r["finished_at"] for r in highs)
    high_sub = min(r["submitted_at"] for r in highs)
    ninth_high = sorted(r["finished_at"] for r in highs)[min(8, len(highs) - 1)]
    rate, window_s, calls = _steady_rate(starts)
    limit_per_s = rpm / 60
    e2e = _e2e(highs)
    out = {
        "low": low, "high": high, "high_delay_s": high_delay_s, "rpm": rpm, "workers": workers, "slots": slots,
        "submit_low_s": round(submit_low_s, 2),
        "high_e2e_median_s": round(statistics.median(e2e), 2), "high_e2e_p99_s": round(_nearest_rank(e2e, 99), 2),
        "high_e2e_max_s": round(max(e2e), 2),
        "high_queue_wait_median_s": round(statistics.median(
            (r["started_at"] - r["submitted_at"]).total_seconds() for r in highs), 2),
        "low_finished_before_first_high": sum(1 for r in lows if r["finished_at"] < first_high),
        "low_finished_after_high_submit_before_9th_high": sum(
            1 for r in lows if high_sub <= r["finished_at"] < ninth_high),
        "low_e2e_median_s": round(statistics.median(_e2e(lows)), 2),
        "steady_calls_per_s": round(rate, 3), "steady_window_s": round(window_s, 1), "steady_calls": calls,
        "limit_per_s": round(limit_per_s, 3), "pct_of_limit": round(100 * rate / limit_per_s, 1),
        "failed": sum(1 for r in lows + highs if r["status"] != "succeeded"), "errors": _errors(lows + highs),
    }
    print(json.dumps({"priority": out}), flush=True)
    return out


def bench_flood(*, db_url: str, flood: int, small: int, rpm: int, workers: int, slots: int, tmp: Path,
                extra_env: dict[str, str], timeout_s: float) -> dict:
    fleet = Fleet(db_url=db_url, rpm=rpm, workers=workers, slots=slots, tmp=tmp, tag="flood", extra_env=extra_env)
    try:
        with fleet.client() as client:
            _truncate(client.engine)
            alone_ids = _submit(client, [{"role": "researcher", "prompt": f"alone {i}", "tenant": "small"}
                                         for i in range(small)])
            _wait_terminal(client.engine, alone_ids, timeout_s=120)
            alone = _rows(client.engine, alone_ids)
            time.sleep(2.0)  # let the limiter's schedule catch up with the wall clock
            t0 = time.monotonic()
            big_ids = _submit(client, [{"role": "researcher", "prompt": f"flood {i}", "tenant": "big"}
                                       for i in range(flood)])
            submit_flood_s = time.monotonic() - t0
            small_ids = _submit(client, [{"role": "researcher", "prompt": f"small {i}", "tenant": "small"}
                                         for i in range(small)])
            _wait_terminal(client.engine, small_ids, timeout_s=timeout_s)
            smalls, bigs = _rows(client.engine, small_ids), _rows(client.engine, big_ids)
    finally:
        fleet.stop()
    last_small = max(r["finished_at"] for r in smalls)
    big_done = [r for r in bigs if r["finished_at"] is not None]
    out = {
        "flood": flood, "small": small, "rpm": rpm, "workers": workers, "slots": slots,
        "submit_flood_s": round(submit_flood_s, 2),
        "small_e2e_median_alone_s": round(statistics.median(_e2e(alone)), 2),
        "small_e2e_median_flood_s": round(statistics.median(_e2e(smalls)), 2),
        "small_e2e_max_flood_s": round(max(_e2e(smalls)), 2),
        "big_finished_before_last_small": sum(1 for r in big_done if r["finished_at"] < last_small),
        # the same, from the small tenant's submission on (big's calls already in flight then finish meanwhile)
        "big_finished_after_small_submit_before_last_small": sum(
            1 for r in big_done if min(x["submitted_at"] for x in smalls) <= r["finished_at"] < last_small),
        "big_finished_at_stop": len(big_done),
        "failed": sum(1 for r in alone + smalls + big_done if r["status"] != "succeeded"),
        "errors": _errors(alone + smalls + big_done),
    }
    print(json.dumps({"flood": out}), flush=True)
    return out


def main() -> None:
    global REDIS_URL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "priority", "flood"])
    p.add_argument("--low", type=str, default="600,2000", help="priority: comma list of backlog sizes")
    p.add_argument("--high", type=int, default=10)
    p.add_argument("--high-delay-s", type=float, default=8.0)
    p.add_argument("--rpm", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=200)
    p.add_argument("--flood", type=int, default=10_000)
    p.add_argument("--small", type=int, default=10)
    p.add_argument("--flood-rpm", type=int, default=4000)
    p.add_argument("--flood-timeout-s", type=float, default=600.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra TARS_* setting")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--redis-url", default=None, help=f"broker Redis (flushed!), default {_DEFAULT_REDIS_URL}")
    p.add_argument("--pg-db", default=None, help=f"Postgres database (dropped and created), default {PG_DB}")
    args = p.parse_args()
    REDIS_URL = args.redis_url or _DEFAULT_REDIS_URL
    extra_env = dict(kv.split("=", 1) for kv in args.set)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tars-bench-priority-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    db_url = _fresh_db(args.pg_db or PG_DB)
    result: dict = {"started": datetime.now().isoformat(timespec="seconds"), "load_avg_at_start": os.getloadavg(),
                    "extra_env": extra_env, "priority": [], "flood": None}
    if args.what in ("all", "priority"):
        for low in (int(x) for x in args.low.split(",")):
            result["priority"].append(bench_priority(
                db_url=db_url, low=low, high=args.high, high_delay_s=args.high_delay_s, rpm=args.rpm,
                workers=args.workers, slots=args.slots, tmp=tmp, extra_env=extra_env))
    if args.what in ("all", "flood"):
        result["flood"] = bench_flood(db_url=db_url, flood=args.flood, small=args.small, rpm=args.flood_rpm,
                                      workers=args.workers, slots=args.slots, tmp=tmp, extra_env=extra_env,
                                      timeout_s=args.flood_timeout_s)
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
