"""Time to recovery after a hard kill, under default settings (issue #8: within 10 s).

    .venv/bin/python bench/failover.py --kills 12

Each round: a victim worker and a survivor worker (gevent, default visibility timeout of an
hour, default lease settings), 250 requests of 1.0-2.0 s simulated model time (more than the
survivor's 100 slots, so the victim gets work too); once at least 10 calls are in flight on the
victim it is SIGKILLed. For every request the victim was calling, the
recovery time is from the kill to the start of its next attempt on another worker (from the
``api_calls`` rows). A round's recovery time is its slowest request's. Prints p50 / p99 / max
over rounds and over requests, and checks that no request ran twice to success.

``--lost N``: N rounds of a message the broker lost (a worker SIGKILLed between Redis' pop and
kombu's unacked record loses the message it was just handed; here the request row is recorded and
its message never sent, which is what such a loss leaves). Recovery time: from the row's
submission to the start of its first attempt, under the default reconciler settings.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgdb import fresh_db  # noqa: E402

DB_NAME = "tars_failover"


def _fresh_db() -> str:
    return fresh_db(DB_NAME)


def _pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile: a value that occurred."""
    import math

    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def _lost_rounds(client, engine, rounds: int) -> list[float]:
    from sqlalchemy import text

    from tests.faults.harness import wait_until

    waits = []
    for k in range(rounds):
        planned = client.coordinator.plan([{"role": "researcher", "prompt": f"lost {k}"}])
        client.coordinator._record(planned, run_id=None)  # the row, and no message anywhere
        rid = planned[0].id

        def started(rid=rid):
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT extract(epoch FROM min(a.started_at) - r.submitted_at) FROM requests r JOIN api_calls a "
                    "ON a.request_id = r.id WHERE r.id = :i GROUP BY r.submitted_at"), {"i": rid}).scalar()

        wait_until(lambda: started() is not None, timeout=120, what="the lost request's first attempt")
        waits.append(float(started()))
        print(f"lost round {k}: first attempt {waits[-1]:.1f} s after submission", flush=True)
    return waits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--requests", type=int, default=250)
    p.add_argument("--redis-db", type=int, default=10)
    p.add_argument("--lost", type=int, default=0, help="rounds of a message lost between pop and record")
    args = p.parse_args()
    if args.kills < 0 or args.requests < 10 or args.lost < 0 or args.kills + args.lost < 1:
        p.error("--kills >= 0, --lost >= 0 (one of them >= 1) and --requests >= 10")
    for k in [k for k in os.environ if k.startswith("TARS_")]:
        del os.environ[k]
    from sqlalchemy import text

    from tars_tasks.client import TarsClient
    from tars_tasks.db.engine import get_engine
    from tests.faults.harness import Fleet, wait_terminal, wait_until
    from tests.helpers import make_settings

    broker = f"redis://127.0.0.1:6379/{args.redis_db}"
    r = redis.Redis.from_url(broker)
    r.flushdb()
    db_url = _fresh_db()
    engine = get_engine(db_url)
    env = {"TARS_BROKER_URL": broker, "TARS_DATABASE_URL": db_url, "TARS_NAMESPACE": f"fo{uuid.uuid4().hex[:6]}",
           "TARS_SIM_LATENCY": "uniform:1000:2000", "TARS_SIM_FAILURE_RATE": "0", "TARS_TASK_EVENTS": "false"}
    fleet = Fleet(env=env, log_dir=Path(tempfile.mkdtemp(prefix="tars-failover-")))
    fleet.start_worker(concurrency=100)  # the survivor
    per_round: list[float] = []
    per_request: list[float] = []
    twice = 0
    try:
        with TarsClient(settings=make_settings(env)) as client:
            for k in range(args.kills):
                victim = fleet.start_worker(concurrency=100)
                handles = client.submit_many([{"role": "researcher", "prompt": f"round {k} request {i}"}
                                              for i in range(args.requests)])
                ids = [h.id for h in handles]
                like = {"w": f"{victim.name}:%", "ids": ids}

                def on_victim(like=like) -> int:
                    with engine.connect() as conn:
                        return conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome='in_flight' "
                                                 "AND worker LIKE :w AND request_id = ANY(:ids)"), like).scalar()

                wait_until(lambda: on_victim() >= 10, timeout=60, what="10 calls in flight on the victim")
                killed_at = datetime.now(UTC)
                victim.kill(signal.SIGKILL)
                victim.proc.wait(10)
                if not wait_terminal(engine, ids, timeout=120):
                    print(f"round {k}: requests still pending after 120 s", flush=True)
                with engine.connect() as conn:
                    rows = conn.execute(text("""
                        SELECT a.request_id, min(b.started_at) FROM api_calls a JOIN api_calls b
                          ON b.request_id = a.request_id AND b.worker NOT LIKE :w
                        WHERE a.worker LIKE :w AND a.outcome IN ('in_flight', 'unknown') AND a.request_id = ANY(:ids)
                        GROUP BY a.request_id"""), like).all()
                    twice += conn.execute(text(
                        "SELECT count(*) FROM (SELECT request_id FROM api_calls WHERE outcome='ok' AND "
                        "request_id = ANY(:ids) GROUP BY 1 HAVING count(*) > 1) d"), like).scalar()
                waits = [(started - killed_at).total_seconds() for _, started in rows]
                per_request += waits
                per_round.append(max(waits))
                print(f"round {k}: {len(waits)} requests recovered, slowest after {max(waits):.1f} s", flush=True)
                fleet.workers.remove(victim)
            lost_waits = _lost_rounds(client, engine, args.lost)
    finally:
        fleet.stop()
        r.flushdb()
    if lost_waits:
        print(f"\na lost message (recorded, never delivered), {len(lost_waits)} rounds, default settings: "
              f"submission to first attempt p50 {statistics.median(lost_waits):.1f} s, "
              f"p99 {_pct(lost_waits, 99):.1f} s, max {max(lost_waits):.1f} s")
    if not per_round:
        return 0
    print(f"\nrecovery after a SIGKILL under default settings, {args.kills} kills, "
          f"{len(per_request)} requests in flight on the victims:")
    print(f"  per kill (slowest request): p50 {statistics.median(per_round):.1f} s, "
          f"p99 {_pct(per_round, 99):.1f} s, max {max(per_round):.1f} s")
    print(f"  per request:                p50 {statistics.median(per_request):.1f} s, "
          f"p99 {_pct(per_request, 99):.1f} s, max {max(per_request):.1f} s")
    print(f"  requests that ran twice to success: {twice}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
