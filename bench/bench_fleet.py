"""Fleet benchmark (issue 2): the full pipeline against bare Celery, in one run.

    .venv/bin/python bench/bench_fleet.py --processes 2 --backlog 6000 --levels 100,1000,2000

1. bare Celery: a no-op task, ``ignore_result``, same Redis, same worker processes/pool —
   drain a pre-filled backlog; tasks/s.
2. full pipeline, zero-latency simulated model: drain a pre-filled backlog of requests whose
   rows are durable in Postgres; requests/s from the rows (first start .. last finish), and
   its ratio to (1).
3. closed loop with the seed's latency (uniform 0.5-2.5 s, no injected failures): keep C in
   flight for a steady window; throughput as % of Little's bound (C / mean model latency
   measured from the api_calls rows of the window), p99 end-to-end minus p99 model latency, and
   the latency added to each request (end to end minus its own call), split into stages from its
   rows' timestamps (``added_ms_by_stage``: submit, to the call, after it, to the client), and
   how long a client slot sat between hearing its request done and sending the next
   (``client_gap_ms``).
4. bare Celery closed loop at each C: a task that sleeps the same U(0.5, 2.5) s (gevent) and
   LPUSHes its token; the producer BRPOPs and sends the next — the same shape as (3). Its added
   latency per request is end to end minus the sleep it asked for (a late wake-up counts as added).
5. For every part: CPU seconds per request (per task) of each process group — the producer
   (this process), the worker processes, redis-server, the Postgres backends of the bench
   database — and worker RSS in the middle of each closed-loop window; memory per in-flight
   request is the slope of worker RSS against C. ``--soak S``: S seconds at C = 1,000, worker RSS
   every 10 s, slope after the first minute and over the soak's second half (MB/min).
   ``--profile DIR``: py-spy records one worker during the pipeline drain (a speedscope file per run).

Everything runs against 127.0.0.1 and is bounded. Results print as JSON (``--out`` to save).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meters import CpuMeter, postgres_backends, redis_pid, rss_bytes, slope, tree
from pgdb import fresh_db

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _fresh_db(name: str) -> str:
    return fresh_db(name)


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


#: The Redis server every part uses (``--redis-url``: host and port; the db numbers below are fixed).
REDIS_BASE = "redis://127.0.0.1:6379"
REDIS_ADMIN = redis.Redis.from_url(f"{REDIS_BASE}/0")


def _set_redis(base: str) -> None:
    global REDIS_BASE, REDIS_ADMIN
    REDIS_BASE = base.rstrip("/")
    REDIS_ADMIN = redis.Redis.from_url(f"{REDIS_BASE}/0")


def _meter(procs: list[subprocess.Popen], *, db_name: str | None = None) -> CpuMeter:
    groups = {"producer": lambda: [os.getpid()],
              "workers": lambda: [pid for p in procs for pid in tree(p.pid)],
              "redis": lambda: [pid] if (pid := redis_pid(REDIS_ADMIN)) else []}
    if db_name:
        groups["postgres"] = postgres_backends(PG_ADMIN, db_name)
    return CpuMeter(groups)


def _per(cpu: dict[str, float], n: int) -> dict[str, float]:
    """CPU milliseconds per request (per task) of each group, and their sum."""
    out = {k: 1000 * v / n for k, v in cpu.items()} if n else {k: 0.0 for k in cpu}
    out["total"] = sum(out.values())
    return out


def _worker_rss_mid(procs: list[subprocess.Popen], at_s: float, into: dict) -> threading.Timer:
    def sample() -> None:
        into["worker_rss_bytes"] = rss_bytes([pid for p in procs for pid in tree(p.pid)])

    t = threading.Timer(at_s, sample)
    t.daemon = True
    t.start()
    return t


def _queue_len(r: redis.Redis, queue: str) -> int:
    pipe = r.pipeline()
    pipe.llen(queue)
    for i in range(1, 10):
        pipe.llen(f"{queue}:{i}")
    pipe.hlen("unacked")
    return sum(pipe.execute())


def bench_bare(*, processes: int, concurrency: int, backlog: int, tmp: Path) -> dict:
    url = f"{REDIS_BASE}/10"
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
    meter = _meter(procs).start()
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
        cpu = meter.stop()
    finally:
        _stop(procs)
    return {"tasks": backlog, "seconds": t1 - t0, "tasks_per_s": backlog / (t1 - t0),
            "cpu_ms_per_task": _per(cpu, backlog)}


def bench_bare_closed(*, processes: int, concurrency: int, levels: list[int], duration_s: float, warmup_s: float,
                      tmp: Path) -> list[dict]:
    """Bare Celery, closed loop: C sleeps of U(0.5, 2.5) s in flight, each completion sends the next."""
    import random

    url = f"{REDIS_BASE}/10"
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {"BARE_BROKER_URL": url, "PYTHONPATH": str(ROOT / "bench")}
    os.environ["BARE_BROKER_URL"] = url
    from bare_celery_app import app as bare_app

    logs = [tmp / f"bare-closed-{i}.log" for i in range(processes)]
    procs = [_start([sys.executable, "-m", "celery", "-A", "bare_celery_app", "worker", "-P", "gevent",
                     "-c", str(concurrency), "-n", f"bareclosed{i}@%h", "--without-mingle", "--without-gossip",
                     "-l", "INFO"], env, logs[i]) for i in range(processes)]
    out = []
    try:
        _wait_ready(logs)
        for c in levels:
            r.delete("bare:done")
            rng = random.Random(c)
            sent: dict[str, tuple[float, float]] = {}
            done: list[tuple[float, float, float]] = []  # (done at, end to end, sleep)
            mid: dict = {}
            with bare_app.producer_or_acquire() as producer:
                def send(rng=rng, sent=sent, producer=producer) -> None:
                    token = uuid.uuid4().hex
                    seconds = rng.uniform(0.5, 2.5)
                    sent[token] = (time.monotonic(), seconds)
                    bare_app.send_task("bare.sleep", kwargs={"token": token, "seconds": seconds}, producer=producer)

                meter = _meter(procs).start()
                begin = time.monotonic()
                w0, w1 = begin + warmup_s, begin + warmup_s + duration_s
                timer = _worker_rss_mid(procs, warmup_s + duration_s / 2, mid)
                for _ in range(c):
                    send()
                while time.monotonic() < w1:
                    got = r.brpop("bare:done", timeout=1)
                    if got is None:
                        continue
                    now = time.monotonic()
                    mine = sent.pop(got[1].decode(), None)
                    if mine is None:  # a straggler of the previous level (its drain is bounded): not ours
                        continue
                    t_send, seconds = mine
                    done.append((now, now - t_send, seconds))
                    send()
                deadline = time.monotonic() + 10  # drain what is in flight, bounded
                while sent and time.monotonic() < deadline:
                    got = r.brpop("bare:done", timeout=1)
                    if got is not None:
                        sent.pop(got[1].decode(), None)
                cpu = meter.stop()
                timer.cancel()
            window = [d for d in done if w0 <= d[0] <= w1]
            e2e, sleeps = [d[1] for d in window], [d[2] for d in window]
            mean_sleep = statistics.fmean(sleeps)
            thr = len(window) / duration_s
            bound = c / mean_sleep
            out.append({"concurrency": c, "window_s": duration_s, "completed_in_window": len(window),
                        "throughput_per_s": thr, "mean_model_latency_s": mean_sleep, "littles_bound_per_s": bound,
                        "pct_of_bound": 100 * thr / bound,
                        "p99_added_ms": 1000 * (_pct(e2e, 99) - _pct(sleeps, 99)),
                        "p50_added_ms": 1000 * (_pct(e2e, 50) - _pct(sleeps, 50)),
                        "added_ms_per_request": _summary([1000 * (a - b) for a, b in zip(e2e, sleeps, strict=True)]),
                        "cpu_ms_per_task": _per(cpu, len(done)), "worker_rss_bytes": mid.get("worker_rss_bytes"),
                        "unfinished": len(sent)})
            print(json.dumps(out[-1]), flush=True)
    finally:
        _stop(procs)
    return out


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
    return {"TARS_BROKER_URL": f"{REDIS_BASE}/9", "TARS_DATABASE_URL": db_url,
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


def bench_pipeline(*, db_url: str, processes: int, concurrency: int, backlog: int, tmp: Path,
                   profile: Path | None = None) -> dict:
    from sqlalchemy import text

    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    redis.Redis.from_url(f"{REDIS_BASE}/9").flushdb()
    env = _fleet_env(db_url, TARS_SIM_LATENCY="fixed:0")
    settings = make_settings(env)
    with TarsClient(settings=settings) as client:
        with client.engine.begin() as conn:
            conn.execute(text("TRUNCATE api_calls, requests, runs CASCADE"))
        for i in range(0, backlog, 500):
            chunk = range(i, min(backlog, i + 500))
            client.submit_many([{"role": "researcher", "prompt": f"bench {j}"} for j in chunk])
        waiting = _waiting_messages(settings)  # before any worker: what the backlog is in the broker
        procs, logs = _start_fleet(env, processes=processes, concurrency=concurrency, tmp=tmp, tag="zero")
        _wait_ready(logs)  # start-up (imports, connections) is not what a request costs
        meter = _meter(procs, db_name=db_url.rsplit("/", 1)[1]).start()
        spy = None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(procs[0].pid),
                                    "--format", "speedscope", "--rate", "200", "--gil",
                                    "--output", str(profile / "worker-drain.speedscope.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with client.engine.connect() as conn:
                    left = conn.execute(text("SELECT count(*) FROM requests WHERE status='queued'")).scalar()
                if left == 0:
                    break
                time.sleep(0.2)
            cpu = meter.stop()
            with client.engine.connect() as conn:
                row = conn.execute(text("SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)), "
                                        "count(*) FILTER (WHERE status='succeeded') FROM requests")).one()
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            _stop(procs)
    n, span, ok = int(row[0]), float(row[1]), int(row[2])
    return {"requests": n, "succeeded": ok, "seconds": span, "requests_per_s": n / span,
            "cpu_ms_per_request": _per(cpu, n), "broker_messages": waiting}


def _waiting_messages(settings) -> dict[str, int]:
    """The backlog as the broker holds it before a worker runs: requests staged, staging entries and
    Celery-list messages (with bundles on, entries and messages are fewer than requests)."""
    from config.keys import TIERS, stage_count_key, stage_prefix
    from tars_tasks.broker.presence import tier_lists

    r = redis.Redis.from_url(settings.broker_redis_url)
    try:
        staged = sum(int(r.get(stage_count_key(settings.namespace, t)) or 0) for t in TIERS)
        entries = sum(r.llen(k) for t in TIERS for k in r.scan_iter(match=f"{stage_prefix(settings.namespace, t)}:q:*"))
        listed = sum(r.llen(k) for k in tier_lists(TIERS))
    finally:
        r.close()
    return {"staged_requests": staged, "staging_entries": entries, "celery_messages": listed}


def _pct(values: list[float], q: float) -> float:
    from hdrh.histogram import HdrHistogram

    h = HdrHistogram(1, 3_600_000_000, 3)  # microseconds
    for v in values:
        h.record_value(max(1, int(v * 1e6)))
    return h.get_value_at_percentile(q) / 1e6


#: The stages of a request's added latency, between the timestamps a closed loop has for it: the
#: client's (epoch clock: ``send_start``, ``done_at``) and its rows' (the coordinator's
#: ``requests.submitted_at``, the worker's ``api_calls.started_at`` / ``finished_at`` of the call
#: that answered, ``requests.finished_at``). The stages add up to end-to-end minus the call:
#: ``total``, what the pipeline added to that one request (a percentile of these is not the
#: difference of two percentiles, ``p99_added_ms``, which two wide distributions make noisy).
STAGES = (
    ("submit", "send_start", "submitted_at"),         # the client's submit up to its row's timestamp
    ("to_call", "submitted_at", "call_started_at"),   # admitted, staged, fetched, loaded, limiter
    ("after_call", "call_finished_at", "finished_at"),  # the worker's bookkeeping of the answer
    ("to_client", "finished_at", "done_at"),          # group commit, ack, notice, the client hears it
)


def _added_by_stage(engine, run_id: str, done: list) -> dict:
    """p50 / p99 / mean (ms) of each of :data:`STAGES` over the window's completed requests."""
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = {r[0]: r[1:] for r in conn.execute(text(
            "SELECT r.id, extract(epoch FROM r.submitted_at), extract(epoch FROM a.started_at), "
            "extract(epoch FROM a.finished_at), extract(epoch FROM r.finished_at) "
            "FROM requests r JOIN api_calls a ON a.request_id = r.id "
            "WHERE r.run_id = :r AND a.outcome = 'ok'"), {"r": run_id})}
    spans: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    added: list[float] = []
    for s in done:
        row = rows.get(s.request_id)
        if row is None or None in row:
            continue
        t = {"send_start": s.send_start, "done_at": s.done_at, "submitted_at": float(row[0]),
             "call_started_at": float(row[1]), "call_finished_at": float(row[2]), "finished_at": float(row[3])}
        for name, a, b in STAGES:
            spans[name].append(1000 * (t[b] - t[a]))
        added.append(1000 * (t["done_at"] - t["send_start"] - (t["call_finished_at"] - t["call_started_at"])))
    return {"total": _summary(added), **{name: _summary(v) for name, v in spans.items()}}


def _client_gap_ms(samples: list, w0: float, w1: float) -> dict:
    """How long a closed-loop client slot sat idle between hearing that its request was done and
    sending its next (``done_at`` to the next ``send_start`` of the same slot), for next requests
    sent in the window. Little's bound counts only the model's time, so this gap lowers the % of
    the bound as the pipeline's added latency does: it is the producer's own loop and submit."""
    last: dict[int, float] = {}
    gaps: list[float] = []
    for s in sorted((x for x in samples if x.slot is not None), key=lambda x: x.send_start):
        prev = last.get(s.slot)
        if prev is not None and w0 <= s.send_start <= w1:
            gaps.append(1000 * (s.send_start - prev))
        if s.done_at is not None:
            last[s.slot] = s.done_at
    return _summary(gaps)


def _summary(ms: list[float]) -> dict:
    """n, mean, p50 and p99 (nearest rank) of per-request milliseconds."""
    if not ms:
        return {"n": 0, "mean": None, "p50": None, "p99": None}
    ordered = sorted(ms)
    return {"n": len(ms), "mean": statistics.fmean(ms), "p50": statistics.median(ms),
            "p99": ordered[math.ceil(0.99 * len(ordered)) - 1]}


def bench_closed_loop(*, db_url: str, processes: int, concurrency: int, levels: list[int], duration_s: float,
                      warmup_s: float, tmp: Path) -> list[dict]:
    from sqlalchemy import text

    from loadgen.drivers import ClosedLoop
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    redis.Redis.from_url(f"{REDIS_BASE}/9").flushdb()
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
                mid: dict = {}
                meter = _meter(procs, db_name=db_url.rsplit("/", 1)[1]).start()
                timer = _worker_rss_mid(procs, warmup_s + duration_s / 2, mid)
                res = drv.run()
                cpu = meter.stop()
                timer.cancel()
                finished = sum(1 for x in res.samples if x.done_at is not None)
                w0, w1 = res.window
                done = [s for s in res.samples if s.done_at is not None and w0 <= s.done_at <= w1]
                e2e = [s.done_at - s.send_start for s in done]
                with client.engine.connect() as conn:
                    lat = [float(x) / 1000 for x in conn.execute(text(
                        "SELECT a.latency_ms FROM api_calls a JOIN requests r ON r.id = a.request_id "
                        "WHERE r.run_id = :r AND a.outcome = 'ok'"), {"r": run_id}).scalars()]
                stages = _added_by_stage(client.engine, run_id, done)
                gap = _client_gap_ms(res.samples, w0, w1)
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
                    "cpu_ms_per_request": _per(cpu, finished), "worker_rss_bytes": mid.get("worker_rss_bytes"),
                    "added_ms_by_stage": stages, "client_gap_ms": gap,
                })
                print(json.dumps(out[-1]), flush=True)
    finally:
        _stop(procs)
    return out


def bench_soak(*, db_url: str, processes: int, concurrency: int, c: int, soak_s: float, tmp: Path,
               settle_s: float = 60.0, every_s: float = 10.0) -> dict:
    """``c`` in flight for ``soak_s``; worker RSS every ``every_s``; slope after ``settle_s`` (MB/min)."""
    from loadgen.drivers import ClosedLoop
    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings

    redis.Redis.from_url(f"{REDIS_BASE}/9").flushdb()
    env = _fleet_env(db_url, TARS_SIM_LATENCY="uniform:500:2500")
    procs, logs = _start_fleet(env, processes=processes, concurrency=concurrency, tmp=tmp, tag="soak")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(every_s):
            samples.append((time.monotonic() - t0, rss_bytes([pid for p in procs for pid in tree(p.pid)])))

    try:
        _wait_ready(logs)
        with TarsClient(settings=make_settings(env)) as client:
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            res = ClosedLoop(producer=client, factory=lambda i: {"role": "researcher", "prompt": f"s{i}"},
                             concurrency=c, duration_s=soak_s, warmup_s=0).run()
            stop.set()
    finally:
        _stop(procs)
    # A sample taken as the loop ends (no new requests, those in flight finishing: RSS falls by
    # ~1 MiB) is not of C in flight; counted, it bends the slope down, so only samples up to
    # half a period before the end are.
    def mib_per_min(t0: float) -> float:
        after = [(x, y) for x, y in samples if t0 <= x <= soak_s - every_s / 2]
        return slope([x / 60 for x, _ in after], [y / 2**20 for _, y in after])

    # The first minute is the warm-up the target allows; the second half is shown beside it, since
    # RSS that follows a running peak (the allocator keeps what the busiest moment touched) rises
    # for longer than a minute, ever more slowly, where a leak keeps its slope.
    return {"concurrency": c, "seconds": soak_s, "completed": sum(1 for x in res.samples if x.done_at is not None),
            "rss_samples": [[round(x, 1), y] for x, y in samples], "settle_s": settle_s,
            "rss_slope_mib_per_min_after_settle": mib_per_min(settle_s),
            "rss_slope_mib_per_min_second_half": mib_per_min(soak_s / 2)}


def memory_per_in_flight(levels: list[dict]) -> float | None:
    """KiB of worker RSS per request in flight: the slope of RSS against C across the levels."""
    pts = [(lv["concurrency"], lv["worker_rss_bytes"]) for lv in levels if lv.get("worker_rss_bytes")]
    if len(pts) < 2:
        return None
    return slope([x for x, _ in pts], [y / 1024 for _, y in pts])


def _per_request_txt(summary: dict | None) -> str:
    if not summary or summary.get("p99") is None:
        return ""
    return f" (per request: p50 +{summary['p50']:,.0f}, p99 +{summary['p99']:,.0f} ms)"


def ratio_table(result: dict) -> str:
    """The issue's table: bare Celery against the pipeline, from this one run."""
    rows = ["| figure | bare Celery | TARS full pipeline | pipeline / bare |", "|---|---|---|---|"]
    bare, pipe = result.get("bare_celery_noop"), result.get("pipeline_zero_latency")
    if bare and pipe:
        rows.append(f"| drain of a {bare['tasks']:,} backlog, zero-latency model | "
                    f"{bare['tasks_per_s']:,.0f} tasks/s | {pipe['requests_per_s']:,.0f} req/s | "
                    f"{pipe['requests_per_s'] / bare['tasks_per_s']:.2f}x |")
        rows.append(f"| CPU per request in that drain (all processes) | {bare['cpu_ms_per_task']['total']:.2f} ms | "
                    f"{pipe['cpu_ms_per_request']['total']:.2f} ms | "
                    f"{pipe['cpu_ms_per_request']['total'] / max(bare['cpu_ms_per_task']['total'], 1e-9):.2f}x |")
    bc = {lv["concurrency"]: lv for lv in result.get("bare_closed_loop", [])}
    for lv in result.get("closed_loop", []):
        c, b = lv["concurrency"], bc.get(lv["concurrency"])
        bare_txt = (f"{b['pct_of_bound']:.1f}% ({b['throughput_per_s']:,.0f}/s), p99 +{b['p99_added_ms']:,.0f} ms"
                    + _per_request_txt(b.get("added_ms_per_request")) if b else "not run")
        rows.append(f"| closed loop C = {c:,}, % of Little's bound | {bare_txt} | {lv['pct_of_bound']:.1f}% "
                    f"({lv['throughput_per_s']:,.0f}/s), p99 +{lv['p99_added_ms']:,.0f} ms"
                    + _per_request_txt((lv.get("added_ms_by_stage") or {}).get("total")) + " | "
                    + (f"{lv['throughput_per_s'] / b['throughput_per_s']:.2f}x |" if b else "- |"))
    mb, mp = result.get("bare_kib_per_in_flight"), result.get("pipeline_kib_per_in_flight")
    if mb is not None or mp is not None:
        rows.append(f"| worker RSS per request in flight | {mb:.1f} KiB | {mp:.1f} KiB | - |" if mb is not None
                    and mp is not None else f"| worker RSS per request in flight | - | {mp or 0:.1f} KiB | - |")
    if "soak" in result:
        so = result["soak"]
        rows.append(f"| soak C = {so['concurrency']:,}, {so['seconds']:.0f} s: RSS slope after "
                    f"{so['settle_s']:.0f} s | - | {so['rss_slope_mib_per_min_after_settle']:+.2f} MiB/min | - |")
        if "rss_slope_mib_per_min_second_half" in so:
            rows.append(f"| soak: RSS slope over its second half (from {so['seconds'] / 2:.0f} s) | - | "
                        f"{so['rss_slope_mib_per_min_second_half']:+.2f} MiB/min | - |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=1200, help="greenlets per worker process")
    ap.add_argument("--backlog", type=int, default=6000)
    ap.add_argument("--levels", default="100,1000,2000")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--skip", default="", help="comma list of: bare,pipeline,closed,bare-closed")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of soak at C = 1,000 (0: none)")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy one worker of the pipeline drain into DIR")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                    help="the Redis server (no db: the bench uses dbs 9 and 10 of it)")
    ap.add_argument("--pg-db", default="tars_bench", help="the Postgres database to create afresh")
    args = ap.parse_args()
    _set_redis(args.redis_url)
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tars-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    db_url = _fresh_db(args.pg_db)
    result: dict = {"processes": args.processes, "concurrency_per_process": args.concurrency,
                    "cpu_count": os.cpu_count()}
    if "bare" not in skip:
        result["bare_celery_noop"] = bench_bare(processes=args.processes, concurrency=args.concurrency,
                                                backlog=args.backlog, tmp=tmp)
        print(json.dumps(result["bare_celery_noop"]), flush=True)
    if "pipeline" not in skip:
        result["pipeline_zero_latency"] = bench_pipeline(db_url=db_url, processes=args.processes,
                                                         concurrency=args.concurrency, backlog=args.backlog, tmp=tmp,
                                                         profile=args.profile)
        print(json.dumps(result["pipeline_zero_latency"]), flush=True)
        if "bare_celery_noop" in result:
            result["pipeline_to_bare_ratio"] = (result["pipeline_zero_latency"]["requests_per_s"]
                                                / result["bare_celery_noop"]["tasks_per_s"])
    levels = [int(x) for x in args.levels.split(",")]
    if "bare-closed" not in skip:
        result["bare_closed_loop"] = bench_bare_closed(processes=args.processes, concurrency=args.concurrency,
                                                       levels=levels, duration_s=args.duration,
                                                       warmup_s=args.warmup, tmp=tmp)
        result["bare_kib_per_in_flight"] = memory_per_in_flight(result["bare_closed_loop"])
    if "closed" not in skip:
        result["closed_loop"] = bench_closed_loop(
            db_url=db_url, processes=args.processes, concurrency=args.concurrency,
            levels=levels, duration_s=args.duration, warmup_s=args.warmup, tmp=tmp)
        result["pipeline_kib_per_in_flight"] = memory_per_in_flight(result["closed_loop"])
    if args.soak > 0:
        result["soak"] = bench_soak(db_url=db_url, processes=args.processes, concurrency=args.concurrency,
                                    c=1000, soak_s=args.soak, tmp=tmp)
    print(json.dumps(result, indent=2))
    print()
    print(ratio_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
