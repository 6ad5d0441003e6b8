"""Jobs survive what requests survive: a SIGKILLed worker, a crash between commit and publish."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from sqlalchemy import text

from tests.helpers import fleet_snapshot

pytestmark = pytest.mark.integration

REJECT = '<<sim-answer:{"valid": false, "problems": ["cite sources"]}>>'


def _wait(predicate, *, timeout: float, what: str, snapshot=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s" + (f"\n{snapshot()}" if snapshot else ""))


def _scalar(db, sql, **params):
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def _running(db) -> int:
    return _scalar(db, "SELECT count(*) FROM jobs WHERE status = 'running'")


def _ended_lines(workers) -> Counter:
    return Counter(m for w in workers for m in re.findall(r"job ([0-9a-f-]{36}) ended", w.log()))


def _check_books(db):
    """Every step instance has exactly one request and every job step request one instance; request totals
    equal their api_calls; a job's cost equals its requests' api_calls."""
    with db.connect() as conn:
        orphans = conn.execute(text(
            "SELECT count(*) FROM requests r LEFT JOIN job_steps s ON s.request_id = r.id "
            "WHERE s.id IS NULL")).scalar()
        assert orphans == 0
        dup = conn.execute(text("SELECT count(*) FROM (SELECT job_id, step, item, revision FROM job_steps "
                                "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d")).scalar()
        assert dup == 0
        mismatched = conn.execute(text("""
            SELECT r.id FROM requests r LEFT JOIN api_calls a ON a.request_id = r.id
            GROUP BY r.id, r.cost_usd, r.attempts HAVING r.cost_usd <> COALESCE(SUM(a.cost_usd), 0)
                OR r.attempts <> COUNT(a.id)""")).all()
        assert mismatched == []
        assert conn.execute(text("SELECT count(*) FROM requests WHERE status = 'queued'")).scalar() == 0


def test_sigkill_of_a_worker_mid_job(fleet_env, start_worker, client, db):
    env = {"TARS_SIM_LATENCY": "uniform:200:600"}
    workers = [start_worker(tiers=["haiku", "sonnet"], concurrency=20, env=env) for _ in range(2)]
    n = 20
    handles = [client.submit_job(template="research-write-validate",
                                 input={"question": f"q{i}", "topics": ["a", "b", "c"],
                                        "reviewer_notes": [REJECT] if i % 2 else []}) for i in range(n)]
    # mid-job: some writers queued, jobs still running, calls in flight
    _wait(lambda: _scalar(db, "SELECT count(*) FROM job_steps WHERE step = 'write'") >= 4
          and _scalar(db, "SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'") >= 3, timeout=60,
          what="jobs half way")
    workers[0].kill()
    workers.append(start_worker(tiers=["haiku", "sonnet"], concurrency=20, env=env))
    _wait(lambda: _running(db) == 0, timeout=120, what="every job terminal",
          snapshot=lambda: fleet_snapshot(db=db, redis_url=fleet_env["TARS_BROKER_URL"],
                                          namespace=fleet_env["TARS_NAMESPACE"], workers=workers))
    jobs = client.jobs.get_many([h.id for h in handles])
    assert [j.status for j in jobs] == ["succeeded"] * n, [j.error for j in jobs if not j.ok]
    for i, j in enumerate(jobs):
        expected = ["research[0]", "research[1]", "research[2]", "write", "validate"]
        if i % 2:
            expected += ["write@r1", "validate@r1"]
        assert sorted(s.label for s in j.steps) == sorted(expected)  # no successor scheduled twice
        assert j.cost_usd == sum(s.cost_usd for s in j.steps)
        assert j.cost_usd == _scalar(db, "SELECT SUM(a.cost_usd) FROM api_calls a JOIN job_steps s ON "
                                         "s.request_id = a.request_id WHERE s.job_id = :j", j=j.id)
    _check_books(db)
    # the kill did hit calls in flight: they are billed, outcome unknown, and their steps ran again
    assert _scalar(db, "SELECT count(*) FROM api_calls WHERE outcome = 'unknown'") >= 1
    assert max(_ended_lines(workers).values()) == 1


def test_a_crash_between_commit_and_publish_is_covered_by_the_reconciler(fleet_env, start_worker, client, db,
                                                                        monkeypatch):
    """The writer commits a finish and its successors, then "dies" before publishing them: the successor rows
    are queued in Postgres and in no queue. The lost-request reconciler publishes them; the job completes."""
    from tars_tasks.jobs.store import JobStore
    from workers.writer import GroupCommitWriter

    job = client.submit_job(template="research-write-validate", input={"question": "q", "topics": ["a", "b"]})
    # no worker yet: finish the researchers here, as a worker's writer would, but never publish
    with db.connect() as conn:
        ids = list(conn.execute(text("SELECT request_id FROM job_steps WHERE job_id = :j"), {"j": job.id}).scalars())
        for q in conn.execute(text("SELECT id FROM requests")).scalars():
            assert q in ids
    store = JobStore(settings=client.settings, catalog=client.catalog, engine=db, celery_app=client.celery_app)
    monkeypatch.setattr(store, "_publish", lambda *a, **k: (_ for _ in ()).throw(OSError("killed before publish")))
    writer = GroupCommitWriter(engine=db, notifier=None, on_finished=store.on_finished)
    from datetime import UTC, datetime

    from tars_tasks.codes import RequestStatus
    from workers.records import FinishRecord

    now = datetime.now(UTC)
    for rid in ids:
        writer.finish(api_rows=[], request=FinishRecord(
            request_id=rid, status=RequestStatus.SUCCEEDED, result="notes", stop_reason="end_turn",
            tier_used="haiku", model="m", worker="test", started_at=now, finished_at=now), reply_to=None)
    writer.close()
    assert _scalar(db, "SELECT count(*) FROM job_steps WHERE step = 'write'") == 1
    # drain the researchers' own messages (already finished: re-announced, not run) and the writer's is lost
    start_worker(tiers=["haiku", "sonnet"], concurrency=10,
                 env={"TARS_REQUEUE_LOST_AFTER_S": "1", "TARS_RECONCILE_INTERVAL_S": "1"})
    j = client.wait_job(job.id, timeout=60)
    assert j.status == "succeeded", j.error
    assert [s.label for s in j.steps] == ["research[0]", "research[1]", "write", "validate"]
    _check_books(db)


DIE_BEFORE_PUBLISH = '''
import os
from tars_tasks.jobs import store as _store

_orig = _store.JobStore._publish


def _publish(self, requests, *, notices=None):
    requests = list(requests)
    if requests:  # the successors are committed; this worker dies before any reaches the broker
        os._exit(137)
    return _orig(self, requests, notices=notices)


_store.JobStore._publish = _publish
'''


def test_a_worker_killed_between_committing_next_steps_and_publishing_them_under_default_settings(
        fleet_env, start_worker, client, db, tmp_path):
    """The kill the SIGKILL test hits now and then, made certain: the worker that finishes the last
    researcher commits the writer step and dies before publishing it. Its unacked researcher
    message comes back through the lease sweeper within seconds; the redelivered, already finished
    step publishes the successor that never reached the broker. The lost-request reconciler (minutes
    by default) is switched off here, so nothing else can rescue the job."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_BEFORE_PUBLISH)
    from tests.helpers import ROOT

    no_reconciler = {"TARS_REQUEUE_LOST_AFTER_S": "86400"}
    doomed = start_worker(tiers=["haiku", "sonnet"], concurrency=10,
                          env={**no_reconciler, "PYTHONPATH": f"{hook}:{ROOT}"})
    job = client.submit_job(template="research-write-validate", input={"question": "q", "topics": ["a", "b", "c"]})
    _wait(lambda: doomed.proc.poll() is not None, timeout=60, what="the hooked worker's death before publish")
    assert doomed.proc.returncode == 137
    assert _scalar(db, "SELECT count(*) FROM job_steps WHERE step = 'write'") == 1  # committed, never sent
    survivor = start_worker(tiers=["haiku", "sonnet"], concurrency=10, env=no_reconciler)
    _wait(lambda: _running(db) == 0, timeout=90, what="the job terminal",
          snapshot=lambda: fleet_snapshot(db=db, redis_url=fleet_env["TARS_BROKER_URL"],
                                          namespace=fleet_env["TARS_NAMESPACE"], workers=[doomed, survivor]))
    j = client.get_job(job.id)
    assert j.status == "succeeded", j.error
    assert sorted(s.label for s in j.steps) == ["research[0]", "research[1]", "research[2]", "validate", "write"]
    assert "committed but never published" in survivor.log()
    assert "was lost" not in survivor.log()  # not the reconciler
    _check_books(db)
