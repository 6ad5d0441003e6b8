"""Support for the model-call tests: the mock LLM server as a subprocess, test catalogs,
and reading what the mock counted.

Import the fixture into a test module: ``from tests.integration.model_calls_support import mock_llm``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tars_tasks import supervisor
from tests.helpers import ROOT
from tests.helpers import free_port as helpers_free_port

#: Ports of this suite's mock servers (other engineers' suites use other ranges).
MOCK_PORT_RANGE = (18300, 18999)
#: A fake key shaped like a real one, so redaction patterns are exercised too.
FAKE_ANTHROPIC_KEY = "sk-ant-api03-TESTKEY-" + "Zq7" * 12
FAKE_OPENAI_KEY = "sk-proj-TESTKEY-" + "Xw4" * 12

MODELS = {"haiku": "mock-haiku", "sonnet": "mock-sonnet", "opus": "mock-opus"}


def free_port() -> int:
    return helpers_free_port(low=MOCK_PORT_RANGE[0], high=MOCK_PORT_RANGE[1])


@dataclass
class MockServer:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def _req(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        return self._req("GET", "/_mock/stats")

    def bodies(self) -> list[dict]:
        """The request bodies the mock received, oldest first: ``[{"protocol", "body"}, ...]``."""
        return self._req("GET", "/_mock/requests")

    def reset(self, *, config: bool = False) -> None:
        self._req("POST", "/_mock/reset", {"config": config})

    def configure(self, **fields: Any) -> dict:
        return self._req("POST", "/_mock/config", fields)

    def per_second(self, model: str, key: str = "requests") -> dict[int, int]:
        secs = self.stats()["models"].get(model, {}).get("per_second", {})
        return {int(s): int(c.get(key, 0)) for s, c in secs.items()}

    def per_second_of_user(self, user: str, model: str) -> dict[int, int]:
        """Requests per wall-clock second the mock got from one end user (``metadata.user_id``)."""
        secs = self.stats().get("users", {}).get(user, {}).get(model, {})
        return {int(sec): int(n) for sec, n in secs.items()}

    def total(self, model: str, key: str = "requests") -> int:
        return int(self.stats()["models"].get(model, {}).get("total", {}).get(key, 0))


def start_mock(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> MockServer:
    port = free_port()
    log_path = tmp_path / f"mock-llm-{port}.log"
    argv = [sys.executable, "-m", "tars_tasks.cli", "mock-llm", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = supervisor.start(argv, cwd=ROOT, env={**os.environ, **(env or {})}, log_path=log_path)
    server = MockServer(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mock server exited:\n{log_path.read_text()}")
        try:
            server._req("GET", "/_mock/health")
            return server
        except OSError:
            time.sleep(0.1)
    supervisor.stop([proc], grace_s=0)
    raise TimeoutError(f"mock server not up:\n{log_path.read_text()}")


@pytest.fixture
def mock_llm(tmp_path: Path) -> Iterator:
    """``mock_llm("--latency", "fixed:20", ...)`` starts a mock server subprocess on 127.0.0.1."""
    started: list[MockServer] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> MockServer:
        server = start_mock(tmp_path, *args, env=env)
        started.append(server)
        return server

    yield _start
    supervisor.stop([s.proc for s in started], grace_s=10)


@pytest.fixture(scope="module")
def shared_mock(tmp_path_factory) -> Iterator[MockServer]:
    """One mock server for a module (latency fixed:5, 12 output tokens); use ``fresh_mock`` per test."""
    server = start_mock(tmp_path_factory.mktemp("mock"), "--latency", "fixed:5", "--output-tokens", "12:12")
    yield server
    supervisor.stop([server.proc], grace_s=10)


@pytest.fixture
def fresh_mock(shared_mock: MockServer) -> MockServer:
    """The module's mock server with its counters zeroed and its start-up configuration restored."""
    shared_mock.reset(config=True)
    return shared_mock


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_catalog(path: Path, *, roles: dict[str, dict[str, Any]] | None = None,
                  prices: dict[str, dict[str, Any]] | None = None, **tiers: dict[str, Any]) -> Path:
    """A small catalog: every tier a mock model with generous limits, fields overridden per tier;
    ``roles`` adds roles with defaults (``{"name": {"tier": ..., "system": ...}}``), ``prices`` lists
    models' prices by class (then give the tier ``input_usd_per_mtok=None`` to use them)."""
    base = {
        "provider": "anthropic", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 5.0, "rpm": 100_000,
        "tpm": 100_000_000, "timeout_s": 10, "max_attempts": 3, "retry_budget_s": 30, "output_tokens": [20, 40],
    }
    lines = ["[roles]", 'researcher = "haiku"', 'engineer = "sonnet"', 'architect = "opus"', ""]
    for role, body in (roles or {}).items():
        lines.append(f"[roles.{role}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for model, body in (prices or {}).items():
        lines.append(f"[prices.{json.dumps(model)}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for tier, model in MODELS.items():
        spec = {"model": model, **base, **({"fallback": "haiku"} if tier != "haiku" else {}), **tiers.get(tier, {})}
        lines.append(f"[tiers.{tier}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def window_counts(per_second: dict[int, int], *, window_s: int) -> list[int]:
    """Counts in every window of ``window_s`` consecutive whole seconds from first to last."""
    if not per_second:
        return []
    lo, hi = min(per_second), max(per_second)
    series = [per_second.get(s, 0) for s in range(lo, hi + 1)]
    return [sum(series[i : i + window_s]) for i in range(0, max(1, len(series) - window_s + 1))]


def api_rows(engine, *, where: str = "TRUE") -> list[dict]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM api_calls WHERE {where} "
                                                            "ORDER BY request_id, attempt"))]


def request_rows(engine) -> list[dict]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM requests"))]
