"""Micro-benchmark of the stage and dispatch scripts (workers/dispatch.py), on a private Redis.

    .venv/bin/python bench/bench_dispatch.py --entries 20000 --out /tmp/bench_dispatch.json

A redis-server of its own (port in 24000-24999 on 127.0.0.1, no persistence), so its CPU time
(``INFO cpu``: used_cpu_user + used_cpu_sys) is the scripts' alone. One client process, one
connection, back-to-back calls. Bodies of ``--body-bytes`` (1,200: about a Celery task message
with TARS' kwargs). Cases:

* **stage** — entries staged per second (``STAGE_BATCH_MAX`` per script call).
* **move/B/T/P** — staged entries of T tenants over P priorities moved with ``max_moves`` = B
  and no binding limit: entries moved per second and Redis CPU µs per entry.
* **idle-nothing-staged** / **idle-model-limit** — nothing staged, or the model's next slot
  beyond the horizon: what one tick costs a worker whose dispatcher has nothing it may move
  (calls per second, Redis CPU µs per call).
* **blocked-tenants/T** — T tenants all at their own limits and one free tenant: every step
  walks the blocked tenants of the ring once (the cost of a tenant at its limit).

The moved entries are deleted from the Celery lists between cases. Bounded: every case stops
after ``--entries`` entries or ``--seconds`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.catalog import load_catalog  # noqa: E402
from config.keys import queue_for_tier  # noqa: E402
from config.tenants import TenantConfig, TenantSpec  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from workers.dispatch import PRIORITIES, Dispatcher, LimitWindow, StagedMessage, Staging, celery_list  # noqa: E402

NS = "bench"


class PrivateRedis:
    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not installed")
        self.port = free_port(low=24000, high=24999)
        self.dir = tempfile.mkdtemp(prefix="bench-dispatch-redis-")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def cpu_s(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _catalog(rpm: int):
    cat = load_catalog()
    return cat.model_copy(update={"tiers": {t: s.model_copy(update={"rpm": rpm, "tpm": 10**12})
                                            for t, s in cat.tiers.items()}})


def _clear_celery(r: redis.Redis) -> None:
    r.delete(*{celery_list(queue_for_tier("haiku"), p) for p in PRIORITIES})


def _stage(r: redis.Redis, *, entries: int, tenants: int, priorities: int, body: str) -> float:
    staging = Staging(redis_client=r, namespace=NS)
    msgs = [StagedMessage(id=f"e{i}", tier="haiku", priority=9 - (i % priorities), tenant=f"t{i % tenants}",
                          tokens=500, body=body) for i in range(entries)]
    t0 = time.perf_counter()
    for i in range(0, entries, 2000):
        staging.stage(msgs[i : i + 2000])
    return time.perf_counter() - t0


def bench_move(srv: PrivateRedis, *, entries: int, tenants: int, priorities: int, batch: int, body: str,
               seconds: float) -> dict:
    r = srv.client
    r.flushdb()
    stage_s = _stage(r, entries=entries, tenants=tenants, priorities=priorities, body=body)
    d = Dispatcher(redis_client=r, namespace=NS, catalog=_catalog(10**9), limits=LimitWindow(60.0, 1.0))
    d.publish_tenant_config()
    moved, calls = 0, 0
    cpu0, t0 = srv.cpu_s(), time.perf_counter()
    deadline = t0 + seconds
    while moved < entries and time.perf_counter() < deadline:
        res = d.dispatch(tier="haiku", max_moves=batch)
        moved += len(res.moved)
        calls += 1
        if calls % 50 == 0:
            _clear_celery(r)
    wall, cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    _clear_celery(r)
    return {"case": f"move/B={batch}/T={tenants}/P={priorities}", "entries": moved, "calls": calls,
            "stage_entries_per_s": round(entries / stage_s), "moved_per_s": round(moved / wall),
            "redis_cpu_us_per_entry": round(1e6 * cpu / max(moved, 1), 1),
            "redis_cpu_pct_of_a_core": round(100 * cpu / wall, 1)}


def bench_idle(srv: PrivateRedis, *, seconds: float, body: str, staged: bool) -> dict:
    r = srv.client
    r.flushdb()
    if staged:
        _stage(r, entries=1000, tenants=10, priorities=3, body=body)
    d = Dispatcher(redis_client=r, namespace=NS, catalog=_catalog(1), limits=LimitWindow(60.0, 1.0))
    d.publish_tenant_config()
    d.dispatch(tier="haiku", max_moves=10)  # takes the one slot; the next is a minute away
    calls = 0
    cpu0, t0 = srv.cpu_s(), time.perf_counter()
    while time.perf_counter() < t0 + seconds:
        res = d.dispatch(tier="haiku", max_moves=100, max_ready=1000)
        assert not res.moved and res.reason == ("model_limit" if staged else "empty")
        calls += 1
    wall, cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    return {"case": "idle-model-limit" if staged else "idle-nothing-staged", "calls": calls,
            "calls_per_s": round(calls / wall), "client_round_trip_us": round(1e6 * wall / calls, 1),
            "redis_cpu_us_per_call": round(1e6 * cpu / calls, 1)}


def bench_blocked(srv: PrivateRedis, *, blocked: int, seconds: float, body: str) -> dict:
    r = srv.client
    r.flushdb()
    tenants = TenantConfig(tenants={f"t{i}": TenantSpec(rpm=1) for i in range(blocked)})
    staging = Staging(redis_client=r, namespace=NS)
    staging.stage([StagedMessage(id=f"b{i}-{k}", tier="haiku", priority=5, tenant=f"t{i}", tokens=500, body=body)
                   for i in range(blocked) for k in range(3)])
    staging.stage([StagedMessage(id=f"f{k}", tier="haiku", priority=5, tenant="free", tokens=500, body=body)
                   for k in range(20_000)])
    d = Dispatcher(redis_client=r, namespace=NS, catalog=_catalog(10**9), tenants=tenants,
                   limits=LimitWindow(60.0, 1.0))
    d.publish_tenant_config()
    d.dispatch(tier="haiku", max_moves=blocked + 1)  # every limited tenant takes its one slot a minute
    moved, calls = 0, 0
    cpu0, t0 = srv.cpu_s(), time.perf_counter()
    while time.perf_counter() < t0 + seconds and moved < 19_000:
        res = d.dispatch(tier="haiku", max_moves=10)
        moved += len(res.moved)
        calls += 1
        if calls % 50 == 0:
            _clear_celery(r)
    wall, cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    _clear_celery(r)
    return {"case": f"blocked-tenants/T={blocked}", "moved": moved, "calls": calls,
            "moved_per_s": round(moved / wall), "redis_cpu_us_per_call": round(1e6 * cpu / calls, 1),
            "redis_cpu_us_per_entry": round(1e6 * cpu / max(moved, 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=20_000)
    p.add_argument("--body-bytes", type=int, default=1200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    body = json.dumps({"body": "x" * max(0, args.body_bytes - 12)})
    srv = PrivateRedis()
    results = {"load_avg_at_start": os.getloadavg(), "body_bytes": len(body), "cases": []}
    try:
        for batch, tenants, prios in [(1, 1, 1), (10, 1, 1), (100, 1, 1), (100, 100, 10), (100, 1000, 1)]:
            results["cases"].append(bench_move(srv, entries=args.entries, tenants=tenants, priorities=prios,
                                               batch=batch, body=body, seconds=args.seconds))
            print(json.dumps(results["cases"][-1]), flush=True)
        for staged in (False, True):
            results["cases"].append(bench_idle(srv, seconds=min(args.seconds, 5.0), body=body, staged=staged))
            print(json.dumps(results["cases"][-1]), flush=True)
        for blocked in (10, 100, 1000):
            results["cases"].append(bench_blocked(srv, blocked=blocked, seconds=min(args.seconds, 10.0), body=body))
            print(json.dumps(results["cases"][-1]), flush=True)
    finally:
        srv.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
