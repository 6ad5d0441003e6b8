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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
