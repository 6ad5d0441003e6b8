"""How long a frozen Redis or Postgres holds each part of TARS, with the default bounds.

A TCP proxy (tests/tcp_proxy.py) freezes: sockets stay open, nothing is forwarded. Each case
prints the seconds from the freeze until the part noticed (an error, or work flowing again over
a new connection). Run on a quiet machine; results go to docs/BENCHMARKS.md:

    python bench/bench_frozen.py --redis-url redis://127.0.0.1:6379/14 \\
        --pg-url postgresql://postgres@127.0.0.1:5432/tars_bench_secrets

The Postgres database must exist and be migrated (``TARS_DATABASE_URL=... tars db upgrade``).
Settings come from the environment like any TARS process (defaults if unset).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tcp_proxy import TcpProxy  # noqa: E402


def _via(url: str, proxy: TcpProxy, port: int) -> str:
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")


def _timed_error(fn, *, limit_s: float) -> tuple[float, str]:
    box: dict = {}

    def run():
        try:
            fn()
            box["error"] = "none (returned)"
        except Exception as exc:
            box["error"] = type(exc).__name__
        box["at"] = time.monotonic()

    t0 = time.monotonic()
    threading.Thread(target=run, daemon=True).start()
    while "at" not in box and time.monotonic() - t0 < limit_s:
        time.sleep(0.01)
    return (box["at"] - t0, box["error"]) if "at" in box else (float("inf"), "still waiting")


def case_redis_command(args) -> dict:
    from tars_tasks.redis_client import get_redis

    proxy = TcpProxy(target_host="127.0.0.1", target_port=6379)
    try:
        client = get_redis(_via(args.redis_url, proxy, 6379))
        client.ping()
        proxy.freeze()
        seconds, error = _timed_error(client.ping, limit_s=120)
        return {"case": "fleet-state Redis command", "seconds": seconds, "outcome": error}
    finally:
        proxy.close()


def case_listener(args) -> dict:
    import redis

    from tars_tasks.notify import RedisListener
    from tars_tasks.redis_client import get_redis

    proxy = TcpProxy(target_host="127.0.0.1", target_port=6379)
    direct = redis.Redis.from_url(args.redis_url)
    listener = RedisListener(uuid.uuid4().hex, namespace="benchfrozen",
                             redis_client=get_redis(_via(args.redis_url, proxy, 6379)))
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        proxy.freeze()
        time.sleep(1)
        proxy.restore()
        ev = listener.event_for("x")
        while not ev.is_set() and time.monotonic() - t0 < 180:
            direct.publish(listener.channel, json.dumps([["x", "succeeded"]]))
            ev.wait(0.2)
        return {"case": "completion listener (frozen 1 s)", "seconds": time.monotonic() - t0,
                "outcome": "heard again" if ev.is_set() else "still deaf"}
    finally:
        listener.close()
        proxy.close()


def _worker(env: dict, log: Path) -> subprocess.Popen:
    from workers.start import worker_argv

    argv = worker_argv(tiers=["haiku"], concurrency=20, pool="gevent", name="bench-frozen@x", events=False)
    argv[0] = sys.executable
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    while b" ready." not in log.read_bytes():
        if proc.poll() is not None:
            raise SystemExit(log.read_text()[-3000:])
        time.sleep(0.1)
    return proc


def _fleet_env(args) -> dict:
    return {"TARS_BROKER_URL": args.redis_url, "TARS_DATABASE_URL": args.pg_url,
            "TARS_NAMESPACE": f"bf{uuid.uuid4().hex[:8]}", "TARS_SIM_LATENCY": "fixed:20",
            "TARS_SIM_FAILURE_RATE": "0", "TARS_TASK_EVENTS": "false"}


def case_worker_broker(args, tmp: Path) -> list[dict]:
    from tars_tasks.celery_app import make_app
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    proxy = TcpProxy(target_host="127.0.0.1", target_port=6379)
    fleet = _fleet_env(args)
    proc = _worker({**fleet, "TARS_BROKER_URL": _via(args.redis_url, proxy, 6379), "TARS_REDIS_URL": args.redis_url},
                   tmp / "worker-broker.log")
    client = TarsClient(settings=make_settings(fleet))
    app = make_app(make_settings(fleet))
    try:
        client.submit(role="researcher", prompt="warm").wait(timeout=60)
        t0 = time.monotonic()
        proxy.freeze()
        time.sleep(1)
        proxy.restore()
        handle = client.submit(role="researcher", prompt="after the freeze")
        handle.wait(timeout=300)
        task_s = time.monotonic() - t0
        while not app.control.ping(destination=["bench-frozen@x"], timeout=1) and time.monotonic() - t0 < 300:
            pass
        ping_s = time.monotonic() - t0
        return [{"case": "worker takes tasks again (broker frozen 1 s)", "seconds": task_s, "outcome": "ran"},
                {"case": "worker answers pings again (broker frozen 1 s)", "seconds": ping_s, "outcome": "pong"}]
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        proxy.close()


def case_postgres_statement(args) -> dict:
    from sqlalchemy import text

    from tars_tasks.db.engine import get_engine

    proxy = TcpProxy(target_host="127.0.0.1", target_port=5432)
    try:
        engine = get_engine(_via(args.pg_url, proxy, 5432))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        proxy.freeze()

        def query():
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        seconds, error = _timed_error(query, limit_s=300)
        return {"case": "Postgres statement (pre-ping) on a frozen server", "seconds": seconds, "outcome": error}
    finally:
        proxy.close()


def case_postgres_worker(args, tmp: Path) -> dict:
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    proxy = TcpProxy(target_host="127.0.0.1", target_port=5432)
    fleet = {**_fleet_env(args), "TARS_SIM_LATENCY": "uniform:200:400"}
    proc = _worker({**fleet, "TARS_DATABASE_URL": _via(args.pg_url, proxy, 5432)}, tmp / "worker-pg.log")
    client = TarsClient(settings=make_settings(fleet))
    try:
        handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(40)])
        time.sleep(1.0)
        t0 = time.monotonic()
        proxy.freeze()
        time.sleep(1)
        proxy.restore()
        results = client.wait_many([h.id for h in handles], timeout=600)
        return {"case": "worker finishes its requests (Postgres frozen 1 s mid-run)",
                "seconds": time.monotonic() - t0, "outcome": ",".join(sorted({r.status for r in results}))}
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/tars_bench_secrets")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/bench-frozen"))
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    from config.settings import get_settings

    s = get_settings()
    print(f"bounds: redis_socket_timeout_s={s.redis_socket_timeout_s} "
          f"redis_health_check_interval_s={s.redis_health_check_interval_s} db_io_timeout_s={s.db_io_timeout_s} "
          f"db_connect_timeout_s={s.db_connect_timeout_s}", flush=True)
    rows = [case_redis_command(args), case_listener(args), *case_worker_broker(args, args.tmp),
            case_postgres_statement(args), case_postgres_worker(args, args.tmp)]
    print("| case | seconds from the freeze | outcome |\n| --- | ---: | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['seconds']:.1f} | {r['outcome']} |")


if __name__ == "__main__":
    main()
