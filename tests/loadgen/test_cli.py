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


def _clean_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_") and k != "COLUMNS"}
    env["XDG_DATA_HOME"] = str(cwd / ".data")  # the user's data directory, not the real one
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([TARS, *args], cwd=cwd, env={**_clean_env(cwd), **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fresh")


def _sessions(workdir: Path) -> list[Path]:
    reports = workdir / "reports"
    return sorted(p for p in reports.iterdir() if p.is_dir()) if reports.exists() else []


def test_tars_loadgen_run_baseline_works_on_the_embedded_default_with_no_services(workdir):
    res = _run(["loadgen", "run", "baseline"], workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded fleet" in res.stdout and "baseline" in res.stdout
    assert f"embedded database: {workdir / '.data' / 'tars' / 'embedded.db'}" in res.stdout
    (session,) = _sessions(workdir)
    md = (session / "report.md").read_text()
    assert "### Scenario 1: Baseline" in md and "| **p99 Response Time** |" in md
    assert "✅ every run valid" in md
    doc = json.loads((session / "report.json").read_text())
    agg = doc["scenarios"][0]["runs"][0]["aggregates"]
    assert agg["requests"]["run"]["total"] >= 2 and agg["clients"]["concurrency"] == 1
    assert agg["ceilings"]["binding"] == "concurrency"
    # a p99 from fewer than 100 samples is withheld with its reason, which is not a failure
    assert "| **p99 Response Time** | — (" in md and "p99 needs ≥ 100" in md
    assert (workdir / ".data" / "tars" / "embedded.db").exists()  # runs and rows were stored
    assert not (workdir / "tars-embedded.db").exists()


def test_fail_if_exits_non_zero_when_a_run_breaks_a_condition_and_zero_otherwise(workdir):
    quick = ["loadgen", "run", "baseline", "--count", "1", "--warmup", "0"]
    bad = _run([*quick, "--fail-if", "max>1ms,p50>1ms,error_rate>50%"], workdir)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"fail-if: baseline: max>1ms \(measured [\d.e+]+\)", bad.stdout)
    assert "fail-if: baseline: p50>1ms not checked" in bad.stdout  # one sample: no p50, said so
    good = _run([*quick, "--fail-if", "p99>10min"], workdir)
    assert good.returncode == 2 and "bad --fail-if" in good.stderr  # an unreadable condition: usage error
    good = _run([*quick, "--fail-if", "error_rate>50%"], workdir)
    assert good.returncode == 0, good.stdout + good.stderr


def test_compare_reads_two_sessions_from_their_report_directories(workdir):
    while len(_sessions(workdir)) < 2:  # run alone: make two
        assert _run(["loadgen", "run", "baseline", "--count", "1", "--warmup", "0"], workdir).returncode == 0
    sessions = [p.name for p in _sessions(workdir)]
    res = _run(["loadgen", "compare", sessions[0], sessions[-1]], workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "baseline" in res.stdout and "p99" in res.stdout


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--rate", "0"], ["--duration", "-1"], ["--duration", "0"],
                                  ["--time-scale", "0"], ["--count", "0"], ["--warmup", "-1"], ["--workers", "0"],
                                  ["--levels", "1,0"], ["--sample-interval", "0"], ["--embedded-slots", "0"],
                                  ["--warmup", "10"], ["--duration", "5", "--warmup", "20"], ["--budget-usd", "-1"]],
                         ids=" ".join)
def test_bad_parameters_are_refused_before_anything_starts(args, tmp_path):
    res = _run(["loadgen", "run", "baseline", *args], tmp_path, timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "loadgen session" not in res.stdout and "Traceback" not in res.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / ".data").exists()  # nothing started


@pytest.mark.parametrize("args", [["baseline", "--budget-usd", "0.01"], ["budget"]], ids=" ".join)
def test_a_run_budget_on_the_embedded_fleet_is_refused_nothing_would_enforce_it(args, tmp_path):
    """The embedded fleet has no Redis, so no budgets: a budget there would be reported and never applied
    (old code: 'Budget $0.01 per day', spent $0.29, 0 refused, 'overspend $0.28')."""
    res = _run(["loadgen", "run", *args], tmp_path, timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "a run budget needs the fleet's budgets" in res.stderr, res.stderr
    assert "loadgen session" not in res.stdout and not (tmp_path / "reports").exists()


def test_a_too_short_run_is_invalid_and_exits_3_unless_allowed(tmp_path):
    quick = ["loadgen", "run", "baseline", "--duration", "0.5", "--warmup", "0.2"]
    res = _run(quick, tmp_path, TARS_SIM_LATENCY="fixed:20")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "INVALID baseline: steady window" in res.stdout
    md = (_sessions(tmp_path)[-1] / "report.md").read_text()
    assert "INVALID" in md and "✅" not in md
    assert _run([*quick, "--allow-invalid"], tmp_path, TARS_SIM_LATENCY="fixed:20").returncode == 0


def test_the_rate_limit_preset_on_the_embedded_default_is_invalid_its_limit_was_never_applied(tmp_path):
    res = _run(["loadgen", "run", "rate-limit", "--time-scale", "0.1"], tmp_path, TARS_SIM_LATENCY="uniform:20:60")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "INVALID rate-limit" in res.stdout and "did not apply" in res.stdout
    doc = json.loads((_sessions(tmp_path)[-1] / "report.json").read_text())
    agg = doc["scenarios"][0]["runs"][0]["aggregates"]
    assert agg["valid"] is False
    assert agg["ceilings"]["rate_limits"]["enforced"] is False


def test_piped_output_never_splits_a_figure_across_lines(tmp_path):
    res = _run(["loadgen", "run", "baseline", "--count", "3", "--warmup", "0"], tmp_path, TARS_SIM_LATENCY="fixed:20")
    assert res.returncode == 0, res.stdout + res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(("✓ baseline", "✗ baseline"))]
    assert re.search(r"req/s .* p50 [\d,]+ ms, p99 .+, errors \d+\.\d+%$", line), line
    listing = _run(["loadgen", "list"], tmp_path, timeout=30)
    assert "Closed loop — 2000 in flight" in listing.stdout  # a row of the table, not cut at 80 columns


def test_the_batch_scenario_on_the_embedded_default_is_refused_in_one_line_naming_fleet_local(tmp_path):
    res = _run(["loadgen", "run", "batch"], tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--fleet local" in errors[0] and "batch runner" in errors[0], res.stderr
    assert not list(tmp_path.glob("reports/*/report.md"))  # no report, so no silent wrong one
