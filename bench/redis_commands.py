"""Redis commands per request: the pipeline against bare Celery, counted by Redis itself.

    .venv/bin/python bench/redis_commands.py --n 500

Starts a private redis-server on a free port (nothing else talks to it), drains N zero-latency
requests through one TARS worker (gevent, 200 greenlets, task events off) and N no-op tasks
through one bare Celery worker (bench/bare_celery_app.py), and prints ``INFO commandstats``
divided by N: what the producer sent, and what the worker side sent while draining. Commands a
Lua script runs count too (Redis counts them). Counts do not depend on machine load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet import _fresh_db, _start, _stop, _wait_ready  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def _per(stats: dict[str, int], n: int) -> str:
    top = sorted(stats.items(), key=lambda kv: -kv[1])
    parts = [f"{k} {v / n:.2f}" for k, v in top if v / n >= 0.01 and k not in ("config|resetstat", "info")]
    return f"{sum(v for k, v in stats.items() if k not in ('config|resetstat', 'info')) / n:.2f} ({', '.join(parts)})"


def _drained(r: redis.Redis, lists: list[str]) -> bool:
    return not any(r.llen(k) for k in lists) and not r.hlen("unacked")


def tars(url: str, n: int, tmp: Path, pg_db: str = "tars_redis_commands", events: bool = False) -> tuple[dict, dict]:
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings
    from workers.start import worker_argv

    r = redis.Redis.from_url(url)
    env = {"TARS_BROKER_URL": url, "TARS_DATABASE_URL": _fresh_db(pg_db), "TARS_NAMESPACE": "rc",
           "TARS_TASK_EVENTS": str(events).lower(), "TARS_SIM_LATENCY": "fixed:0", "TARS_SIM_FAILURE_RATE": "0"}
    log = tmp / "tars-worker.log"
    proc = _start(worker_argv(tiers=["haiku", "sonnet", "opus"], concurrency=200, name="rc@%h", loglevel="INFO",
                              events=events), env, log)
    try:
        _wait_ready([log])
        time.sleep(2)
        with TarsClient(settings=make_settings(env)) as client:
            r.config_resetstat()
            handles = client.submit_many([{"role": "researcher", "prompt": f"q{i}"} for i in range(n)])
            produced = _stats(r)
            r.config_resetstat()
            client.wait_many([h.id for h in handles], timeout=300)
            worked = _stats(r)
    finally:
        _stop([proc])
    return produced, worked


def bare(url: str, n: int, tmp: Path) -> tuple[dict, dict]:
    os.environ["BARE_BROKER_URL"] = url
    from bare_celery_app import app

    r = redis.Redis.from_url(url)
    env = {"BARE_BROKER_URL": url, "PYTHONPATH": str(ROOT / "bench")}
    r.config_resetstat()
    with app.producer_or_acquire() as producer:  # before the worker starts: the two sides apart
        for i in range(n):
            app.send_task("bare.noop", kwargs={"i": i}, producer=producer)
    produced = _stats(r)
    log = tmp / "bare-worker.log"
    r.config_resetstat()
    proc = _start([sys.executable, "-m", "celery", "-A", "bare_celery_app", "worker", "-P", "gevent", "-c", "200",
                   "-n", "rcbare@%h", "--without-mingle", "--without-gossip", "-l", "INFO"], env, log)
    try:
        _wait_ready([log])
        deadline = time.monotonic() + 300
        while not _drained(r, ["celery"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        worked = _stats(r)
    finally:
        _stop([proc])
    return produced, worked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--pg-db", default="tars_redis_commands", help="the Postgres database to create afresh")
    ap.add_argument("--events", action="store_true", help="the TARS worker with task events on (-E)")
    args = ap.parse_args()
    if args.n < 10:
        ap.error("--n must be >= 10")
    if shutil.which("redis-server") is None:
        ap.error("redis-server is not installed")
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="tars-redis-commands-"))
    try:
        time.sleep(0.5)
        tp, tw = tars(f"redis://127.0.0.1:{port}/0", args.n, tmp, args.pg_db, args.events)
        bp, bw = bare(f"redis://127.0.0.1:{port}/1", args.n, tmp)
    finally:
        server.terminate()
        server.wait(10)
    print(f"Redis commands per request, N = {args.n} (one worker, gevent, 200 greenlets, task events "
          f"{'on' if args.events else 'off'}; the bare worker's count includes its start-up: pidbox, heartbeats)")
    print(f"  TARS producer:       {_per(tp, args.n)}")
    print(f"  TARS worker side:    {_per(tw, args.n)}")
    print(f"  bare Celery producer: {_per(bp, args.n)}")
    print(f"  bare Celery worker:   {_per(bw, args.n)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
