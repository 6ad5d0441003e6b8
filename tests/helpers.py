"""Helpers for tests: settings from a fleet environment, worker processes, producer processes.

Worker processes are started and stopped by :mod:`tars_tasks.supervisor` (own session, gone
when the test run dies, SIGTERM then SIGKILL), like ``tars fleet up``'s and loadgen's.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: Every table a test empties, children first (one list: a new table is added here only).
TABLES = "batch_items, provider_batches, job_steps, jobs, api_calls, requests, runs, dead_letters, mode_changes"


def empty_tables(engine) -> None:
    """Empty the application's tables (the schema stays)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))


def make_settings(env: dict[str, str], **overrides):
    from config.settings import Settings

    fields = {k.removeprefix("TARS_").lower(): v for k, v in env.items() if k.startswith("TARS_")}
    fields.update(overrides)
    return Settings(_env_file=None, **fields)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path
    name: str
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            if " ready." in self.log():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (warm shutdown), SIGKILL after ``timeout``; nothing of its group survives."""
        from tars_tasks import supervisor

        (code,) = supervisor.stop([self.proc], grace_s=timeout)
        return code


def run_producer_script(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python code as a separate producer process with the fleet's environment."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def start_producer_script(code: str, env: dict[str, str], *, args: list[str] = ()) -> subprocess.Popen:
    """Start Python code as a separate producer process; read it with ``communicate()``."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port(*, low: int, high: int) -> int:
    """A TCP port on 127.0.0.1 in [low, high] that nothing listens on now (ranges keep suites apart)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def waiting_messages(redis_client, *, tiers=None) -> int:
    """Messages waiting in the broker: in the tiers' Celery queue lists plus staged for dispatch
    (every namespace's staged counts: tests own their Redis database)."""
    from config.keys import PRIORITY_MAX, PRIORITY_MIN, TIERS, priority_list, queue_for_tier

    tiers = list(tiers or TIERS)
    pipe = redis_client.pipeline(transaction=False)
    for t in tiers:
        for p in range(PRIORITY_MIN, PRIORITY_MAX + 1):
            pipe.llen(priority_list(queue_for_tier(t), p))
    queued = sum(pipe.execute())
    counts = [k for t in tiers for k in redis_client.scan_iter(match=f"*:stage:{t}:count", count=1000)]
    staged = sum(int(v or 0) for v in redis_client.mget(counts)) if counts else 0
    return queued + staged


def fleet_snapshot(*, db, redis_url: str, namespace: str, workers=(), limit: int = 10) -> str:
    """What a stuck request looks like, for a failing test's message: every request not yet
    terminal with its attempts, the tier queues, kombu's unacked entries and their lease owners,
    the live leases, and the tail of each worker's log. Diagnostics only; asserts nothing."""
    import json

    import redis as redis_lib
    from sqlalchemy import text

    from config.keys import UNACKED_KEY, UNACKED_OWNER_KEY, lease_prefix

    lines: list[str] = []
    with db.connect() as conn:
        stuck = conn.execute(text(
            "SELECT id, status, tier_queued AS tier, attempts, submitted_at, started_at FROM requests "
            "WHERE status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY submitted_at LIMIT :n"),
            {"n": limit}).all()
        lines.append(f"{len(stuck)} request(s) not terminal (first {limit}):")
        for r in stuck:
            lines.append(f"  {r.id} {r.status} tier={r.tier} attempts={r.attempts} "
                         f"submitted={r.submitted_at} started={r.started_at}")
            for a in conn.execute(text("SELECT attempt, tier, outcome, worker, started_at, finished_at FROM api_calls "
                                       "WHERE request_id = :r ORDER BY started_at"), {"r": r.id}):
                lines.append(f"    call {a.attempt} {a.tier} {a.outcome} worker={a.worker} "
                             f"{a.started_at}→{a.finished_at}")
        try:
            jobs = conn.execute(text("SELECT id, status FROM jobs WHERE status = 'running' LIMIT :n"),
                                {"n": limit}).all()
        except Exception:
            jobs = []
        for j in jobs:
            lines.append(f"  job {j.id} running:")
            steps = text("SELECT s.step, s.item, s.revision, r.status, s.request_id FROM job_steps s "
                         "LEFT JOIN requests r ON r.id = s.request_id WHERE s.job_id = :j ORDER BY s.id")
            for s in conn.execute(steps, {"j": j.id}):
                lines.append(f"    step {s.step}[{s.item}]@r{s.revision} {s.status} request={s.request_id}")
    try:
        r = redis_lib.Redis.from_url(redis_url, socket_timeout=2)
        queues = {k.decode(): r.llen(k) for k in r.scan_iter(match="tars.*", count=1000) if r.type(k) == b"list"}
        lines.append(f"queues: {queues}")
        unacked = r.hgetall(UNACKED_KEY)
        owners = r.hgetall(UNACKED_OWNER_KEY)
        lines.append(f"unacked: {len(unacked)} entries")
        for tag, raw in list(unacked.items())[:limit]:
            try:
                body = json.loads(json.loads(raw)[0])
                task_id = body.get("headers", {}).get("id")
            except Exception:
                task_id = "?"
            lines.append(f"  {tag.decode()} task={task_id} owner={owners.get(tag, b'-').decode()}")
        live = [k.decode() for k in r.scan_iter(match=lease_prefix(namespace) + "*", count=1000)]
        lines.append(f"live leases: {live}")
    except Exception as exc:  # the snapshot must never hide the failure it describes
        lines.append(f"(redis unreadable: {exc})")
    for w in workers:
        lines.append(f"--- log tail of {w.name} (exit {w.proc.poll()}):")
        lines.extend(w.log().splitlines()[-15:])
    return "\n".join(lines)


class PrivateRedis:
    """A redis-server of one test's own on a free port (``aof``: an append-only file fsynced on every
    write, so :meth:`restart` keeps its data). Skips the test when redis-server is not installed."""

    def __init__(self, directory: Path, *, aof: bool = False) -> None:
        import shutil

        import pytest

        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        self.argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", *persistence, "--save", "",
                     "--dir", str(directory)]
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        import redis as redis_lib

        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis_lib.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return self
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.terminate()  # SIGTERM: Redis flushes the AOF and exits
        self.proc.wait(20)
        self.start()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


class MonitorCounts:
    """Commands a Redis server runs, counted by the kind ``classify(line)`` names (None: not counted).

    MONITOR streams every command in the order the server ran them, and the watcher thread reads
    that stream some time after the server ran them. :meth:`counts` therefore sends a marker of
    its own and returns only once the watcher has reached it, so every command the server ran
    before the call is counted; a failed watch fails the test with its error. Use a private
    server (:class:`PrivateRedis`): MONITOR sees every client's commands."""

    def __init__(self, url: str, classify) -> None:
        import threading

        import redis as redis_lib

        self._classify = classify
        self._seen: Counter = Counter()
        self._marks: set[str] = set()
        self._lock = threading.Condition()
        self._failed: list[BaseException] = []
        self._client = redis_lib.Redis.from_url(url)
        threading.Thread(target=self._run, args=(url,), daemon=True).start()

    def _run(self, url: str) -> None:
        import redis as redis_lib

        try:
            # no read timeout: redis-py 8 gives a connection 5 s by default, and a MONITOR of a quiet
            # server (no command while a worker starts) timed out and stopped counting
            with redis_lib.Redis.from_url(url, socket_timeout=None).monitor() as m:
                for cmd in m.listen():
                    line = cmd["command"]
                    with self._lock:
                        if line.startswith("ECHO") and "tars-test-mark-" in line:
                            self._marks.add(line.split()[-1])
                            self._lock.notify_all()
                        elif (kind := self._classify(line)) is not None:
                            self._seen[kind] += 1
        except BaseException as exc:  # the server went at the test's end, or the watch failed
            with self._lock:
                self._failed.append(exc)
                self._lock.notify_all()

    def counts(self) -> dict[str, int]:
        mark = f"tars-test-mark-{uuid.uuid4().hex}"
        deadline = time.monotonic() + 60
        with self._lock:
            # the first marks may go before the MONITOR is connected: send again until one is seen
            while mark not in self._marks:
                assert not self._failed, f"the MONITOR watch failed: {self._failed}"
                assert time.monotonic() < deadline, "the MONITOR did not reach a marker in 60 s"
                self._client.echo(mark)
                self._lock.wait(0.5)
            return dict(self._seen)
