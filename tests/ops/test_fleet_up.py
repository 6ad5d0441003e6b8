"""`tars fleet up` as an operator runs it: real Redis, Postgres, workers, Flower, metrics, a browser.

The tests share one fleet (module fixture) and run in file order; the last one stops it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from config.keys import TIERS, queue_for_tier
from tests.helpers import ROOT, make_settings
from tests.ops.conftest import DB_PASSWORD, FLOWER_PASSWORD, FLOWER_USER, PROVIDER_KEYS

pytestmark = pytest.mark.integration

ROLES = ("researcher", "engineer", "analyst", "writer", "validator")


def _wait_until(predicate, *, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


def _node_tier(node: str) -> str:
    return node.split("@", 1)[0].rsplit("-", 1)[0]


def test_fleet_up_runs_three_hundred_requests_across_every_tier_to_completion(ops_fleet, pg_url):
    from tars_tasks.client import TarsClient

    client = TarsClient(settings=make_settings(ops_fleet.env))
    try:
        specs = [{"role": ROLES[i % 5], "prompt": f"ops request {i}", "priority": i % 10,
                  "tenant": f"tenant-{i % 3}", "idempotency_key": f"ops-{i}",
                  "tier": "opus" if i % 7 == 0 else None} for i in range(300)]
        handles = []
        for i in range(0, len(specs), 50):
            handles += client.submit_many(specs[i:i + 50])
        results = client.wait_many([h.id for h in handles], timeout=150)
    finally:
        client.close()
    assert len(results) == 300
    assert {r.status for r in results} == {"succeeded"}
    assert {r.tier_used for r in results} == set(TIERS)
    from tars_tasks.db.engine import get_engine

    with get_engine(pg_url).connect() as conn:
        rows = dict(conn.execute(text("SELECT status, count(*) FROM requests GROUP BY status")).all())
        workers = {w for (w,) in conn.execute(text("SELECT DISTINCT worker FROM requests"))}
    assert rows == {"succeeded": 300}
    assert {_node_tier(w) for w in workers} == set(TIERS)


def test_fleet_status_lists_each_process_alive_and_the_workers_of_every_tier(ops_fleet):
    out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", "fleet", "status", "--json"], cwd=ROOT,
                         env={**os.environ, **ops_fleet.env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["runner_alive"] is True
    assert {p["name"]: p["alive"] for p in st["processes"]} == {
        "metrics": True, "flower": True, "batch-runner": True, "haiku-1": True, "sonnet-1": True, "opus-1": True}
    assert {t: [_node_tier(n) for n in nodes] for t, nodes in st["fleet"]["workers"].items()} == {
        t: [t] for t in TIERS}


def test_the_batch_runner_healthcheck_sees_the_fleets_runner_and_not_another_namespaces(ops_fleet):
    def check(namespace: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tars_tasks.cli", "fleet", "healthcheck", "batch-runner"],
                              cwd=ROOT, env={**os.environ, **ops_fleet.env, "TARS_NAMESPACE": namespace},
                              capture_output=True, text=True, timeout=60)

    ok = check(ops_fleet.env["TARS_NAMESPACE"])
    assert ok.returncode == 0 and "healthy" in ok.stdout, ok.stderr
    other = check(ops_fleet.env["TARS_NAMESPACE"] + "-nobody")
    assert other.returncode == 1 and other.stderr.startswith("unhealthy: no batch runner on "), other.stderr


def test_flower_answers_401_without_credentials_but_leaves_metrics_and_healthcheck_open(ops_fleet):
    for path in ("/", "/workers", "/api/workers", "/tasks"):
        resp = httpx.get(ops_fleet.flower_url + path, timeout=10)
        assert resp.status_code == 401, path
    assert httpx.get(ops_fleet.flower_url + "/api/workers", auth=("operator", "wrong"), timeout=10).status_code == 401
    assert "Basic" in httpx.get(ops_fleet.flower_url + "/", timeout=10).headers["WWW-Authenticate"]
    # Flower 2.x serves these without auth by design (documented in docs/OPERATIONS.md)
    assert httpx.get(ops_fleet.flower_url + "/healthcheck", timeout=10).status_code == 200
    metrics = httpx.get(ops_fleet.flower_url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "flower_worker_online" in metrics.text


def test_flower_api_with_credentials_lists_the_fleets_workers_per_tier(ops_fleet):
    def workers_by_queue():
        resp = httpx.get(ops_fleet.flower_url + "/api/workers", params={"refresh": "1"},
                         auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=15)
        assert resp.status_code == 200, resp.text
        out: dict[str, list[str]] = {}
        for node, info in resp.json().items():
            for q in info.get("active_queues") or []:
                out.setdefault(q["name"], []).append(node)
        return out if all(queue_for_tier(t) in out for t in TIERS) else None

    by_queue = _wait_until(workers_by_queue, timeout=30, interval=1)
    for tier in TIERS:
        assert [_node_tier(n) for n in by_queue[queue_for_tier(tier)]] == [tier]


def test_flower_under_fleet_up_holds_none_of_the_fleets_secrets_and_the_workers_hold_theirs(ops_fleet):
    from tests.ops.test_secrets import proc_environ

    state = json.loads((ops_fleet.state_dir / "fleet.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    cmdline = open(f"/proc/{pids['flower']}/cmdline", "rb").read().split(b"\0")
    assert b"celery" in cmdline and b"flower" in cmdline  # `tars flower` exec'd the real Flower in place
    flower_env = proc_environ(pids["flower"])
    raw = open(f"/proc/{pids['flower']}/environ", "rb").read()
    for name in (*PROVIDER_KEYS, "TARS_DATABASE_URL", "TARS_FLOWER_PASSWORD", "TARS_SIM_LATENCY"):
        assert name not in flower_env, name
    for value in (*PROVIDER_KEYS.values(), DB_PASSWORD):
        assert value.encode() not in raw
    assert flower_env["FLOWER_BASIC_AUTH"] == f"{FLOWER_USER}:{FLOWER_PASSWORD}"
    worker_env = proc_environ(pids["haiku-1"])
    assert {k: worker_env.get(k) for k in PROVIDER_KEYS} == PROVIDER_KEYS
    assert DB_PASSWORD in worker_env["TARS_DATABASE_URL"]


def test_a_real_browser_sees_the_workers_of_every_tier_on_the_flower_dashboard(ops_fleet, tmp_path):
    from tests.ops.browser import CHROMIUM, capture_page

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (scripts/system-deps installs it)")
    state = json.loads((ops_fleet.state_dir / "fleet.json").read_text())
    nodes = [f"{p['name']}@" for p in state["processes"] if p["tier"]]
    shot = tmp_path / "flower-dashboard.png"
    page = capture_page(url=ops_fleet.flower_url + "/", screenshot=shot, profile_dir=tmp_path / "chromium-profile",
                        wait_for=nodes, basic_auth=(FLOWER_USER, FLOWER_PASSWORD), timeout_s=30)
    assert page.seen == dict.fromkeys(nodes, True), page.text[:2000]
    assert "Online workers" in page.text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    print(f"screenshot: {shot}")


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    body = httpx.get(url, timeout=10).text
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_endpoint_series_match_postgres_after_the_run(ops_fleet, pg_url):
    from tars_tasks.db.engine import get_engine

    with get_engine(pg_url).connect() as conn:
        req = {(t, s): n for t, s, n in conn.execute(text(
            "SELECT coalesce(tier_used, tier_requested), status, count(*) FROM requests GROUP BY 1, 2"))}
        calls = {t: (n, tin, tout, Decimal(c), Decimal(w)) for t, n, tin, tout, c, w in conn.execute(text(
            "SELECT tier, count(*), sum(input_tokens), sum(output_tokens), sum(cost_usd), sum(ratelimit_wait_ms) "
            "FROM api_calls GROUP BY tier"))}
    assert sum(req.values()) >= 1, "the run before this test left no rows"

    def scraped_matches():
        m = _scrape(ops_fleet.metrics_url)
        got = {(dict(k)["tier"], dict(k)["status"]): v for k, v in m.get("tars_requests", {}).items()}
        return m if got == {k: float(v) for k, v in req.items()} else None

    m = _wait_until(scraped_matches, timeout=15, interval=0.5)
    for tier in TIERS:
        n, tin, tout, cost, wait_ms = calls.get(tier, (0, 0, 0, Decimal(0), Decimal(0)))
        assert m["tars_tokens_total"][(("kind", "input"), ("tier", tier))] == tin
        assert m["tars_tokens_total"][(("kind", "output"), ("tier", tier))] == tout
        assert math.isclose(m["tars_cost_usd_total"][(("tier", tier),)], float(cost), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(m["tars_ratelimit_wait_seconds_total"][(("tier", tier),)], float(wait_ms) / 1000,
                            rel_tol=1e-9, abs_tol=1e-9)
        calls_by_outcome = {dict(k)["outcome"]: v for k, v in m["tars_api_calls"].items() if dict(k)["tier"] == tier}
        assert sum(calls_by_outcome.values()) == n
        depth = {dict(k)["priority"]: v for k, v in m["tars_queue_depth"].items() if dict(k)["tier"] == tier}
        assert sorted(depth) == sorted(str(p) for p in range(10)) and set(depth.values()) == {0.0}
    assert sum(v[3] for v in calls.values()) > 0  # the run cost something, so the comparison meant something
    assert m["tars_metrics_source_up"] == {(("source", "postgres"),): 1.0, (("source", "redis"),): 1.0}


def test_ctrl_c_stops_the_fleet_cleanly_with_no_orphaned_processes(ops_fleet):
    started = ops_fleet.remember_descendants()
    state = json.loads((ops_fleet.state_dir / "fleet.json").read_text())
    children = {p["pid"] for p in state["processes"]}
    assert children <= started and len(children) == 6
    code = ops_fleet.interrupt(timeout=90)
    log = ops_fleet.log()
    assert code == 0, log[-3000:]
    assert "got SIGINT: stopping the fleet" in log
    alive = [pid for pid in started if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], log[-3000:]
    namespace = ops_fleet.env["TARS_NAMESPACE"]
    stray = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("TARS_NAMESPACE") == namespace:
                stray.append(p.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert stray == []
    for name in ("haiku-1", "sonnet-1", "opus-1", "batch-runner"):
        assert f"stopped {name} (exit code 0)" in log
    assert not (ops_fleet.state_dir / "fleet.json").exists()
    assert list((ops_fleet.state_dir / "flower").glob("flower.db*")), "Flower's persistent state was not saved"
    secrets = [FLOWER_PASSWORD, DB_PASSWORD, *PROVIDER_KEYS.values()]
    leaks = [(p.name, s) for p in ops_fleet.state_dir.rglob("*") if p.is_file() for s in secrets
             if s.encode() in p.read_bytes()]
    assert leaks == [], "a secret was written to the fleet's logs, state or Flower's history file"
