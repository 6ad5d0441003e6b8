"""The fault cases of GUIDE §5 and issue #8, each a function ``case(ctx, n) -> Audit``.

Every case submits ``n`` requests with unique ids through real producers to real worker
processes, injects its fault, waits until the fleet settles, and returns the audit
(:func:`tests.faults.harness.audit`). The fault tests run them with a small ``n`` and assert the
audit holds; ``bench/faults.py`` runs them with ``n >= 1000`` and prints the table.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
from sqlalchemy import Engine, text

from tests.faults.harness import Audit, Fleet, PrivateRedis, audit, pending_count, specs, wait_terminal, wait_until
from tests.tcp_proxy import TcpProxy

#: Per-case limit on how long the fleet may take to settle after the fault.
SETTLE_TIMEOUT_S = 240.0


@dataclass
class CaseContext:
    """What a case runs against: a fresh database and broker database for this case."""

    env: dict[str, str]
    engine: Engine
    broker: redis_lib.Redis
    log_dir: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def fleet(self, **env) -> Fleet:
        f = Fleet(env={**self.env, **env}, log_dir=self.log_dir)
        self.cleanups.append(f.stop)
        return f

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:
                pass
        self.cleanups.clear()


def _submit_all(client, batch: list[dict], *, chunk: int = 100) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(batch), chunk):
        ids += [h.id for h in client.submit_many(batch[i:i + chunk])]
    return ids


def _finished(engine: Engine, ids: list[str]) -> int:
    return len(ids) - pending_count(engine, ids)


def _in_flight_on(engine: Engine, worker_name: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight' AND worker LIKE :w"),
                            {"w": f"{worker_name}:%"}).scalar()


# --- 1/17: a worker process SIGKILLed mid model call, under default settings --------------------

def case_sigkill_mid_call(ctx: CaseContext, n: int) -> Audit:
    fleet = ctx.fleet(TARS_VISIBILITY_TIMEOUT_S="3600", TARS_SIM_LATENCY="uniform:300:900")
    victim = fleet.start_worker(concurrency=100)
    fleet.start_worker(concurrency=100)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="sigkill"))
        wait_until(lambda: _in_flight_on(ctx.engine, victim.name) >= min(20, n // 10), timeout=60,
                   what="calls in flight on the victim")
        victim.kill(signal.SIGKILL)
        victim.proc.wait(10)
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    return audit(ctx.engine, case="sigkill mid call (default settings)", ids=ids)


# --- 2: a whole worker (every process of it) killed ----------------------------------------------

def case_kill_whole_worker(ctx: CaseContext, n: int) -> Audit:
    import os

    fleet = ctx.fleet(TARS_VISIBILITY_TIMEOUT_S="3600", TARS_SIM_LATENCY="uniform:300:900")
    victim = fleet.start_worker(concurrency=100)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="killall"))
        wait_until(lambda: _finished(ctx.engine, ids) >= n // 10, timeout=120, what="first tenth done")
        os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker and everything it started
        victim.proc.wait(10)
        fleet.start_worker(concurrency=100)
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    return audit(ctx.engine, case="whole worker killed", ids=ids)


# --- 3: SIGTERM during work: warm shutdown --------------------------------------------------------

def case_sigterm(ctx: CaseContext, n: int) -> Audit:
    fleet = ctx.fleet(TARS_SIM_LATENCY="uniform:200:600")
    worker = fleet.start_worker(concurrency=100)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="sigterm"))
        wait_until(lambda: _finished(ctx.engine, ids) >= n // 5, timeout=120, what="a fifth done")
        worker.kill(signal.SIGTERM)
        worker.proc.wait(60)
        fleet.start_worker(concurrency=100)
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    return audit(ctx.engine, case="SIGTERM (warm shutdown)", ids=ids)


# --- 4: Redis restarted with tasks queued and running --------------------------------------------

def case_redis_restart(ctx: CaseContext, n: int) -> Audit:
    broker = PrivateRedis(appendonly=True).start()
    ctx.cleanups.append(broker.close)
    fleet = ctx.fleet(TARS_BROKER_URL=broker.url, TARS_SIM_LATENCY="uniform:200:600",
                      TARS_REQUEUE_LOST_AFTER_S="5", TARS_RECONCILE_INTERVAL_S="1")
    fleet.start_worker(concurrency=100)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="redis-restart"))
        wait_until(lambda: _finished(ctx.engine, ids) >= n // 10, timeout=120, what="a tenth done")
        broker.restart()
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    return audit(ctx.engine, case="Redis restarted (AOF)", ids=ids)


# --- 5: Redis down when a producer submits ---------------------------------------------------------

def case_redis_down_at_submit(ctx: CaseContext, n: int) -> Audit:
    from tars_tasks.errors import BrokerUnavailable

    down = f"redis://127.0.0.1:{_closed_port()}/0"
    fleet = ctx.fleet(TARS_BROKER_URL=down, TARS_REDIS_URL=down)
    refused, other = 0, []
    with fleet.client() as client:
        for spec in specs(n, tag="down"):
            try:
                client.submit(**spec)
            except BrokerUnavailable:
                refused += 1
            except Exception as exc:  # anything else is a broken promise
                other.append(repr(exc))
    a = audit(ctx.engine, case="Redis down at submit", ids=[])
    a.submitted = n
    a.notes.update(refused_broker_unavailable=refused, other_errors=len(other), example=other[:1])
    a.failed_with_reason = refused  # each call was told, with BrokerUnavailable; nothing was recorded
    return a


# --- 6: Postgres down during result writes ---------------------------------------------------------

def case_postgres_down(ctx: CaseContext, n: int) -> Audit:
    from urllib.parse import urlsplit

    u = urlsplit(ctx.env["TARS_DATABASE_URL"])
    proxy = TcpProxy(target_host=u.hostname, target_port=u.port or 5432)
    ctx.cleanups.append(proxy.close)
    worker_db = ctx.env["TARS_DATABASE_URL"].replace(f"{u.hostname}:{u.port or 5432}", f"127.0.0.1:{proxy.port}")
    fleet = ctx.fleet(TARS_SIM_LATENCY="uniform:200:600")
    fleet.start_worker(concurrency=100, env={"TARS_DATABASE_URL": worker_db})
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="pgdown"))
        wait_until(lambda: _finished(ctx.engine, ids) >= n // 10, timeout=120, what="a tenth done")
        proxy.cut()
        time.sleep(5)
        held = ctx.broker.hlen("unacked")
        proxy.restore()
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    a = audit(ctx.engine, case="Postgres down during writes", ids=ids)
    a.notes["unacked_during_outage"] = held
    return a


# --- 7/18: the same message delivered twice, deliveries running concurrently -----------------------

def case_duplicate_delivery(ctx: CaseContext, n: int) -> Audit:
    from tars_tasks.celery_app import make_app
    from tars_tasks.publish import publish_request

    fleet = ctx.fleet(TARS_SIM_LATENCY="uniform:100:400")
    with fleet.client() as client:
        handles = []
        for i in range(0, n, 100):
            handles += client.submit_many(specs(min(100, n - i), tag=f"dup{i}"))
        app = make_app(fleet.settings())
        with app.producer_or_acquire() as producer:  # every message a second time, before any worker runs
            for h in handles:
                publish_request(app, producer=producer, request_id=h.id, tier=h.tier, tenant="default",
                                priority=h.priority, reply_to=None)
        fleet.start_worker(concurrency=100)
        fleet.start_worker(concurrency=100)
        ids = [h.id for h in handles]
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
        # the second deliveries may still be calling after the first finished: let them end
        wait_until(lambda: ctx.broker.hlen("unacked") == 0 and _queued_messages(ctx.broker) == 0, timeout=120,
                   what="every delivery done")
    return audit(ctx.engine, case="every message delivered twice", ids=ids)


# --- 8: a task that crashes its worker every time -------------------------------------------------

def case_poison(ctx: CaseContext, n: int) -> Audit:
    env = dict(TARS_SIM_CRASH_MARKER="__crash__", TARS_MAX_DELIVERIES="3", TARS_SIM_LATENCY="uniform:50:200")
    fleet = ctx.fleet(**env)
    poison_n = max(1, n // 200)
    batch = specs(n - poison_n, tag="poison-ok") + specs(poison_n, tag="poison", prompt=lambda i: f"__crash__ {i}")
    with fleet.client() as client:
        ids = _submit_all(client, batch)
        stop = threading.Event()

        def supervise() -> None:  # a supervisor restarting crashed workers, as compose would
            live = fleet.start_worker(concurrency=50)
            while not stop.wait(0.2):
                if live.proc.poll() is not None:
                    live = fleet.start_worker(concurrency=50)

        t = threading.Thread(target=supervise, daemon=True)
        t.start()
        try:
            wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
        finally:  # never leave a supervisor restarting workers after the case
            stop.set()
            t.join(30)
    a = audit(ctx.engine, case="poison: crashes its worker every time", ids=ids)
    with ctx.engine.connect() as conn:
        a.notes["failed_as_poison"] = conn.execute(
            text("SELECT count(*) FROM requests WHERE failure_reason = 'poison'")).scalar()
    a.notes["worker_restarts"] = len(fleet.workers) - 1
    return a


# --- 9/13: unknown tasks, undecodable and malformed messages, plain-Celery producers -------------

def case_foreign_messages(ctx: CaseContext, n: int) -> Audit:
    """Plain Celery producers (a stock app, stock transport options): well-formed messages for
    unknown request ids are recorded and run; malformed ones, unknown tasks and undecodable
    bodies are dead-lettered; the worker keeps going."""
    from celery import Celery

    fleet = ctx.fleet(TARS_SIM_LATENCY="uniform:50:200")
    stock = Celery("someone-else", broker=ctx.env["TARS_BROKER_URL"])
    plain_ids = [str(uuid.uuid4()) for _ in range(n)]
    bad = 0
    with stock.producer_or_acquire() as producer:
        for i, rid in enumerate(plain_ids):
            stock.send_task("tars.run_request", kwargs={"role": "researcher", "prompt": f"plain {i}",
                                                         "tenant": "outsider"},
                            task_id=rid, queue="tars.haiku", producer=producer)
            if i % 50 == 0:  # a few of every kind of bad message, interleaved
                stock.send_task("tars.run_request", args=("positional",), queue="tars.haiku", producer=producer)
                stock.send_task("tars.run_request", kwargs={"request_id": str(uuid.uuid4())}, queue="tars.haiku",
                                producer=producer)
                stock.send_task("tars.run_request", kwargs={"role": "nobody", "prompt": "x"}, queue="tars.haiku",
                                producer=producer)
                stock.send_task("tars.no_such_task", kwargs={"x": 1}, queue="tars.haiku", producer=producer)
                ctx.broker.lpush("tars.haiku", json.dumps(_garbage_envelope()))
                bad += 5
    fleet.start_worker(concurrency=100)
    wait_terminal(ctx.engine, plain_ids, timeout=SETTLE_TIMEOUT_S)
    wait_until(lambda: _dead_letters(ctx.engine) >= bad, timeout=60, what="every bad message dead-lettered")
    a = audit(ctx.engine, case="plain-Celery and malformed messages", ids=plain_ids)
    a.notes["bad_messages_sent"] = bad
    return a


# --- 10: a provider 429/5xx storm ------------------------------------------------------------------

def case_provider_storm(ctx: CaseContext, n: int) -> Audit:
    fleet = ctx.fleet(TARS_SIM_FAILURE_RATE="0.5", TARS_SIM_LATENCY="uniform:20:80", TARS_BREAKER_ENABLED="false",
                      TARS_RETRY_BACKOFF_INITIAL_S="0.05", TARS_RETRY_BACKOFF_MAX_S="0.5")
    fleet.start_worker(concurrency=200)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="storm"))
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    a = audit(ctx.engine, case="provider 5xx storm (50% of calls)", ids=ids)
    with ctx.engine.connect() as conn:
        a.notes["attempts"] = conn.execute(text("SELECT count(*) FROM api_calls")).scalar()
    return a


# --- 11: invalid input ------------------------------------------------------------------------------

def case_invalid_input(ctx: CaseContext, n: int) -> Audit:
    from tars_tasks.errors import InvalidRequest

    fleet = ctx.fleet()
    bad_inputs = [{"role": "nobody", "prompt": "x"}, {"role": "researcher", "prompt": ""},
                  {"role": "researcher", "prompt": "x", "priority": -1},
                  {"role": "researcher", "prompt": "x" * 300_000},
                  {"role": "researcher", "prompt": "x", "tier": "gpt"}, {"role": "researcher", "prompt": "a\x00b"},
                  {"role": "researcher", "prompt": "x", "tenant": "acme\n"}, {"role": "researcher"}]
    told, other = 0, []
    with fleet.client() as client:
        for i in range(n):
            try:
                client.submit_many([bad_inputs[i % len(bad_inputs)]])
                other.append("accepted")
            except InvalidRequest:
                told += 1
            except Exception as exc:
                other.append(repr(exc)[:200])
    a = audit(ctx.engine, case="invalid input", ids=[])
    a.submitted, a.failed_with_reason = n, told
    a.notes.update(invalid_request=told, other=len(other), example=other[:1], queued=_queued_messages(ctx.broker))
    return a


# --- 12: overload beyond capacity, several producers ----------------------------------------------

def _overload_producer(env: dict, n: int, out) -> None:  # runs in a child process
    import os

    os.environ.update(env)
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import Overloaded
    from tests.helpers import make_settings

    accepted, refused = [], 0
    with TarsClient(settings=make_settings(env)) as client:
        for s in specs(n, tag=f"overload-{os.getpid()}"):
            try:
                accepted.append(client.submit(**s).id)
            except Overloaded:
                refused += 1
    out.put((accepted, refused))


def case_overload(ctx: CaseContext, n: int, *, producers: int = 4) -> Audit:
    bound = max(10, n // 2)
    env = {**ctx.env, "TARS_MAX_QUEUE_DEPTH": str(bound)}
    mp = multiprocessing.get_context("spawn")
    out = mp.Queue()
    procs = [mp.Process(target=_overload_producer, args=(env, n // producers, out)) for _ in range(producers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    accepted = [i for ids, _ in results for i in ids]
    refused = sum(r for _, r in results)
    depth = _queued_messages(ctx.broker)
    fleet = ctx.fleet(TARS_SIM_LATENCY="fixed:5")
    fleet.start_worker(concurrency=200)
    wait_terminal(ctx.engine, accepted, timeout=SETTLE_TIMEOUT_S)
    a = audit(ctx.engine, case=f"overload: {producers} producers, bound {bound}", ids=accepted)
    a.notes.update(offered=n // producers * producers, accepted=len(accepted), refused_overloaded=refused,
                   bound=bound, peak_queue_depth=depth, overshoot=round(depth / bound, 3))
    return a


# --- 14: a row that can never be written -----------------------------------------------------------

def case_unwritable_row(ctx: CaseContext, n: int) -> Audit:
    fleet = ctx.fleet(TARS_SIM_UNSTORABLE_MARKER="__nul__", TARS_SIM_LATENCY="uniform:20:100")
    fleet.start_worker(concurrency=100)
    bad_n = max(1, n // 100)
    batch = specs(n - bad_n, tag="storable") + specs(bad_n, tag="unstorable", prompt=lambda i: f"__nul__ {i}")
    with fleet.client() as client:
        ids = _submit_all(client, batch)
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    a = audit(ctx.engine, case="rows Postgres refuses (NUL in an answer)", ids=ids)
    with ctx.engine.connect() as conn:
        a.notes["failed_unwritable"] = conn.execute(
            text("SELECT count(*) FROM requests WHERE failure_reason = 'unwritable'")).scalar()
    a.notes["expected_unwritable"] = bad_n
    return a


# --- 15: the fleet-state Redis failing while the broker is up --------------------------------------

def case_fleet_state_redis_down(ctx: CaseContext, n: int) -> Audit:
    state = PrivateRedis(appendonly=False).start()
    ctx.cleanups.append(state.close)
    fleet = ctx.fleet(TARS_REDIS_URL=state.url, TARS_SIM_LATENCY="uniform:200:600")
    # few slots, so that calls keep starting (and meeting the limiter) all through the outage
    fleet.start_worker(concurrency=20)
    fleet.start_worker(concurrency=20)
    with fleet.client() as client:
        ids = _submit_all(client, specs(n, tag="statedown"))
        wait_until(lambda: _finished(ctx.engine, ids) >= n // 10, timeout=120, what="a tenth done")
        state.stop()
        time.sleep(5)
        state.start()
        wait_terminal(ctx.engine, ids, timeout=SETTLE_TIMEOUT_S)
    return audit(ctx.engine, case="fleet-state Redis down 5 s", ids=ids)


CASES: dict[str, Callable[[CaseContext, int], Audit]] = {
    "sigkill": case_sigkill_mid_call,
    "kill-worker": case_kill_whole_worker,
    "sigterm": case_sigterm,
    "redis-restart": case_redis_restart,
    "redis-down-at-submit": case_redis_down_at_submit,
    "postgres-down": case_postgres_down,
    "duplicate-delivery": case_duplicate_delivery,
    "poison": case_poison,
    "foreign-messages": case_foreign_messages,
    "provider-storm": case_provider_storm,
    "invalid-input": case_invalid_input,
    "overload": case_overload,
    "unwritable-row": case_unwritable_row,
    "fleet-state-redis-down": case_fleet_state_redis_down,
}


# --- helpers ------------------------------------------------------------------------------------------

def _queued_messages(r: redis_lib.Redis) -> int:
    """Queued in a Celery list or staged for dispatch."""
    from tests.helpers import waiting_messages

    return waiting_messages(r)


def _dead_letters(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM dead_letters")).scalar()


def _closed_port() -> int:
    from tests.faults.harness import free_port

    return free_port()  # nothing listens there once the probing socket is closed


def _garbage_envelope() -> dict:
    """A message in kombu's Redis envelope whose body no accepted serializer can decode."""
    return {"body": base64.b64encode(b"\x00\x01 not json").decode(), "content-encoding": "binary",
            "content-type": "application/x-garbage",
            "headers": {"task": "tars.run_request", "id": str(uuid.uuid4())},
            "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "priority": 0,
                           "delivery_info": {"exchange": "tars.haiku", "routing_key": "tars.haiku"}}}
