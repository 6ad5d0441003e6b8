"""Helpers of the batch-lane tests: a fleet pointed at the mock, batch runner processes, the rows."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from tests.helpers import ROOT
from tests.integration.model_calls_support import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, MODELS, write_catalog


def batch_env(fleet_env: dict[str, str], tmp_path: Path, mock, **env: str) -> dict[str, str]:
    """haiku on Anthropic, sonnet on OpenAI (no fallback), both at the mock; batches formed at once."""
    prices = {m: {"input": 1.0, "output": 5.0, "batch_multiplier": 0.5} for m in MODELS.values()}
    path = write_catalog(tmp_path / "catalog.toml", sonnet={"provider": "openai", "fallback": None},
                         opus={"fallback": None}, prices=prices)
    return {**fleet_env, "TARS_CATALOG_PATH": str(path), "TARS_PROVIDER_BASE_URL": mock.url,
            "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "OPENAI_API_KEY": FAKE_OPENAI_KEY,
            "TARS_BATCH_MAX_AGE_S": "0.3", "TARS_BATCH_POLL_INTERVAL_S": "0.3", "TARS_REQUEUE_LOST_AFTER_S": "2",
            **env}


@dataclass
class Runner:
    proc: object
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"batch runner still running:\n{self.log()[-3000:]}"
            time.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        from tars_tasks import supervisor

        supervisor.stop([self.proc], grace_s=10)


def start_runner(env: dict[str, str], log_path: Path) -> Runner:
    """``tars batch-runner`` as its own process."""
    import os

    from tars_tasks import supervisor

    argv = [sys.executable, "-m", "tars_tasks.cli", "batch-runner"]
    proc = supervisor.start(argv, cwd=ROOT, env={**os.environ, **env}, log_path=log_path)
    return Runner(proc=proc, log_path=log_path)


def rows(db, sql: str, **params) -> list[dict]:
    with db.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def batches_created(mock) -> dict[str, int]:
    """Provider batches the mock was asked to create, per API."""
    total = (mock.stats()["models"].get("_batches") or {}).get("total") or {}
    return {"anthropic": total.get("anthropic_created", 0), "openai": total.get("openai_created", 0)}


def wait_batches_done(db, timeout: float = 30.0) -> None:
    """Until every provider batch is ``done`` (its requests' notices come before the batch is closed)."""
    deadline = time.monotonic() + timeout
    while rows(db, "SELECT id FROM provider_batches WHERE state <> 'done'"):
        assert time.monotonic() < deadline, rows(db, "SELECT * FROM provider_batches")
        time.sleep(0.1)


def wait_batch_lane_row(db, request_id: str, *, timeout: float = 30.0) -> None:
    """Until a worker has recorded a plain-Celery request's row on the batch lane (the worker
    adopts the message and leaves the call to the batch runner)."""
    deadline = time.monotonic() + timeout
    while not rows(db, "SELECT id FROM requests WHERE id = :r AND lane = 'batch'", r=request_id):
        assert time.monotonic() < deadline, f"the worker never recorded request {request_id} on the batch lane"
        time.sleep(0.1)
