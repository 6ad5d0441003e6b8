"""The process supervisor (tars_tasks/supervisor.py), on real processes: children lead their own
session, die with their starter, get SIGTERM first and SIGKILL only after the grace, and nothing
of their process group outlives a stop. Waits are bounded; nothing asserts on seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tars_tasks import supervisor
from tests.helpers import ROOT

#: Writes its pid, then "TERM" to the file when SIGTERM arrives; with IGNORE it stays alive after.
CHILD = r"""
import os, signal, sys, time
out = sys.argv[1]
mode = sys.argv[2]
def on_term(*_):
    with open(out, "a") as fh:
        fh.write("TERM\n")
    if mode == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(out, "a") as fh:
    fh.write(f"pid {os.getpid()}\n")
if mode == "grandchild":
    import subprocess
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(out, "a") as fh:
        fh.write(f"grandchild {g.pid}\n")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
while True:
    time.sleep(0.05)
"""


def _wait_for(predicate, *, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{mode}.txt"
    proc = supervisor.start([sys.executable, "-c", CHILD, str(out), mode], log_path=tmp_path / f"{mode}.log")
    _wait_for(lambda: any(ln.startswith("pid ") for ln in _lines(out)), what="child started")
    if mode == "grandchild":
        _wait_for(lambda: any(ln.startswith("grandchild ") for ln in _lines(out)), what="grandchild started")
    return proc, out


def test_a_child_leads_its_own_session_and_process_group(tmp_path):
    proc, _ = _start(tmp_path, "exit")
    try:
        assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid
        assert os.getsid(proc.pid) != os.getsid(0)
    finally:
        supervisor.stop([proc], grace_s=10)


def test_a_child_that_honours_sigterm_gets_sigterm_and_no_sigkill(tmp_path):
    proc, out = _start(tmp_path, "exit")
    killed: list[int] = []
    (code,) = supervisor.stop([proc], grace_s=30, on_kill=lambda p: killed.append(p.pid))
    assert code == 0 and killed == []
    assert _lines(out).count("TERM") == 1


def test_a_child_that_ignores_sigterm_gets_sigterm_then_sigkill_after_the_grace(tmp_path):
    proc, out = _start(tmp_path, "ignore")
    killed: list[int] = []
    (code,) = supervisor.stop([proc], grace_s=0.5, on_kill=lambda p: killed.append(p.pid))
    assert _lines(out).count("TERM") == 1, "SIGTERM came first"
    assert code == -signal.SIGKILL and killed == [proc.pid], "then SIGKILL, once the grace was over"


def test_several_children_share_one_grace_and_every_one_is_stopped(tmp_path):
    procs = []
    for i, mode in enumerate(("ignore", "exit", "ignore")):
        (tmp_path / str(i)).mkdir()
        procs.append(_start(tmp_path / str(i), mode)[0])
    killed: list[int] = []
    codes = supervisor.stop(procs, grace_s=0.5, on_kill=lambda p: killed.append(p.pid))
    assert codes == [-signal.SIGKILL, 0, -signal.SIGKILL]
    assert killed == [procs[0].pid, procs[2].pid]


def test_nothing_of_a_childs_process_group_outlives_its_stop(tmp_path):
    """The child exits on SIGTERM, but its own child (same group) would not: stop ends it too."""
    proc, out = _start(tmp_path, "grandchild")
    grandchild = int(next(ln for ln in _lines(out) if ln.startswith("grandchild ")).split()[1])
    assert os.getpgid(grandchild) == proc.pid
    supervisor.stop([proc], grace_s=10)
    _wait_for(lambda: _gone(grandchild), what="grandchild gone")


STARTER = r"""
import sys, time
from pathlib import Path
from tars_tasks import supervisor
child = supervisor.start([sys.executable, "-c", sys.argv[1], sys.argv[2], "exit"])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_their_starter_even_when_it_is_killed_outright(tmp_path):
    out = tmp_path / "orphan.txt"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, CHILD, str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child_pid = int(starter.stdout.readline())
        _wait_for(lambda: any(ln.startswith("pid ") for ln in _lines(out)), what="child started")
        assert not _gone(child_pid)
        starter.kill()  # SIGKILL: the starter runs no cleanup at all
        starter.wait(10)
        _wait_for(lambda: _gone(child_pid), what="child ended after its starter died")
        assert _lines(out).count("TERM") == 1, "the kernel's SIGTERM (PDEATHSIG) ended it"
    finally:
        if starter.poll() is None:
            starter.kill()
        starter.stdout.close()


#: Where a process may be given its own session or a pre-exec hook: the supervisor itself, and this
#: file's starter (the process whose death the test above proves its children follow).
_OWN_SESSION_ALLOWED = {"tars_tasks/supervisor.py", "tests/unit/test_supervisor.py"}


def test_no_module_starts_a_process_of_its_own_beside_the_supervisor():
    """Every child TARS or its tests keep running (workers, the mock LLM, Flower, a browser) is
    started by ``supervisor.start``: a hand-made ``Popen(start_new_session=True)`` or
    ``preexec_fn=`` is a second supervisor, one without the kernel's SIGTERM when the test run dies."""
    import ast

    found = []
    for pkg in ("tars_tasks", "workers", "loadgen", "config", "migrations", "tests"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in _OWN_SESSION_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and any(k.arg in ("start_new_session", "preexec_fn")
                                                      for k in node.keywords):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node.func)}")
    assert found == [], "start it with tars_tasks.supervisor.start:\n" + "\n".join(found)
