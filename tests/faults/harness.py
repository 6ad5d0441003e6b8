"""The fault harness: a real fleet (worker processes, Redis, Postgres), fault injection, and the
audit every fault case ends with. Used by the fault tests (small N) and by ``bench/faults.py``
(N >= 1000), so both run exactly the same cases.

The audit is always the same question (GUIDE §5): N requests submitted with unique ids ->
exactly N terminal rows (succeeded, or failed with a reason), none pending, and every request
row's attempts, tokens and cost equal to the sum of its api_calls.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, text

from tars_tasks import supervisor
from tests.helpers import ROOT, WorkerProcess, make_settings


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


@dataclass
class Audit:
    case: str
    submitted: int
    succeeded: int = 0
    failed_with_reason: int = 0
    failed_without_reason: int = 0
    pending: int = 0
    #: requests whose model was called successfully more than once (ran twice)
    duplicates: int = 0
    #: attempts billed, outcome unknown (their worker died mid-call)
    unknown_attempts: int = 0
    #: requests whose row totals differ from the sum of their api_calls
    totals_mismatched: int = 0
    #: rows that exist beyond the submitted ids (e.g. created from plain messages)
    extra_rows: int = 0
    dead_letters: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def totals_equal(self) -> bool:
        return self.totals_mismatched == 0

    @property
    def terminal(self) -> int:
        return self.succeeded + self.failed_with_reason + self.failed_without_reason

    def holds(self) -> bool:
        """The promise: everything terminal, every failure with a reason, totals equal the bill."""
        return (self.pending == 0 and self.failed_without_reason == 0 and self.totals_equal
                and self.terminal == self.submitted)


def audit(engine: Engine, *, case: str, ids: Iterable[str]) -> Audit:
    ids = list(dict.fromkeys(ids))
    a = Audit(case=case, submitted=len(ids))
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT status, failure_reason IS NOT NULL OR error IS NOT NULL AS has_reason, count(*) FROM requests "
            "WHERE id = ANY(:ids) GROUP BY 1, 2"), {"ids": ids}).all()
        for status, has_reason, n in rows:
            if status == "succeeded":
                a.succeeded += n
            elif status == "failed":
                if has_reason:
                    a.failed_with_reason += n
                else:
                    a.failed_without_reason += n
            else:
                a.pending += n
        found = sum(n for _, _, n in rows)
        a.pending += len(ids) - found  # a submitted id with no row at all is lost: count it as pending
        a.duplicates = conn.execute(text(
            "SELECT count(*) FROM (SELECT request_id FROM api_calls WHERE request_id = ANY(:ids) AND outcome = 'ok' "
            "GROUP BY request_id HAVING count(*) > 1) d"), {"ids": ids}).scalar()
        a.unknown_attempts = conn.execute(text(
            "SELECT count(*) FROM api_calls a JOIN requests r ON r.id = a.request_id "
            "WHERE a.outcome IN ('in_flight', 'unknown') AND r.status <> 'queued'")).scalar()
        a.totals_mismatched = conn.execute(text("""
            SELECT count(*) FROM (
              SELECT r.id FROM requests r LEFT JOIN api_calls c ON c.request_id = r.id
              GROUP BY r.id, r.cost_usd, r.attempts, r.input_tokens, r.output_tokens
              HAVING r.cost_usd <> COALESCE(SUM(c.cost_usd), 0) OR r.attempts <> COUNT(c.id)
                  OR r.input_tokens <> COALESCE(SUM(c.input_tokens), 0)
                  OR r.output_tokens <> COALESCE(SUM(c.output_tokens), 0)) m""")).scalar()
        a.extra_rows = conn.execute(text("SELECT count(*) FROM requests WHERE NOT (id = ANY(:ids))"),
                                    {"ids": ids}).scalar()
        a.dead_letters = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar()
    return a


def pending_count(engine: Engine, ids: list[str]) -> int:
    ids = sorted(set(ids))  # one id listed twice would never count as done twice
    with engine.connect() as conn:
        done = conn.execute(text("SELECT count(*) FROM requests WHERE id = ANY(:ids) AND status <> 'queued'"),
                            {"ids": ids}).scalar()
    return len(ids) - done


def wait_terminal(engine: Engine, ids: list[str], *, timeout: float) -> bool:
    """True once every request is terminal (False at the deadline: the audit then counts them)."""
    try:
        wait_until(lambda: pending_count(engine, ids) == 0, timeout=timeout, interval=0.5)
        return True
    except AssertionError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the case's own (so it may be stopped, restarted or frozen)."""

    def __init__(self, *, appendonly: bool = True) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tars-redis-")
        self.argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--dir", self.dir, "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        import redis as redis_lib

        self.proc = supervisor.start(self.argv)

        def pings() -> bool:
            try:
                return bool(redis_lib.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
            except redis_lib.RedisError:
                return False

        wait_until(pings, timeout=20, interval=0.1, what="private redis up")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Fleet:
    """Worker processes and a producer against one environment (broker, database, namespace)."""

    def __init__(self, *, env: dict[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = Path(log_dir)
        self.workers: list[WorkerProcess] = []

    def settings(self, **overrides):
        return make_settings(self.env, **overrides)

    def client(self, **overrides):
        from tars_tasks.client import TarsClient

        return TarsClient(settings=self.settings(**overrides))

    def start_worker(self, *, tiers=("haiku",), concurrency: int = 100, env: dict | None = None,
                     wait: bool = True) -> WorkerProcess:
        from workers.start import worker_argv

        n = len(self.workers)
        name = f"w{n}-{'+'.join(tiers)}@faults"
        argv = worker_argv(tiers=list(tiers), concurrency=concurrency, pool="gevent", name=name,
                           loglevel="INFO", events=False)
        argv[0] = sys.executable
        log_path = self.log_dir / f"worker-{n}.log"
        proc = supervisor.start(argv, cwd=ROOT, env={**os.environ, **self.env, **(env or {})}, log_path=log_path)
        wp = WorkerProcess(proc=proc, log_path=log_path, name=name)
        self.workers.append(wp)
        if wait:
            wp.wait_ready()
        return wp

    def stop(self) -> None:
        # all at once, one shared grace: SIGTERM, SIGKILL after it, each group's leftovers killed
        supervisor.stop([wp.proc for wp in self.workers], grace_s=20)


def specs(n: int, *, tag: str, prompt: Callable[[int], str] | None = None, **fields) -> list[dict]:
    run = uuid.uuid4().hex[:8]
    return [{"role": "researcher", "prompt": prompt(i) if prompt else f"{tag} {run} request {i}",
             "idempotency_key": f"{tag}-{run}-{i}", **fields} for i in range(n)]
