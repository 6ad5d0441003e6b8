"""Benchmarks of the model-call path (run on demand; not part of the test suite).

    .venv/bin/python bench/bench_limiter.py all            # everything below, summary at the end
    .venv/bin/python bench/bench_limiter.py accuracy       # limiter accuracy under saturation
    .venv/bin/python bench/bench_limiter.py overhead       # µs per call added by limiter+breaker+retry
    .venv/bin/python bench/bench_limiter.py closed-loop    # C=1000 closed loop through the mock over HTTP

* **accuracy** — P processes x G greenlets loop "acquire, then call the mock" against one
  fleet limit; the mock counts what it received per second. Reported: the mean and the
  maximum over whole-second windows of the limiter's window length, as % of the limit.
* **overhead** — one process calls an instant in-process provider N times directly, and N
  times through :class:`workers.caller.ModelCaller` (breaker + limiter on real Redis, retry
  loop, attempt rows to a null writer), interleaved in rounds; the median difference per call.
* **closed-loop** — C greenlets over P processes each keep one call in flight through the full
  call path (ModelCaller → AnthropicProvider → mock over HTTP, fixed mock latency). Throughput
  in the steady window against Little's bound ``C / mock latency``. No Celery, no Postgres.

Redis: ``--redis-url`` (default db 3 on 127.0.0.1); the mock runs on 127.0.0.1 on a port in
18000-18999. All traffic stays on this machine; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/3"
BENCH_KEY = "sk-bench-not-a-real-key-0000"
MODEL = "bench-model"


# --- mock server -------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    for _ in range(200):
        port = random.randint(18000, 18299)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class Mock:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tars_tasks.cli", "mock-llm", "--port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self._get("/_mock/health")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("mock did not start")

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def per_second(self) -> dict[int, int]:
        secs = self._get("/_mock/stats")["models"].get(MODEL, {}).get("per_second", {})
        return {int(s): int(c.get("requests", 0)) for s, c in secs.items()}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _windows(per_second: dict[int, int], window_s: int) -> list[int]:
    lo, hi = min(per_second) + 1, max(per_second) - 1  # whole seconds only: drop the partial ends
    series = [per_second.get(s, 0) for s in range(lo, hi + 1)]
    return [sum(series[i : i + window_s]) for i in range(0, len(series) - window_s + 1)]


def _spec(*, base_url: str, rpm: int, tpm: int, timeout_s: float = 30):
    from config.catalog import ModelSpec

    return ModelSpec(tier="haiku", model=MODEL, provider="anthropic", base_url=base_url, api_key_env="BENCH_KEY",
                     input_usd_per_mtok=1, output_usd_per_mtok=5, rpm=rpm, tpm=tpm, timeout_s=timeout_s,
                     max_attempts=4, retry_budget_s=60, output_tokens=(10, 20))


def _children(role: str, procs: int, extra: list[str]) -> list[subprocess.Popen]:
    env = {**os.environ, "BENCH_KEY": BENCH_KEY}
    return [subprocess.Popen([sys.executable, __file__, role, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             text=True) for _ in range(procs)]


# --- accuracy ----------------------------------------------------------------------------------


def accuracy(args) -> dict:
    mock = Mock("--latency", "uniform:5:20")
    ns = f"bench{uuid.uuid4().hex[:8]}"
    try:
        extra = ["--redis-url", args.redis_url, "--ns", ns, "--base-url", mock.url, "--greenlets",
                 str(args.greenlets), "--rpm", str(args.rpm), "--window-s", str(args.window_s), "--duration-s",
                 str(args.duration_s), "--utilisation", str(args.utilisation)]
        kids = _children("_accuracy_child", args.procs, extra)
        sent = sum(json.loads(k.communicate(timeout=args.duration_s + 120)[0])["calls"] for k in kids)
        per_second = mock.per_second()
    finally:
        mock.close()
    w = _windows(per_second, int(args.window_s))
    out = {
        "limit_per_window": args.rpm, "window_s": args.window_s, "utilisation_setting": args.utilisation,
        "processes": args.procs, "greenlets_per_process": args.greenlets, "calls": sent,
        "windows": len(w), "mean_pct_of_limit": round(100 * statistics.mean(w) / args.rpm, 2),
        "max_pct_of_limit": round(100 * max(w) / args.rpm, 2), "min_pct_of_limit": round(100 * min(w) / args.rpm, 2),
    }
    print(json.dumps({"accuracy": out}), flush=True)
    return out


def _accuracy_child(args) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import redis

    from workers.providers import AnthropicProvider
    from workers.providers.request import ModelRequest
    from workers.ratelimit import FleetRateLimiter, LimitSpec

    r = redis.Redis.from_url(args.redis_url, max_connections=2000)
    limiter = FleetRateLimiter(redis_client=r, namespace=args.ns, window_s=args.window_s,
                               utilisation=args.utilisation, max_wait_s=30)
    spec = _spec(base_url=args.base_url, rpm=args.rpm, tpm=10**12)
    limits = LimitSpec(rpm=spec.rpm, tpm=spec.tpm)
    provider = AnthropicProvider()
    deadline = time.monotonic() + args.duration_s
    calls = 0

    def loop() -> None:
        nonlocal calls
        while time.monotonic() < deadline:
            limiter.acquire(provider="anthropic", model=MODEL, limits=limits, tokens=1, deadline_s=deadline)
            provider.complete(spec=spec, request=ModelRequest.from_fields(prompt="count me"), request_id="b", attempt=1)
            calls += 1

    def guarded() -> None:
        try:
            loop()
        except TimeoutError:
            pass

    gevent.joinall([gevent.spawn(guarded) for _ in range(args.greenlets)])
    print(json.dumps({"calls": calls, "late_slots": limiter.late_slots}))


# --- overhead ----------------------------------------------------------------------------------


class _InstantProvider:
    name = "instant"

    def __init__(self) -> None:
        from workers.providers import Completion

        self.done = Completion(text="ok", input_tokens=10, output_tokens=20)

    def complete(self, *, spec, prompt, request_id, attempt):
        return self.done


class _NullWriter:
    def record(self, api_rows) -> None:
        pass


def overhead(args) -> dict:
    import redis

    from config.catalog import load_catalog
    from config.settings import Settings
    from workers.caller import ModelCaller

    r = redis.Redis.from_url(args.redis_url)
    ns = f"bench{uuid.uuid4().hex[:8]}"
    settings = Settings(_env_file=None, broker_url=args.redis_url, namespace=ns)
    catalog = load_catalog()
    big = {t: s.model_copy(update={"rpm": 10**9, "tpm": 10**12}) for t, s in catalog.tiers.items()}
    catalog = catalog.model_copy(update={"tiers": big})
    caller = ModelCaller(settings=settings, catalog=catalog, writer=_NullWriter(), redis_client=r)
    provider = _InstantProvider()
    caller._providers = {t: provider for t in catalog.tiers}
    spec = caller.spec("haiku")
    rid = str(uuid.uuid4())

    def direct(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            provider.complete(spec=spec, prompt="p", request_id=rid, attempt=i)
        return (time.perf_counter() - t0) / n

    cpu: list[float] = []

    def wrapped(n: int) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            caller.call(request_id=rid, tier="haiku", prompt="p", worker="bench")
        cpu.append((time.process_time() - c0) / n)
        return (time.perf_counter() - t0) / n

    def limiter_only(n: int) -> float:
        from workers.ratelimit import LimitSpec

        lim = LimitSpec(rpm=10**9, tpm=10**12)
        t0 = time.perf_counter()
        for _ in range(n):
            caller.limiter.try_reserve(provider="instant", model=spec.model, limits=lim, tokens=10)
        return (time.perf_counter() - t0) / n

    def breaker_only(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            caller.breaker.allow(provider="instant", model=spec.model)
        return (time.perf_counter() - t0) / n

    wrapped(200)  # warm up: script load, connections
    rounds = 5
    per = max(1, args.calls // rounds)
    d, w, lo, bo = [], [], [], []
    cpu.clear()
    for _ in range(rounds):
        d.append(direct(per))
        w.append(wrapped(per))
        lo.append(limiter_only(per))
        bo.append(breaker_only(per))
    us = lambda xs: round(statistics.median(xs) * 1e6, 1)  # noqa: E731
    out = {"calls_per_round": per, "rounds": rounds, "direct_us": us(d), "wrapped_us": us(w),
           "added_us": round(us(w) - us(d), 1), "wrapped_cpu_us": us(cpu), "limiter_round_trip_us": us(lo),
           "breaker_round_trip_us": us(bo)}
    print(json.dumps({"overhead": out}), flush=True)
    return out


# --- closed loop -------------------------------------------------------------------------------


def closed_loop(args) -> dict:
    mock = Mock("--latency", f"fixed:{args.latency_ms}", "--output-tokens", "20:20")
    ns = f"bench{uuid.uuid4().hex[:8]}"
    per_proc = args.concurrency // args.procs
    try:
        extra = ["--redis-url", args.redis_url, "--ns", ns, "--base-url", mock.url, "--greenlets", str(per_proc),
                 "--duration-s", str(args.duration_s), "--warmup-s", str(args.warmup_s)]
        kids = _children("_closed_child", args.procs, extra)
        results = [json.loads(k.communicate(timeout=args.duration_s + 180)[0]) for k in kids]
        stats = mock._get("/_mock/stats")
    finally:
        mock.close()
    steady_s = args.duration_s - args.warmup_s
    done = sum(r["steady_calls"] for r in results)
    lat = [x for r in results for x in r["latencies_ms"]]
    throughput = done / steady_s
    bound = per_proc * args.procs / (args.latency_ms / 1000)
    out = {
        "concurrency": per_proc * args.procs, "processes": args.procs, "mock_latency_ms": args.latency_ms,
        "steady_s": steady_s, "completed_in_steady_window": done, "failed": sum(r["failed"] for r in results),
        "throughput_per_s": round(throughput, 1), "littles_bound_per_s": round(bound, 1),
        "pct_of_littles_bound": round(100 * throughput / bound, 1),
        "mean_latency_ms": round(statistics.mean(lat), 1) if lat else None,
        "p99_latency_ms": round(sorted(lat)[int(0.99 * (len(lat) - 1))], 1) if lat else None,
        "mock_max_in_flight": stats["max_in_flight"],
    }
    print(json.dumps({"closed_loop": out}), flush=True)
    return out


def _closed_child(args) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import redis

    from config.catalog import load_catalog
    from config.settings import Settings
    from workers.caller import ModelCaller

    r = redis.Redis.from_url(args.redis_url, max_connections=4000)
    settings = Settings(_env_file=None, broker_url=args.redis_url, namespace=args.ns,
                        provider_override="anthropic", provider_base_url=args.base_url)
    catalog = load_catalog()
    tiers = {t: s.model_copy(update={"rpm": 10**9, "tpm": 10**12, "api_key_env": "BENCH_KEY", "model": MODEL,
                                     "output_tokens": (10, 20), "timeout_s": 60})
             for t, s in catalog.tiers.items()}
    caller = ModelCaller(settings=settings, catalog=catalog.model_copy(update={"tiers": tiers}),
                         writer=_NullWriter(), redis_client=r)
    start = time.monotonic()
    steady_from, deadline = start + args.warmup_s, start + args.duration_s
    steady, failed, latencies = 0, 0, []

    def loop() -> None:
        nonlocal steady, failed
        while True:
            t0 = time.monotonic()
            if t0 >= deadline:
                return
            out = caller.call(request_id=str(uuid.uuid4()), tier="haiku", prompt="closed loop", worker="bench")
            t1 = time.monotonic()
            if out.status != "succeeded":
                failed += 1
            elif steady_from <= t1 < deadline:
                steady += 1
                latencies.append((t1 - t0) * 1000)

    gevent.joinall([gevent.spawn(loop) for _ in range(args.greenlets)])
    print(json.dumps({"steady_calls": steady, "failed": failed, "latencies_ms": latencies}))


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "accuracy", "overhead", "closed-loop", "_accuracy_child", "_closed_child"])
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--procs", type=int, default=None)
    p.add_argument("--greenlets", type=int, default=50)
    p.add_argument("--rpm", type=int, default=1200, help="accuracy: the limit per window")
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--utilisation", type=float, default=0.98)
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=2000.0)
    p.add_argument("--ns", default="bench")
    p.add_argument("--base-url", default="")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    if args.what == "_accuracy_child":
        return _accuracy_child(args)
    if args.what == "_closed_child":
        return _closed_child(args)
    results = {}
    if args.what in ("all", "accuracy"):
        ns = argparse.Namespace(**{**vars(args), "procs": args.procs or 4, "duration_s": args.duration_s or 30})
        results["accuracy"] = accuracy(ns)
    if args.what in ("all", "overhead"):
        results["overhead"] = overhead(args)
    if args.what in ("all", "closed-loop"):
        ns = argparse.Namespace(**{**vars(args), "procs": args.procs or 2, "duration_s": args.duration_s or 25})
        results["closed_loop"] = closed_loop(ns)
    print(json.dumps(results, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
