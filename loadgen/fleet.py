"""The fleet under test: embedded (in this process), local (worker processes loadgen starts
and stops) or external (already running; reached through ``TARS_BROKER_URL``).

Local workers are started with :func:`workers.start.worker_argv`, the one command line of a
sub-agent pool, and stopped with SIGTERM (warm shutdown) — only the processes started here —
by :mod:`tars_tasks.supervisor`, as ``tars fleet up`` and the tests start and stop theirs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from config.keys import TIERS
from tars_tasks import supervisor
from tars_tasks.errors import LoadgenError

FleetMode = Literal["auto", "embedded", "local", "external"]
#: The API a local fleet's tiers speak to the mock provider with, and the (fake) key they send.
MOCK_PROTOCOL = "anthropic"
MOCK_KEY_ENV = "ANTHROPIC_API_KEY"
MOCK_KEY = "sk-ant-loadgen-mock-key"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class Fleet(Protocol):
    kind: str
    #: worker processes (None: unknown), and request slots across them (None: unknown).
    processes: int | None
    slots: int | None

    def pids(self) -> list[int]: ...

    def describe(self) -> str: ...

    def stop(self) -> None: ...


class EmbeddedFleetHandle:
    kind = "embedded"
    processes = 1

    def __init__(self, *, concurrency: int) -> None:
        from tars_tasks.embedded import EmbeddedFleet

        self.slots = concurrency
        self._fleet = EmbeddedFleet(concurrency=concurrency).start()

    def pids(self) -> list[int]:
        return [os.getpid()]

    def describe(self) -> str:
        return f"embedded: in-process thread-pool worker ({self.slots} slots), memory:// broker, SQLite"

    def stop(self) -> None:
        self._fleet.stop()


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class LocalFleet:
    """``count`` worker processes of ``concurrency`` slots each, consuming every tier's queue."""

    count: int
    concurrency: int
    env: Mapping[str, str]
    log_dir: Path
    name_prefix: str = "lg"
    pool: str = "gevent"
    catalog_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: MockConfig fields: start ``tars mock-llm`` with them and point every tier at it (None: don't).
    mock_provider: Mapping[str, Any] | None = None
    #: Start one ``tars batch-runner`` beside the workers (the batch lane).
    batch_runner: bool = False
    kind: str = "local"
    _procs: list[_Proc] = field(default_factory=list)
    _catalog_file: Path | None = None
    _mock: _Proc | None = None
    _runner: _Proc | None = None
    mock_url: str | None = None

    @property
    def processes(self) -> int:
        return self.count

    @property
    def slots(self) -> int:
        return self.count * self.concurrency

    @property
    def catalog_file(self) -> Path | None:
        """The catalog the workers run with when loadgen wrote one (scenario overrides)."""
        return self._catalog_file

    def start(self) -> LocalFleet:
        from workers.start import worker_argv

        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        overrides = dict(self.catalog_overrides)
        try:
            if self.mock_provider is not None:
                self.mock_url = self._start_mock(env)
                overrides.update(provider=MOCK_PROTOCOL, base_url=self.mock_url)
                env[MOCK_KEY_ENV] = MOCK_KEY  # the mock takes any key; a real one is never sent to it
            if overrides:
                self._catalog_file = write_catalog_override(overrides, base=env.get("TARS_CATALOG_PATH"),
                                                            directory=self.log_dir)
                env["TARS_CATALOG_PATH"] = str(self._catalog_file)
            for i in range(self.count):
                name = f"{self.name_prefix}{i}@%h"
                argv = worker_argv(tiers=list(TIERS), concurrency=self.concurrency, pool=self.pool, name=name,
                                   loglevel="INFO", events=False)
                log = self.log_dir / f"{self.name_prefix}{i}.log"
                proc = supervisor.start(argv, env=env, log_path=log)
                self._procs.append(_Proc(name=name, proc=proc, log=log))
            for p in self._procs:
                self._wait_ready(p)
            if self.batch_runner:
                log = self.log_dir / f"{self.name_prefix}-batch-runner.log"
                argv = [sys.executable, "-m", "tars_tasks.cli", "batch-runner"]
                self._runner = _Proc(name="batch-runner", proc=supervisor.start(argv, env=env, log_path=log), log=log)
                self._wait_ready(self._runner, line="batch runner started")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_mock(self, env: Mapping[str, str]) -> str:
        port = free_port()
        log = self.log_dir / f"{self.name_prefix}-mock-llm.log"
        argv = [sys.executable, "-m", "tars_tasks.cli", "mock-llm", "--host", "127.0.0.1", "--port", str(port),
                "--config-json", json.dumps(dict(self.mock_provider or {}))]
        self._mock = _Proc(name="mock-llm", proc=supervisor.start(argv, env=dict(env), log_path=log), log=log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._mock.proc.poll() is not None:
                raise LoadgenError(f"tars mock-llm exited with {self._mock.proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/_mock/health", timeout=2):
                    return url
            except OSError:
                time.sleep(0.1)
        raise LoadgenError(f"tars mock-llm not up on {url} after {READY_TIMEOUT_S:.0f}s (log: {log})")

    @staticmethod
    def _wait_ready(p: _Proc, *, line: str = " ready.") -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                raise LoadgenError(f"{p.name} exited with {p.proc.returncode}: "
                                   f"{p.log.read_text(errors='replace')[-2000:]}")
            if line in p.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise LoadgenError(f"worker {p.name} not ready after {READY_TIMEOUT_S:.0f}s (log: {p.log})")

    def pids(self) -> list[int]:
        """The fleet's processes (workers and batch runner; not the mock, which plays the provider)."""
        procs = self._procs + ([self._runner] if self._runner is not None else [])
        return [p.proc.pid for p in procs if p.proc.poll() is None]

    def describe(self) -> str:
        return (f"local: {self.count} worker process(es) x {self.concurrency} {self.pool} slots, started by loadgen"
                + (f"; catalog overrides {dict(self.catalog_overrides)}" if self.catalog_overrides else "")
                + (f"; every tier on `tars mock-llm` at {self.mock_url} ({MOCK_PROTOCOL} API, "
                   f"{json.dumps(dict(self.mock_provider or {}))})" if self.mock_url else "")
                + ("; one `tars batch-runner`" if self.batch_runner else ""))

    def stop(self) -> None:
        supervisor.stop([p.proc for p in self._procs], grace_s=STOP_TIMEOUT_S)
        self._procs.clear()
        for p in (self._runner, self._mock):  # the runner after the workers, the provider last
            if p is not None:
                supervisor.stop([p.proc], grace_s=STOP_TIMEOUT_S)
        self._runner = self._mock = None


class ExternalFleet:
    """A fleet loadgen did not start. Local worker processes of it, if any, are sampled."""

    kind = "external"
    processes: int | None = None
    slots: int | None = None

    def __init__(self, *, broker_url: str) -> None:
        self.broker_url = broker_url
        self._pids = discover_local_workers(broker_url=broker_url)
        self.processes = len(self._pids) or None

    def pids(self) -> list[int]:
        return [p for p in self._pids if psutil.pid_exists(p)]

    def describe(self) -> str:
        local = f"{len(self._pids)} local worker process(es) sampled" if self._pids else "no local worker processes"
        return f"external: an existing fleet on {_redact(self.broker_url)} ({local})"

    def stop(self) -> None:  # not ours to stop
        pass


def discover_local_workers(*, broker_url: str) -> list[int]:
    """Pids of this host's Celery workers of ``tars_tasks`` on ``broker_url`` (read-only discovery).

    A worker counts only if its environment names the same ``TARS_BROKER_URL``: other fleets on
    the host (another namespace, another Redis database) are not ours to sample.
    """
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if not ("celery" in " ".join(cmd) and "tars_tasks" in cmd and "worker" in cmd):
            continue
        try:
            if p.environ().get("TARS_BROKER_URL") == broker_url:
                found.append(p.info["pid"])
        except psutil.Error:
            continue
    return found


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def write_catalog_override(overrides: Mapping[str, Any], *, base: str | None, directory: Path) -> Path:
    """A copy of the catalog with ``overrides`` applied to every tier (TOML)."""
    import tomllib

    from config.catalog import DEFAULT_CATALOG_PATH

    data = tomllib.loads(Path(base or DEFAULT_CATALOG_PATH).read_text())
    roles = data.get("roles", {})
    lines = ["[roles]"] + [f"{k} = {_toml(v)}" for k, v in roles.items() if not isinstance(v, dict)]
    tables = [(f"roles.{k}", v) for k, v in roles.items() if isinstance(v, dict)]
    tables += [(f"prices.{_toml(model)}", v) for model, v in data.get("prices", {}).items()]
    tables += [(f"tiers.{tier}", {**body, **overrides}) for tier, body in data.get("tiers", {}).items()]
    for name, body in tables:
        lines.append(f"\n[{name}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml(v)}")
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="catalog-", suffix=".toml", dir=directory)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return Path(path)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return str(v)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe_workers(celery_app, *, timeout_s: float = 2.0) -> int:
    """Number of workers answering a ping on the broker (0 if none or unreachable)."""
    try:
        return len(celery_app.control.ping(timeout=timeout_s) or [])
    except Exception:
        return 0
