"""The one process supervisor: start, watch and stop the child processes TARS starts for someone.

``tars fleet up`` (:mod:`tars_tasks.fleet`), loadgen's local fleet (:mod:`loadgen.fleet`) and
the tests' worker processes all start and stop their children here, so they all keep the same
promises:

* **own session**: each child leads a new session and process group (``setsid``), so a stop
  reaches everything it started, and a Ctrl-C in the starter's terminal does not hit it twice;
* **dies with its starter**: on Linux the kernel sends the child SIGTERM when the starter dies
  (``PR_SET_PDEATHSIG``) — a killed test run or load run leaves no worker consuming the next
  run's queues. PDEATHSIG fires when the *thread* that started the child ends: start
  long-lived children from a thread that lives as long as they should;
* **SIGTERM, then SIGKILL after a grace**: :func:`stop` sends SIGTERM (a Celery worker's warm
  shutdown: it finishes what it holds), waits up to ``grace_s`` for all of them together, then
  SIGKILLs the group of each one still alive, and finally the leftovers of every group whose
  leader already exited.

It works on plain :class:`subprocess.Popen` objects, so callers keep their own records.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
#: After SIGKILL, how long to wait for the kernel to reap (never reached in practice).
_KILL_WAIT_S = 10.0

__all__ = ["alive", "child_setup", "signal_group", "start", "stop"]


def child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """New session (own process group); SIGTERM from the kernel if the starter dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    log_path: Path | None = None,
    append: bool = False,
) -> subprocess.Popen:
    """Start ``argv`` as a supervised child: stdin from /dev/null, stdout and stderr to
    ``log_path`` (``append``: after what it holds; default truncated) or discarded."""
    if log_path is None:
        return subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=child_setup)
    with Path(log_path).open("ab" if append else "wb") as fh:  # the child keeps its own copy
        return subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=child_setup)


def alive(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the child's whole process group (it leads one: :func:`child_setup`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(
    procs: Sequence[subprocess.Popen],
    *,
    grace_s: float,
    term_group: bool = False,
    on_kill: Callable[[subprocess.Popen], None] | None = None,
) -> list[int | None]:
    """Stop ``procs``: SIGTERM, one shared grace of ``grace_s``, SIGKILL; returns their exit codes.

    ``term_group``: SIGTERM the whole group (services) rather than the leader only (a Celery
    worker, whose main process shuts its own pool down). ``on_kill`` is told of each child that
    outlived its grace. Every group is SIGKILLed at the end, so nothing a child started is left.
    """
    for proc in procs:
        if alive(proc):
            if term_group:
                signal_group(proc, signal.SIGTERM)
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, grace_s)
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(proc)
            signal_group(proc, signal.SIGKILL)
            proc.wait(_KILL_WAIT_S)
    for proc in procs:
        signal_group(proc, signal.SIGKILL)  # leftovers of a group whose leader already exited
    return [proc.poll() for proc in procs]
