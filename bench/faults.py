"""The fault runner: every fault case of tests/faults/cases.py at N requests, one table.

    .venv/bin/python bench/faults.py --cases all --n 1000
    .venv/bin/python bench/faults.py --cases sigkill,duplicate-delivery --n 1000 --out docs/faults.md

For each case: a fresh Postgres database (``tars_faults``) and a flushed Redis database
(``--redis-db``, default 11), real worker processes, the fault, then the audit: submitted,
succeeded, failed with a reason, pending, requests that ran twice, attempts billed with an
unknown outcome, and whether every request row's totals equal the sum of its api_calls.
Everything talks to 127.0.0.1 only and every case is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgdb import fresh_db  # noqa: E402

DB_NAME = "tars_faults"


def _row(a) -> list[str]:
    totals = "yes" if a.totals_equal else f"NO ({a.totals_mismatched})"
    notes = "; ".join(f"{k}={v}" for k, v in a.notes.items() if k != "example")
    return [a.case, str(a.submitted), str(a.succeeded), str(a.failed_with_reason),
            str(a.pending + a.failed_without_reason), str(a.duplicates), str(a.unknown_attempts), totals,
            "holds" if a.holds() else "BROKEN", notes]


HEADER = ["case", "submitted", "succeeded", "failed with reason", "pending / no reason", "ran twice",
          "attempts billed, outcome unknown", "totals == sum(api_calls)", "promise", "notes"]


def main() -> int:
    from tests.faults.cases import CASES, CaseContext

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="all", help=f"comma-separated, or 'all': {', '.join(CASES)}")
    p.add_argument("--n", type=int, default=1000, help="requests per case (>= 1)")
    p.add_argument("--redis-db", type=int, default=11)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="the Redis server (without a db number)")
    p.add_argument("--pg-db", default=DB_NAME, help="the Postgres database to create afresh for each case")
    p.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = p.parse_args()
    if args.n < 1:
        p.error("--n must be >= 1")
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")

    for k in [k for k in os.environ if k.startswith("TARS_")]:
        del os.environ[k]
    broker_url = f"{args.redis_url.rstrip('/')}/{args.redis_db}"
    r = redis.Redis.from_url(broker_url)
    from tars_tasks.db.engine import get_engine

    rows: list[list[str]] = []
    started = time.time()
    for name in names:
        db_url = fresh_db(args.pg_db)
        engine = get_engine(db_url)
        r.flushdb()
        env = {"TARS_BROKER_URL": broker_url, "TARS_DATABASE_URL": db_url,
               "TARS_NAMESPACE": f"f{uuid.uuid4().hex[:8]}", "TARS_SIM_FAILURE_RATE": "0",
               "TARS_SIM_LATENCY": "uniform:20:60", "TARS_TASK_EVENTS": "false"}
        log_dir = Path(tempfile.mkdtemp(prefix=f"tars-fault-{name}-"))
        ctx = CaseContext(env=env, engine=engine, broker=r, log_dir=log_dir)
        t0 = time.monotonic()
        try:
            a = CASES[name](ctx, args.n)
            a.notes["seconds"] = round(time.monotonic() - t0, 1)
            rows.append(_row(a))
        except Exception as exc:
            traceback.print_exc()
            rows.append([name, str(args.n), *["-"] * 6, "ERROR", f"{type(exc).__name__}: {exc}"[:200]])
        finally:
            ctx.close()
            engine.dispose()
        print(" | ".join(rows[-1]), flush=True)
    r.flushdb()

    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    md = "\n".join(table)
    cmd = "python bench/faults.py " + " ".join(sys.argv[1:])
    print(f"\n`{cmd}` ({time.time() - started:.0f} s)\n\n{md}")
    if args.out:
        args.out.write_text(f"`{cmd}`\n\n{md}\n")
    return 0 if all(row[8] == "holds" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
