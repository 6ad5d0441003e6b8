"""The writer's and the loader's Postgres statements, variant against variant, on one connection:
client CPU (``time.process_time``) per entry of a group commit, and per row of a group read.

    .venv/bin/python bench/bench_pgwrite.py --pg-db tars_h_pgwrite_micro --batch 100 --rounds 30

Variants of a commit (an entry: its request locked, two api_calls rows upserted, the request
finished, its totals recomputed): ``orm`` (the SQLAlchemy statements, compiled and bound per row),
``executemany`` (constant SQL, one step at a time, psycopg's pipelined ``executemany`` through
``exec_driver_sql``: commit 91fced2's workers/pgsql.py), ``executemany-raw`` (the same on the raw
psycopg cursor) and ``pipeline`` (workers/pgsql.py now: every step in one psycopg pipeline). Commit 49e661e's
version of this bench also has ``unnest`` (one statement per step, arrays for parameters: that
commit's workers/pgsql.py). Of a read: ``orm`` (``SELECT ... WHERE id IN (...)``) and ``any``
(workers/pgsql.py, ``= ANY(array)``). Rounds alternate
the variants, so a busy machine weighs on all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgdb import fresh_db  # noqa: E402
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


_EM_INSERT = pgsql.UPSERT_API_SQL
_EM_FINISH = pgsql.FINISH_SQL


class _Variant(GroupCommitWriter):
    mode = "unnest"

    def _commit_pg(self, conn, ids, api_rows, finishes) -> None:  # type: ignore[override]
        if self.mode == "orm":
            self._commit_orm(conn, ids, api_rows, finishes)
        elif self.mode == "pipeline":  # workers/pgsql.py: every step in one psycopg pipeline
            GroupCommitWriter._commit_pg(conn, ids, api_rows, finishes)
        else:  # one step at a time: through exec_driver_sql (commit 91fced2's workers/pgsql.py), or raw
            run = (conn.exec_driver_sql if self.mode == "executemany"
                   else conn.connection.driver_connection.cursor().executemany)
            conn.exec_driver_sql(pgsql.LOCK_SQL, {"ids": ids})
            run(_EM_INSERT, list(api_rows.values()))
            run(_EM_FINISH, finishes)
            run(pgsql.TOTALS_SQL, [{"id": i} for i in ids])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-db", default="tars_bench_pgwrite")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    engine = get_engine(fresh_db(args.pg_db))
    writer = _Variant(engine=engine, notifier=None)
    loader = RequestLoader(engine=engine)
    modes = ["orm", "executemany", "executemany-raw", "pipeline"]
    cpu: dict[str, list[float]] = {m: [] for m in [*modes, "read-orm", "read-any"]}
    for r in range(args.rounds + 2):  # two rounds of warm-up (statements prepared, caches filled)
        for m in modes if r % 2 else modes[::-1]:
            with engine.begin() as conn:
                ids = _requests(conn, args.batch)
            batch = _batch(ids)
            writer.mode = m
            t = time.process_time()
            writer._commit(batch)
            if r >= 2:
                cpu[m].append((time.process_time() - t) / args.batch)
            for name, read in (("read-orm", loader._read_orm), ("read-any", loader._read)):
                t = time.process_time()
                got = read(sorted(ids))
                if r >= 2:
                    cpu[name].append((time.process_time() - t) / args.batch)
                assert len(got) == args.batch
    with engine.connect() as conn:
        totals_ok = conn.execute(text("SELECT count(*) FROM requests WHERE status = 'succeeded' AND attempts = 2"
                                      " AND input_tokens = 200")).scalar_one()
    writer.close()
    loader.close()
    print(f"batch {args.batch}, {args.rounds} rounds; requests finished with both attempts counted: {totals_ok}")
    print("| variant | client CPU µs per entry (median) | p10 | p90 |\n|---|---:|---:|---:|")
    for m, xs in cpu.items():
        q = statistics.quantiles(xs, n=10)
        print(f"| {m} | {statistics.median(xs) * 1e6:.0f} | {q[0] * 1e6:.0f} | {q[-1] * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
