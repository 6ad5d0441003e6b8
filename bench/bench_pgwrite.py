"""The writer's and the loader's Postgres statements, variant against variant, on one connection:
client CPU (``time.process_time``) per entry of a group commit, and per row of a group read.

    .venv/bin/python bench/bench_pgwrite.py --pg-db tars_h_pgwrite_micro --batch 100 --rounds 30 [--gevent]

Variants of a commit (an entry: its request locked, two api_calls rows upserted, the request
finished, its totals recomputed): ``orm`` (the SQLAlchemy statements, compiled and bound per row),
``rows`` (workers/pgsql.py's statements per row, through psycopg's pipelined ``executemany``,
all steps in one pipeline: what commit 1df98c2 wrote at any batch size) and ``sets``
(workers/pgsql.py's statements of arrays, one per step). The writer takes ``sets`` from
``pgsql.SETS_FROM`` rows of a step on, ``rows`` below. Of a read:
``orm`` (``SELECT ... WHERE id IN (...)``) and ``any`` (workers/pgsql.py). Rounds alternate the
variants, so a busy machine weighs on all of them alike.

``--gevent`` monkey-patches first, as a gevent worker is: psycopg then waits in Python
(``psycopg.waiting.wait_poll`` on gevent's poll) instead of its C loop, once per command a
pipeline sends, so a statement per row costs far more there than in a plain process.
"""

from __future__ import annotations

import sys

if "--gevent" in sys.argv:  # before anything imports socket or select: as celery -P gevent does
    from gevent import monkey

    monkey.patch_all()

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from meters import _cpu as cpu_seconds  # noqa: E402
from meters import postgres_backends  # noqa: E402
from pgdb import PG_ADMIN, fresh_db  # noqa: E402
from sqlalchemy import Connection, text  # noqa: E402

from tars_tasks.codes import AttemptOutcome, RequestStatus  # noqa: E402
from tars_tasks.db.engine import get_engine  # noqa: E402
from workers import pgsql  # noqa: E402
from workers.loader import RequestLoader  # noqa: E402
from workers.records import AttemptRecord, FinishRecord  # noqa: E402
from workers.writer import GroupCommitWriter, _Entry  # noqa: E402

T0 = datetime(2026, 12, 2, tzinfo=UTC)


def _requests(conn: Connection, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    conn.exec_driver_sql(
        "INSERT INTO requests (id, tenant, role, tier_requested, priority, prompt, status, submitted_at, attempts,"
        " input_tokens, output_tokens, cost_usd, lane, metadata) SELECT id, 'acme', 'researcher', 'haiku', 5, 'p',"
        " 'queued', now(), 0, 0, 0, 0, 'interactive', '{\"k\": \"v\"}'::json FROM unnest(%(ids)s::varchar[]) AS q(id)",
        {"ids": ids})
    return ids


def _batch(ids: list[str]) -> list[_Entry]:
    out = []
    for rid in ids:
        a = AttemptRecord(id=str(uuid.uuid4()), request_id=rid, attempt=1, tier="haiku", provider="sim",
                          model="claude-haiku", outcome=AttemptOutcome.OK, worker="w@h", started_at=T0,
                          http_status=200, input_tokens=100, output_tokens=50, cost_usd=Decimal("0.000123"),
                          latency_ms=12.5, finished_at=T0)
        out.append(_Entry(api_rows=[a.replace(id=str(uuid.uuid4()), outcome=AttemptOutcome.TRANSIENT_ERROR), a],
                          finish=FinishRecord(request_id=rid, status=RequestStatus.SUCCEEDED, tier_used="haiku",
                                              model="claude-haiku", worker="w@h", started_at=T0, result="ok" * 40,
                                              stop_reason="end_turn", finished_at=T0)))
    return out


class _Variant(GroupCommitWriter):
    mode = "sets"

    def _commit_pg(self, conn, ids, api_rows, finishes, *, commit) -> None:  # type: ignore[override]
        if self.mode == "orm":
            self._commit_orm(conn, ids, api_rows, finishes)
            return
        # workers/pgsql.py with every step as a set (SETS_FROM 1), or row by row
        sets_from, pgsql.SETS_FROM = pgsql.SETS_FROM, 1 if self.mode == "sets" else 1 << 30
        try:
            GroupCommitWriter._commit_pg(conn, ids, api_rows, finishes, commit=commit)
        finally:
            pgsql.SETS_FROM = sets_from


def psycopg_wait() -> str:
    import psycopg.waiting

    return psycopg.waiting.wait.__name__


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-db", default="tars_bench_pgwrite")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeat", type=int, default=10, help="commits of a variant per round (the server's CPU "
                   "is read in clock ticks: several commits between two readings)")
    p.add_argument("--gevent", action="store_true", help="monkey-patch first, as a gevent worker is")
    args = p.parse_args()
    engine = get_engine(fresh_db(args.pg_db))
    writer = _Variant(engine=engine, notifier=None)
    loader = RequestLoader(engine=engine)
    modes = ["orm", "rows", "sets"]
    cpu: dict[str, list[float]] = {m: [] for m in [*modes, "read-orm", "read-any"]}
    server: dict[str, float] = dict.fromkeys(cpu, 0.0)
    backends: list[int] = []
    n = args.batch * args.repeat
    for r in range(args.rounds + 2):  # two rounds of warm-up (statements prepared, caches filled)
        if r == 2:  # the connections are open now: the server processes whose CPU counts
            backends = postgres_backends(PG_ADMIN, args.pg_db)()
        for m in modes if r % 2 else modes[::-1]:
            with engine.begin() as conn:
                ids = [_requests(conn, args.batch) for _ in range(args.repeat)]
            batches = [_batch(chunk) for chunk in ids]
            writer.mode = m
            s0, t = _server_cpu(backends), time.process_time()
            for batch in batches:
                writer._commit(batch)
            t, s1 = time.process_time() - t, _server_cpu(backends)
            if r >= 2:
                cpu[m].append(t / n)
                server[m] += s1 - s0
            for name, read in (("read-orm", loader._read_orm), ("read-any", loader._read)):
                s0, t = _server_cpu(backends), time.process_time()
                got = [read(sorted(chunk)) for chunk in ids]
                t, s1 = time.process_time() - t, _server_cpu(backends)
                if r >= 2:
                    cpu[name].append(t / n)
                    server[name] += s1 - s0
                assert all(len(g) == args.batch for g in got)
    with engine.connect() as conn:
        totals_ok = conn.execute(text("SELECT count(*) FROM requests WHERE status = 'succeeded' AND attempts = 2"
                                      " AND input_tokens = 200")).scalar_one()
    writer.close()
    loader.close()
    print(f"batch {args.batch}, {args.rounds} rounds of {args.repeat}, gevent {args.gevent}; psycopg waits in "
          f"{psycopg_wait()}; requests finished with both attempts counted: {totals_ok}")
    print("| variant | client CPU µs per entry (median) | p10 | p90 | server CPU µs per entry (mean) |\n"
          "|---|---:|---:|---:|---:|")
    for m, xs in cpu.items():
        q = statistics.quantiles(xs, n=10)
        print(f"| {m} | {statistics.median(xs) * 1e6:.0f} | {q[0] * 1e6:.0f} | {q[-1] * 1e6:.0f} | "
              f"{server[m] / (n * args.rounds) * 1e6:.0f} |")
    return 0


def _server_cpu(pids: list[int]) -> float:
    return sum(c for pid in pids if (c := cpu_seconds(pid)) is not None)


if __name__ == "__main__":
    raise SystemExit(main())
