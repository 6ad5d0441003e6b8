"""``tars loadgen`` as a user runs it: a fresh directory, no TARS_ settings, no services."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TARS = str(Path(sys.executable).with_name("tars"))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([TARS, *args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fresh")


def test_tars_loadgen_run_baseline_works_on_the_embedded_default_with_no_services(workdir):
    res = _run(["loadgen", "run", "baseline"], workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded fleet" in res.stdout and "baseline" in res.stdout
    (session,) = [p for p in (workdir / "reports").iterdir() if p.is_dir()]
    md = (session / "report.md").read_text()
    assert "### Scenario 1: Baseline" in md and "| **p99 Response Time** |" in md
    doc = json.loads((session / "report.json").read_text())
    agg = doc["scenarios"][0]["runs"][0]["aggregates"]
    assert agg["requests"]["run"]["total"] >= 2 and agg["little"]["concurrency"] == 1
    assert (workdir / "tars-embedded.db").exists()  # runs and rows were stored


def test_fail_if_exits_non_zero_when_a_run_breaks_a_condition_and_zero_otherwise(workdir):
    quick = ["loadgen", "run", "baseline", "--count", "1", "--warmup", "0"]
    bad = _run([*quick, "--fail-if", "p50>1ms,error_rate>50%"], workdir)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"fail-if: baseline: p50>1ms \(measured [\d.e+]+\)", bad.stdout)
    good = _run([*quick, "--fail-if", "p99>10min"], workdir)
    assert good.returncode == 2 and "bad --fail-if" in good.stderr  # an unreadable condition: usage error
    good = _run([*quick, "--fail-if", "error_rate>50%"], workdir)
    assert good.returncode == 0, good.stdout + good.stderr


def test_compare_reads_two_sessions_from_their_report_directories(workdir):
    reports = workdir / "reports"
    while not reports.exists() or len([p for p in reports.iterdir() if p.is_dir()]) < 2:  # run alone: make two
        assert _run(["loadgen", "run", "baseline", "--count", "1", "--warmup", "0"], workdir).returncode == 0
    sessions = sorted(p.name for p in reports.iterdir() if p.is_dir())
    res = _run(["loadgen", "compare", sessions[0], sessions[-1]], workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "baseline" in res.stdout and "p99" in res.stdout
