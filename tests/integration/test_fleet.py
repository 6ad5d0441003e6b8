"""The fleet end to end: real Redis, real Postgres, real worker processes."""

from __future__ import annotations

import base64
import json
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from config.catalog import load_catalog
from tests.helpers import fleet_snapshot, make_settings, start_producer_script, waiting_messages

pytestmark = pytest.mark.integration

PRODUCER = """
import json, sys
from tars_tasks.client import TarsClient
tag, n = sys.argv[1], int(sys.argv[2])
roles = ["researcher", "engineer", "analyst", "writer", "validator"]
with TarsClient() as c:
    specs = [{"role": roles[i % 5], "prompt": f"{tag} request {i} " + "lorem " * (i % 40),
              "priority": i % 10, "tenant": f"tenant-{i % 3}", "idempotency_key": f"{tag}-{i}",
              "tier": "opus" if i % 17 == 0 else None} for i in range(n)]
    handles = []
    for i in range(0, n, 50):
        handles += c.submit_many(specs[i:i + 50])
    results = c.wait_many([h.id for h in handles], timeout=240)
    print(json.dumps({"ids": [h.id for h in handles], "statuses": sorted({r.status for r in results})}))
"""


def _wait_until(predicate, *, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def _finished(db) -> int:
    """Requests no longer queued, as the database has them."""
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM requests WHERE status <> 'queued'")).scalar()


def test_a_thousand_requests_from_two_producers_end_terminal_and_cost_what_the_catalog_says(
    fleet_env, start_worker, db
):
    env = {"TARS_SIM_FAILURE_RATE": "0.03"}  # some attempts fail and are retried
    for tier in ("haiku", "sonnet", "opus"):
        start_worker(tiers=[tier], concurrency=100, env=env)

    procs = [start_producer_script(PRODUCER, fleet_env, args=[tag, "500"]) for tag in ("p1", "p2")]
    outputs = [p.communicate(timeout=280) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = [i for out, _ in outputs for i in json.loads(out)["ids"]]
    assert len(set(ids)) == 1000

    with db.connect() as conn:
        by_status = dict(conn.execute(text("SELECT status, count(*) FROM requests GROUP BY status")).all())
        assert by_status.get("queued", 0) == 0
        assert sum(by_status.values()) == 1000
        assert by_status.get("succeeded", 0) >= 990  # 3% failures, 4 attempts: a failure is ~1e-6
        tiers = dict(conn.execute(text("SELECT tier_used, count(*) FROM requests GROUP BY 1")).all())
        assert set(tiers) == {"haiku", "sonnet", "opus"}

        catalog = load_catalog()
        calls = conn.execute(
            text("SELECT tier, model, outcome, input_tokens, output_tokens, cost_usd FROM api_calls")
        ).all()
        retried = [c for c in calls if c.outcome != "ok"]
        assert retried, "failure injection produced no failed attempts; the retry path was not exercised"
        for c in calls:
            spec = catalog.spec(c.tier)
            assert c.model == spec.model
            assert Decimal(c.cost_usd) == spec.cost_usd(input_tokens=c.input_tokens, output_tokens=c.output_tokens)
            if c.outcome == "ok":
                assert c.input_tokens > 0 and c.output_tokens > 0

        mismatched = conn.execute(text("""
            SELECT r.id FROM requests r LEFT JOIN api_calls a ON a.request_id = r.id
            GROUP BY r.id, r.cost_usd, r.attempts, r.input_tokens, r.output_tokens
            HAVING r.cost_usd <> COALESCE(SUM(a.cost_usd), 0) OR r.attempts <> COUNT(a.id)
                OR r.input_tokens <> COALESCE(SUM(a.input_tokens), 0)
                OR r.output_tokens <> COALESCE(SUM(a.output_tokens), 0)""")).all()
        assert mismatched == []
        in_flight = conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'")).scalar()
        assert in_flight == 0
        untimed = conn.execute(text(
            "SELECT count(*) FROM requests WHERE started_at IS NULL OR finished_at IS NULL "
            "OR started_at < submitted_at OR finished_at < started_at")).scalar()
        assert untimed == 0


def test_high_priority_requests_start_before_low_ones_under_backlog(fleet_env, start_worker, client, db):
    # Backlog first (no worker yet), low and high interleaved so FIFO would give 50% high.
    specs = []
    for i in range(40):
        specs.append({"role": "researcher", "prompt": f"low {i}", "priority": "low"})
        specs.append({"role": "researcher", "prompt": f"high {i}", "priority": "high"})
    handles = client.submit_many(specs)
    start_worker(tiers=["haiku"], concurrency=1, env={"TARS_SIM_LATENCY": "fixed:5"})
    results = client.wait_many([h.id for h in handles], timeout=120)
    order = sorted(results, key=lambda r: r.started_at)
    first_half = order[:40]
    share_high = sum(r.priority == 9 for r in first_half) / len(first_half)
    assert share_high >= 0.95, f"only {share_high:.0%} of the first 40 started were high priority"


def test_a_duplicate_idempotency_key_returns_the_existing_request_and_queues_nothing(client, redis, db):
    first = client.submit(role="researcher", prompt="once", idempotency_key="order-42", tenant="acme")
    again = client.submit(role="researcher", prompt="once more", idempotency_key="order-42", tenant="acme")
    other_tenant = client.submit(role="researcher", prompt="once", idempotency_key="order-42", tenant="zeta")
    assert first.created and not again.created and other_tenant.created
    assert again.id == first.id != other_tenant.id
    both = client.submit_many([{"role": "analyst", "prompt": "a", "idempotency_key": "k1"},
                               {"role": "analyst", "prompt": "b", "idempotency_key": "k1"}])
    assert both[0].id == both[1].id
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 3
    assert waiting_messages(redis, tiers=["haiku"]) == 3  # queued or staged for dispatch


@pytest.mark.parametrize(
    "fields",
    [
        {"role": "astronaut"},
        {"tier": "gpt-9"},
        {"prompt": ""},
        {"prompt": "x" * 200_001},
        {"priority": -1},
        {"priority": 10},
        {"idempotency_key": "not a key!"},
    ],
)
def test_bad_input_is_refused_before_anything_is_recorded_or_queued(client, redis, db, fields):
    from tars_tasks.errors import InvalidRequest

    good = {"role": "researcher", "prompt": "fine"}
    with pytest.raises(InvalidRequest):
        client.submit_many([good, {**good, **fields}])  # one bad request rejects the whole call
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 0
    assert [k for k in redis.keys("tars.*")] == []


def test_a_worker_killed_mid_call_under_default_settings_loses_nothing_and_its_calls_stay_on_the_bill(
    fleet_env, start_worker, client, db
):
    # The default visibility timeout (an hour): recovery must come from the lease, not from it.
    env = {"TARS_VISIBILITY_TIMEOUT_S": "3600", "TARS_SIM_LATENCY": "uniform:1500:2500"}
    victim = start_worker(tiers=["haiku"], concurrency=20, env=env)
    handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(60)])
    on_victim = {"w": f"{victim.name}:%"}

    def in_flight_on_victim():
        with db.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM api_calls WHERE outcome = 'in_flight' AND worker LIKE :w"), on_victim
            ).scalar() >= 10

    _wait_until(in_flight_on_victim, timeout=30)
    victim.kill()  # SIGKILL: no warm shutdown, no acks
    victim.proc.wait(10)
    start_worker(tiers=["haiku"], concurrency=50, env=env)
    results = client.wait_many([h.id for h in handles], timeout=120)

    assert {r.status for r in results} == {"succeeded"}
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 60
        killed = conn.execute(text(
            "SELECT request_id, outcome, input_tokens, cost_usd FROM api_calls WHERE worker LIKE :w "
            "AND outcome <> 'ok'"), on_victim).all()
        assert len(killed) >= 10
        # billed, outcome unknown: marked so by the lease sweeper, with the input that was sent and its cost
        assert {k.outcome for k in killed} == {"unknown"}
        assert all(k.input_tokens > 0 and k.cost_usd > 0 for k in killed)
        # every killed attempt's request was finished by another worker, with a second attempt recorded
        rows = conn.execute(text(
            "SELECT r.worker, r.attempts, r.cost_usd, (SELECT sum(cost_usd) FROM api_calls a WHERE a.request_id = r.id)"
            " FROM requests r WHERE r.id = ANY(:ids)"), {"ids": [k.request_id for k in killed]}).all()
        assert all(not w.startswith(victim.name) and n >= 2 and cost == billed for w, n, cost, billed in rows)


def test_the_same_message_delivered_twice_gives_one_request_row_and_two_attempts(fleet_env, start_worker, db):
    from tars_tasks.celery_app import make_app
    from tars_tasks.client import TarsClient
    from tars_tasks.publish import publish_request

    settings = make_settings(fleet_env)
    with TarsClient(settings=settings) as client:
        handle = client.submit(role="researcher", prompt="twice")
        # Publish the very same task message again, as a broker might after a lost ack.
        app = make_app(settings)
        with app.producer_or_acquire() as producer:
            publish_request(app, producer=producer, request_id=handle.id, tier="haiku", tenant="default",
                            priority=5, reply_to=None)
        start_worker(tiers=["haiku"], concurrency=10)
        result = handle.wait(timeout=60)
        assert result.status == "succeeded"

        def two_attempts():
            with db.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM api_calls WHERE request_id = :i AND outcome = 'ok'"),
                                    {"i": handle.id}).scalar() == 2

        _wait_until(two_attempts, timeout=30)
        with db.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 1


def test_a_producer_whose_broker_is_down_gets_broker_unavailable_and_nothing_is_recorded(fleet_env, db):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import BrokerUnavailable

    # default settings otherwise: the admission bound is the first thing that needs the broker
    settings = make_settings(fleet_env, broker_url="redis://127.0.0.1:1/0", redis_url=fleet_env["TARS_BROKER_URL"])
    with TarsClient(settings=settings) as client, pytest.raises(BrokerUnavailable):
        client.submit(role="researcher", prompt="nowhere to go")
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 0


def test_a_publish_that_fails_after_the_row_is_written_marks_the_request_failed(fleet_env, db):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import BrokerUnavailable

    # no admission bound (max_queue_depth=0): the publish is the first broker operation
    settings = make_settings(fleet_env, broker_url="redis://127.0.0.1:1/0", redis_url=fleet_env["TARS_BROKER_URL"],
                             max_queue_depth=0)
    with TarsClient(settings=settings) as client, pytest.raises(BrokerUnavailable):
        client.submit(role="researcher", prompt="nowhere to go")
    with db.connect() as conn:
        rows = conn.execute(text("SELECT status, error, failure_reason FROM requests")).all()
    assert len(rows) == 1 and rows[0].status == "failed" and rows[0].failure_reason == "enqueue failed"
    assert "enqueue failed" in rows[0].error


def test_the_embedded_default_runs_the_real_task_code_with_no_services(tmp_path):
    code = """
import json
from tars_tasks.embedded import EmbeddedFleet
from tars_tasks.client import TarsClient
from tars_tasks.tasks import run_request
from sqlalchemy import text
with EmbeddedFleet():
    with TarsClient() as c:
        hs = c.submit_many([{"role": r, "prompt": "hi"} for r in ("researcher", "engineer")])
        rs = c.wait_many([h.id for h in hs], timeout=60)
        with c.engine.connect() as conn:
            calls = conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'ok'")).scalar()
print(json.dumps({"status": [r.status for r in rs], "worker": [r.worker if hasattr(r, "worker") else None for r in rs],
                  "tiers": [r.tier_used for r in rs], "calls": calls, "task": run_request.name,
                  "broker": c.settings.broker_url, "db": c.settings.database_url,
                  "frozen": __import__("gc").get_freeze_count()}))
"""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TARS_SIM_LATENCY"] = "fixed:10"
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["status"] == ["succeeded", "succeeded"]
    assert data["tiers"] == ["haiku", "sonnet"]
    assert data["calls"] == 2
    assert data["task"] == "tars.run_request"
    assert data["broker"].startswith("memory://") and data["db"].startswith("sqlite")
    assert (tmp_path / "data" / "tars" / "embedded.db").exists()  # the user's data directory, not the cwd
    assert data["frozen"] == 0  # a worker process of its own freezes its start-up objects; its host's, never


def test_a_request_that_kills_its_worker_every_time_is_failed_after_max_deliveries(fleet_env, start_worker, client, db):
    env = {"TARS_SIM_CRASH_MARKER": "__crash__", "TARS_VISIBILITY_TIMEOUT_S": "2", "TARS_MAX_DELIVERIES": "3",
           "TARS_SIM_LATENCY": "fixed:10"}
    poison = client.submit(role="researcher", prompt="please __crash__ the worker")
    crashes = 0
    for _ in range(8):  # a supervisor restarting the worker, as systemd or compose would
        # not waiting for "ready": the worker may take the poison message and die before it says so
        worker = start_worker(tiers=["haiku"], concurrency=1, env=env, wait=False)
        _wait_until(lambda w=worker: w.proc.poll() is not None or client.get(poison.id).done, timeout=60)
        if worker.proc.poll() is not None:
            crashes += 1
        if client.get(poison.id).done:
            break
    result = client.get(poison.id)
    assert result.status == "failed" and "poison" in result.error
    assert crashes == 3  # delivered 3 times (max_deliveries), then failed without a 4th model call
    with db.connect() as conn:
        outcomes = conn.execute(text("SELECT outcome FROM api_calls WHERE request_id = :i"),
                                {"i": poison.id}).scalars().all()
        # each crashed call stays on the bill: in flight, or unknown once its worker's lease expired
        assert len(outcomes) == 3 and set(outcomes) <= {"in_flight", "unknown"}
        assert conn.execute(text("SELECT failure_reason FROM requests WHERE id = :i"),
                            {"i": poison.id}).scalar() == "poison"

    healthy = client.submit(role="researcher", prompt="an ordinary request")
    assert healthy.wait(timeout=60).status == "succeeded"


def test_admission_degrades_then_refuses_against_real_queue_depths(fleet_env, redis, db):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import Overloaded

    # the fleet mode (tars_tasks/fleetmode.py) re-decided on every submit: 6 of 10 queued is high load
    settings = make_settings(fleet_env, max_queue_depth=10, admission_sample_interval_ms=0, mode_interval_s=0.001)
    with TarsClient(settings=settings) as client:
        first = client.submit_many([{"role": "engineer", "prompt": f"s{i}"} for i in range(6)])
        assert {h.tier for h in first} == {"sonnet"}
        moved = client.submit(role="engineer", prompt="under high load")
        assert moved.tier == "haiku"
        kept = client.submit(role="engineer", prompt="urgent", priority="high")
        assert kept.tier == "sonnet"
        client.submit_many([{"role": "engineer", "prompt": "u", "priority": "high"}] * 3)
        with pytest.raises(Overloaded):
            client.submit(role="engineer", prompt="one too many", priority="high")
        assert moved.get().tier_requested == "sonnet"
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 11  # the refused one never written


def test_an_unknown_task_and_an_undecodable_message_are_recorded_and_the_worker_keeps_going(
    fleet_env, start_worker, client, redis, db
):
    from tars_tasks.celery_app import make_app

    app = make_app(make_settings(fleet_env))
    app.send_task("tars.no_such_task", kwargs={"x": 1}, queue="tars.haiku")
    # A message in kombu's Redis envelope whose body no accepted serializer can decode.
    garbage = {"body": base64.b64encode(b"\x00\x01 not json").decode(), "content-encoding": "binary",
               "content-type": "application/x-garbage", "headers": {"task": "tars.run_request", "id": "garbage-1"},
               "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "priority": 0,
                              "delivery_info": {"exchange": "tars.haiku", "routing_key": "tars.haiku"}}}
    redis.lpush("tars.haiku", json.dumps(garbage))
    start_worker(tiers=["haiku"], concurrency=10)
    assert client.submit(role="researcher", prompt="after the bad ones").wait(timeout=60).status == "succeeded"

    def both_recorded():
        with db.connect() as conn:
            return sorted(conn.execute(text("SELECT reason FROM dead_letters")).scalars().all())

    assert _wait_until(lambda: len(both_recorded()) >= 2, timeout=30)
    assert both_recorded() == ["rejected_message", "unknown_task"]


def test_sigterm_is_a_warm_shutdown_that_neither_loses_nor_repeats_work(fleet_env, start_worker, client, db):
    env = {"TARS_SIM_LATENCY": "uniform:1000:2000", "TARS_VISIBILITY_TIMEOUT_S": "30"}
    first = start_worker(tiers=["haiku"], concurrency=10, env=env)
    handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(40)])

    def busy():
        with db.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'")).scalar() >= 5

    _wait_until(busy, timeout=30)
    assert first.stop(timeout=60) == 0  # SIGTERM: running tasks finish, the rest go back to the queue
    with db.connect() as conn:
        abandoned = conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'")).scalar()
    assert abandoned == 0, "a warm shutdown left calls unfinished"
    start_worker(tiers=["haiku"], concurrency=20, env=env)
    results = client.wait_many([h.id for h in handles], timeout=120)
    assert {r.status for r in results} == {"succeeded"}
    with db.connect() as conn:
        repeated = conn.execute(text(
            "SELECT request_id FROM api_calls GROUP BY request_id HAVING count(*) > 1")).scalars().all()
    assert repeated == [], "a request finished before the shutdown was called again"


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own, with an append-only file, that the test may restart."""
    from tests.helpers import PrivateRedis

    server = PrivateRedis(tmp_path, aof=True).start()
    yield server
    server.kill()


def test_a_redis_restart_with_work_queued_and_running_loses_nothing(fleet_env, start_worker, private_redis, db):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import ResultTimeout

    env = {**fleet_env, "TARS_BROKER_URL": private_redis.url, "TARS_VISIBILITY_TIMEOUT_S": "5",
           "TARS_SIM_LATENCY": "uniform:300:800", "TARS_REQUEUE_LOST_AFTER_S": "5", "TARS_RECONCILE_INTERVAL_S": "1"}
    fleet_env.update(env)  # the worker fixture reads fleet_env
    worker = start_worker(tiers=["haiku"], concurrency=20)
    with TarsClient(settings=make_settings(env)) as client:
        handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(80)])

        _wait_until(lambda: _finished(db) >= 10, timeout=60)
        private_redis.restart()
        try:
            results = client.wait_many([h.id for h in handles], timeout=180)
        except ResultTimeout as exc:
            raise AssertionError(f"{exc}\n" + fleet_snapshot(
                db=db, redis_url=private_redis.url, namespace=env["TARS_NAMESPACE"], workers=[worker])) from exc
    assert {r.status for r in results} == {"succeeded"}
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 80


def test_a_message_popped_by_a_worker_that_died_before_recording_it_runs_within_seconds_by_default(
    fleet_env, start_worker, client, redis, db
):
    """Kombu takes a message with BRPOP and records it as unacked in a second round trip. A worker
    SIGKILLed in between (it sits in BRPOP when the message arrives) loses it: here the "worker" is
    a bare BRPOP that then vanishes. Under the default settings the reconciler republishes it."""
    from config.keys import queue_for_tier
    from tars_tasks.client import TarsClient

    # published straight to the queue (a dispatched message is there just the same); the
    # reconciler sends it again through staging
    with TarsClient(settings=make_settings(fleet_env, dispatch_enabled=False)) as publisher:
        handle = publisher.submit(role="researcher", prompt="popped and dropped")
    popped = redis.brpop([queue_for_tier("haiku")], timeout=10)
    assert popped is not None and handle.id.encode() in popped[1]
    worker = start_worker(tiers=["haiku"], concurrency=5)  # default requeue_lost_after_s / reconcile_interval_s
    result = client.wait(handle.id, timeout=90)
    assert result.ok, fleet_snapshot(db=db, redis_url=fleet_env["TARS_BROKER_URL"],
                                     namespace=fleet_env["TARS_NAMESPACE"], workers=[worker])
    assert f"request {handle.id} was lost" in worker.log()
    with db.connect() as conn:
        calls = conn.execute(text("SELECT count(*) FROM api_calls WHERE request_id = :i"), {"i": handle.id}).scalar()
    assert calls == 1


def test_postgres_down_during_result_writes_holds_the_acks_until_the_rows_are_durable(
    fleet_env, start_worker, client, redis, db
):
    from tests.tcp_proxy import TcpProxy

    proxy = TcpProxy(target_host="127.0.0.1", target_port=5432)
    try:
        worker_db = fleet_env["TARS_DATABASE_URL"].replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        start_worker(tiers=["haiku"], concurrency=20,
                     env={"TARS_DATABASE_URL": worker_db, "TARS_SIM_LATENCY": "uniform:200:400"})
        handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(60)])

        _wait_until(lambda: _finished(db) >= 5, timeout=60)
        proxy.cut()
        time.sleep(3)  # the outage: workers finish calls they cannot record
        done_during = _finished(db)
        held = redis.hlen("unacked")
        assert held > 0, "no message was held unacked while its rows could not be written"
        proxy.restore()
        results = client.wait_many([h.id for h in handles], timeout=120)
    finally:
        proxy.close()
    assert {r.status for r in results} == {"succeeded"}
    assert done_during < 60
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 60
        assert conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'")).scalar() == 0


def test_a_request_the_broker_lost_is_published_again_and_one_still_queued_is_not(
    fleet_env, start_worker, client, redis, db
):
    from tars_tasks.db.models import Request
    from workers.maintenance import LostRequestReconciler

    # "lost": recorded, never published (what a message popped just before a Redis crash looks like)
    lost = client.coordinator.plan([{"role": "researcher", "prompt": "lost in transit"}])
    client.coordinator._record(lost, run_id=None)
    # and one that is merely waiting in its queue, behind nothing: just as old
    waiting = client.submit(role="researcher", prompt="waiting in the queue")
    settings = make_settings(fleet_env, requeue_lost_after_s=0.5)
    with db.begin() as conn:
        conn.execute(Request.__table__.update().values(submitted_at=text("now() - interval '1 minute'")))
    reconciler = LostRequestReconciler(celery_app=client.celery_app, settings=settings)
    lock = f"{settings.namespace}:reconcile:lock"
    t0 = time.time()
    assert reconciler.sweep(now=t0) == 0  # a first sighting is not proof: a worker may be between pop and record
    redis.delete(lock)
    assert reconciler.sweep(now=t0 + 0.5) == 0  # too soon after the first
    redis.delete(lock)
    assert reconciler.sweep(now=t0 + reconciler.CONFIRM_S + 0.1) == 1  # the lost one only: the other is in its list
    start_worker(tiers=["haiku"], concurrency=10)
    assert waiting.wait(timeout=60).ok
    assert client.wait(lost[0].id, timeout=60).ok
    with db.connect() as conn:
        calls = dict(conn.execute(text("SELECT request_id, count(*) FROM api_calls GROUP BY 1")).all())
    assert calls == {lost[0].id: 1, waiting.id: 1}
