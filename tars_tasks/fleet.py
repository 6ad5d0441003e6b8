"""The local fleet runner: the compose topology as local processes (``tars fleet up``).

For machines without Docker and for tests. Every process is started from the command the
topology (:mod:`tars_tasks.topology`) gives its service, in a session and process group of
its own, so a stop reaches the whole group and nothing is left behind:

* stop (Ctrl-C, SIGTERM, :meth:`LocalFleet.stop`): SIGTERM to the workers' groups first —
  Celery's warm shutdown finishes the tasks a worker holds, and an unfinished task is
  redelivered, never lost — then to the other services; a group still alive after its
  grace period gets SIGKILL.
* a runner killed outright: every child was started with ``PR_SET_PDEATHSIG`` (Linux), so
  the kernel sends it SIGTERM when the runner dies.

Starting and stopping are :mod:`tars_tasks.supervisor`'s, shared with loadgen and the tests.

The runner writes ``fleet.json`` (pids, commands, logs, ports) to its state directory;
``tars fleet status`` and ``tars fleet down`` read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from config.keys import TIERS
from tars_tasks import supervisor, topology
from tars_tasks.errors import ConfigurationError, TarsError
from tars_tasks.supervisor import child_setup  # re-exported: tars_tasks.fleet.child_setup

__all__ = ["FleetError", "FleetProcess", "LocalFleet", "ProcessSpec", "child_setup", "plan_fleet"]

STATE_FILE = "fleet.json"
DEFAULT_READY_TIMEOUT_S = 90.0
DEFAULT_STOP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.2
LOCAL_HOST = "127.0.0.1"


class FleetError(TarsError):
    """A fleet process failed to start or exited while the fleet was meant to run."""


def default_state_dir() -> Path:
    env = os.environ.get("TARS_FLEET_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tars" / "fleet"


def mock_llm_available() -> bool:
    """The mock LLM server is optional: started only where ``loadgen.mock_llm`` exists."""
    try:
        return find_spec("loadgen.mock_llm") is not None
    except (ImportError, ValueError):
        return False


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One local process: which topology service it is and the exact argv it runs."""

    name: str
    service: str
    argv: tuple[str, ...]
    #: "log:TEXT" (ready when the log contains TEXT), "http:URL" or "tcp:HOST:PORT".
    ready: str
    tier: str | None = None
    port: int | None = None
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    #: "inherit" (the runner's whole environment) or "flower" (only what Flower needs:
    #: :func:`tars_tasks.flower_cli.flower_launcher_env` — no provider keys, no database URL).
    env_policy: str = "inherit"


def plan_fleet(
    *,
    workers: Mapping[str, int],
    concurrency: int | None = None,
    flower: bool = True,
    flower_port: int = topology.FLOWER_PORT,
    flower_insecure_no_auth: bool = False,
    mock_llm: bool | None = None,
    mock_llm_port: int = topology.MOCK_LLM_PORT,
    metrics: bool = True,
    metrics_port: int = topology.METRICS_PORT,
    batch_runner: bool = True,
    host: str = LOCAL_HOST,
    python: str | None = None,
    worker_stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> list[ProcessSpec]:
    """The processes of a local fleet, in start order (services first, then workers).

    ``workers`` maps a tier to its number of worker processes (0 leaves the tier out).
    ``mock_llm=None`` starts the mock server when it is installed.
    """
    python = python or sys.executable
    for tier, n in workers.items():
        if tier not in TIERS:
            raise ConfigurationError(f"unknown tier {tier!r}: tiers are {', '.join(TIERS)}")
        if n < 0:
            raise ConfigurationError(f"worker count for {tier} must be >= 0, not {n}")
    if concurrency is not None and concurrency < 1:
        raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
    if mock_llm is None:
        mock_llm = mock_llm_available()
    elif mock_llm and not mock_llm_available():
        raise ConfigurationError("the mock LLM server (loadgen.mock_llm) is not installed")

    specs: list[ProcessSpec] = []
    loopback = LOCAL_HOST if host in ("0.0.0.0", "") else host

    def add_service(svc: topology.Service, port: int, ready: str, extra: tuple[str, ...] = (),
                    env_policy: str = "inherit") -> None:
        argv = topology.localise([*svc.argv(host=host, port=port), *extra], python=python)
        specs.append(ProcessSpec(name=svc.name, service=svc.name, argv=tuple(argv), ready=ready, port=port,
                                 env_policy=env_policy))

    if mock_llm:
        add_service(topology.MOCK_LLM, mock_llm_port, f"tcp:{loopback}:{mock_llm_port}")
    if metrics:
        add_service(topology.METRICS, metrics_port, f"http://{loopback}:{metrics_port}/metrics")
    if flower:
        add_service(topology.FLOWER, flower_port, f"http://{loopback}:{flower_port}/healthcheck",
                    ("--insecure-no-auth",) if flower_insecure_no_auth else (), env_policy="flower")
    if batch_runner:  # no port: ready once its loop has started
        argv = topology.localise(list(topology.BATCH_RUNNER.command), python=python)
        specs.append(ProcessSpec(name=topology.BATCH_RUNNER.name, service=topology.BATCH_RUNNER.name,
                                 argv=tuple(argv), ready="log:batch runner started"))
    for tier in TIERS:
        svc = topology.worker_service(tier)
        for i in range(1, workers.get(tier, 0) + 1):
            name = f"{tier}-{i}"
            extra = ["--name", f"{name}@%h"]
            if concurrency is not None:
                extra += ["--concurrency", str(concurrency)]
            argv = topology.localise([*svc.argv(), *extra], python=python)
            specs.append(ProcessSpec(name=name, service=svc.name, argv=tuple(argv), ready="log: ready.",
                                     tier=tier, stop_timeout_s=worker_stop_timeout_s))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):  # pragma: no cover - guarded by construction
        raise ConfigurationError(f"duplicate process names in {names}")
    return specs


# --- readiness -----------------------------------------------------------------------------


def http_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_open(host: str, port: int, *, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports_free(specs: list[ProcessSpec], *, host: str = LOCAL_HOST) -> None:
    """Refuse to start (one clear line) rather than have a service die on a taken port."""
    for spec in specs:
        if spec.port is not None and port_in_use(host, spec.port):
            raise ConfigurationError(f"port {spec.port} for {spec.name} is already in use on {host}")


def _parse_tcp(ready: str) -> tuple[str, int]:
    host, _, port = ready.removeprefix("tcp:").rpartition(":")
    return host, int(port)


# --- processes -----------------------------------------------------------------------------


@dataclass
class FleetProcess:
    spec: ProcessSpec
    log_path: Path
    proc: subprocess.Popen | None = None
    ready: bool = False
    exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return supervisor.alive(self.proc)

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def check_ready(self) -> bool:
        ready = self.spec.ready
        if ready.startswith("log:"):
            needle = ready.removeprefix("log:")
            try:
                self.ready = needle in self.log_path.read_text(errors="replace")
            except OSError:
                self.ready = False
        elif ready.startswith("tcp:"):
            host, port = _parse_tcp(ready)
            self.ready = tcp_open(host, port)
        else:
            self.ready = http_ok(ready)
        return self.ready

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            supervisor.signal_group(self.proc, sig)  # the child leads its own group (setsid)


class LocalFleet:
    """Start, watch and stop a fleet of local processes. Use as a context manager."""

    def __init__(
        self,
        *,
        specs: list[ProcessSpec],
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if not specs:
            raise ConfigurationError("a fleet needs at least one process")
        self.specs = specs
        self.state_dir = Path(state_dir or default_state_dir())
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.echo = echo or (lambda _msg: None)
        self.processes = [FleetProcess(spec=s, log_path=self.state_dir / "logs" / f"{s.name}.log") for s in specs]
        self._stopping = False
        self.started_at: float | None = None

    # --- start ------------------------------------------------------------------------------

    def env_for(self, spec: ProcessSpec) -> dict[str, str]:
        """The environment a process starts with (see :attr:`ProcessSpec.env_policy`)."""
        if spec.env_policy == "flower":
            from tars_tasks.flower_cli import flower_launcher_env

            return flower_launcher_env(self.env)
        if spec.env_policy != "inherit":
            raise ConfigurationError(f"unknown env_policy {spec.env_policy!r} for {spec.name}")
        return dict(self.env)

    def start(self) -> None:
        existing = read_state(self.state_dir)
        if existing and existing.runner_alive():
            raise FleetError(f"a fleet is already running from {self.state_dir} (runner pid {existing.runner_pid})")
        check_ports_free(self.specs)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        try:
            for fp in self.processes:
                fp.proc = supervisor.start(fp.spec.argv, cwd=self.cwd, env=self.env_for(fp.spec),
                                           log_path=fp.log_path, append=True)
                self.echo(f"started {fp.spec.name} (pid {fp.pid}): {' '.join(fp.spec.argv)}")
        except BaseException:
            self.stop()
            raise
        self._write_state()

    def wait_ready(self, *, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until every process is ready; raise :class:`FleetError` if one exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending = [fp for fp in self.processes if not fp.ready and not fp.check_ready()]
            for fp in self.processes:
                if not fp.alive():
                    raise FleetError(f"{fp.spec.name} exited with code {fp.proc.poll() if fp.proc else None} "
                                     f"before it was ready; its log ends:\n{fp.log_tail()}")
            if not pending:
                self._write_state()
                return
            if time.monotonic() > deadline:
                names = ", ".join(fp.spec.name for fp in pending)
                raise FleetError(f"not ready after {timeout_s:.0f}s: {names}; log of {pending[0].spec.name}:\n"
                                 f"{pending[0].log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    # --- watch ------------------------------------------------------------------------------

    def exited(self) -> list[FleetProcess]:
        return [fp for fp in self.processes if fp.proc is not None and fp.proc.poll() is not None]

    def run_until_signalled(self, *, keep_going: bool = False) -> int:
        """Block until SIGINT/SIGTERM (then stop cleanly, exit code 0) or a process dies (1)."""
        received: list[int] = []

        def on_signal(signum, _frame):
            if received:  # a second Ctrl-C: no more waiting
                self.echo("second signal: killing the fleet")
                self.kill()
            received.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            reported: set[str] = set()
            while not received:
                dead = [fp for fp in self.exited() if fp.spec.name not in reported]
                for fp in dead:
                    reported.add(fp.spec.name)
                    self.echo(f"{fp.spec.name} exited with code {fp.proc.returncode}; log: {fp.log_path}")
                if dead and not keep_going:
                    self.stop()
                    return 1
                time.sleep(POLL_INTERVAL_S)
            self.echo(f"got {signal.Signals(received[0]).name}: stopping the fleet (warm shutdown)")
            self.stop()
            return 0
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # --- stop -------------------------------------------------------------------------------

    def stop(self) -> dict[str, int | None]:
        """SIGTERM workers, then services; SIGKILL what outlives its grace. Returns exit codes."""
        if self._stopping:
            return self.exit_codes()
        self._stopping = True
        workers = [fp for fp in self.processes if fp.spec.tier is not None]
        others = [fp for fp in self.processes if fp.spec.tier is None]
        by_proc = {id(fp.proc): fp for fp in self.processes if fp.proc is not None}

        def on_kill(proc: subprocess.Popen) -> None:
            fp = by_proc[id(proc)]
            self.echo(f"{fp.spec.name} still running after its {fp.spec.stop_timeout_s:.0f}s grace: SIGKILL")

        for group in (workers, list(reversed(others))):
            started = [fp for fp in group if fp.proc is not None]
            # one grace per group: N workers in warm shutdown together take one grace, not N
            grace_s = max((fp.spec.stop_timeout_s for fp in started), default=0.0)
            codes = supervisor.stop([fp.proc for fp in started if fp.proc is not None], grace_s=grace_s,
                                    term_group=True, on_kill=on_kill)
            for fp, code in zip(started, codes, strict=True):
                fp.exit_code = code
                self.echo(f"stopped {fp.spec.name} (exit code {fp.exit_code})")
        self._clear_state()
        return self.exit_codes()

    def kill(self) -> None:
        for fp in self.processes:
            fp.signal_group(signal.SIGKILL)

    def exit_codes(self) -> dict[str, int | None]:
        return {fp.spec.name: (fp.proc.poll() if fp.proc else None) for fp in self.processes}

    # --- state file -------------------------------------------------------------------------

    def _write_state(self) -> None:
        state = FleetState(
            runner_pid=os.getpid(),
            started_at=self.started_at or time.time(),
            processes=[
                {**asdict(fp.spec), "pid": fp.pid, "log": str(fp.log_path), "ready": fp.ready}
                for fp in self.processes
            ],
        )
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        tmp.replace(path)

    def _clear_state(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()

    def __enter__(self) -> LocalFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- reading a running fleet ---------------------------------------------------------------


@dataclass
class FleetState:
    runner_pid: int
    started_at: float
    processes: list[dict] = field(default_factory=list)

    def runner_alive(self) -> bool:
        return pid_alive(self.runner_pid)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_state(state_dir: Path | None = None) -> FleetState | None:
    path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FleetError(f"unreadable fleet state {path}: {exc}") from exc
    return FleetState(**data)


def signal_runner(*, state_dir: Path | None = None, sig: int = signal.SIGTERM) -> int:
    """Ask a running ``tars fleet up`` to stop (as Ctrl-C would). Returns the runner's pid."""
    state = read_state(state_dir)
    if state is None or not state.runner_alive():
        raise FleetError(f"no fleet is running from {state_dir or default_state_dir()}")
    os.kill(state.runner_pid, sig)
    return state.runner_pid
