"""The writer's and the loader's raw Postgres statements (workers/pgsql.py) against the SQLAlchemy
statements they replaced, on the real Postgres: the same batches written both ways leave the same
rows, column for column, read back through the ORM; a redelivered finish is a no-op and its calls
are counted once; the loader reads the same RequestRow both ways.

What the ORM used to take care of and raw SQL can get wrong: a column mixing Python types
(Decimal and float costs, int and float latencies: psycopg refuses a mixed array, if the
statement ever binds arrays), NULLs, JSON, unicode, a request finished twice in one batch (the
first verdict stands: ``UPDATE ... FROM`` a set would pick either), the enqueue-failed guard.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Connection, select

from tars_tasks.codes import AttemptOutcome, FailureReason, RequestStatus
from tars_tasks.db.models import ApiCall, Request
from workers import pgsql
from workers.loader import RequestLoader
from workers.records import AttemptRecord, FinishRecord
from workers.writer import GroupCommitWriter

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC)
SKIP_REQ = {"id", "idempotency_key", "submitted_at", "reply_to", "prompt"}
SKIP_API = {"id", "request_id"}


class OrmWriter(GroupCommitWriter):
    """The writer with its former SQLAlchemy statements on Postgres too (the reference)."""

    def _commit_pg(self, conn: Connection, ids, api_rows, finishes, *, commit) -> None:  # type: ignore[override]
        self._commit_orm(conn, ids, api_rows, finishes)


def _submit(client, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(client.submit(role="researcher", prompt=f"{tag} {i}", tenant="acme",
                                 metadata={"k": "v☃", "n": str(i)}, stop=["END", "Ω"], max_tokens=77 + i,
                                 temperature=0.25).id)
    return ids


def _attempts(rid: str, i: int, tag: str) -> list[AttemptRecord]:
    """Two attempts: one failed transiently (int latency, float cost), one ok (Decimal cost, float latency)."""
    base = AttemptRecord(id=f"{tag}-{i}-1", request_id=rid, attempt=1, tier="haiku", provider="sim",
                         model="claude-haiku", outcome=AttemptOutcome.TRANSIENT_ERROR, worker="w☃@host",
                         started_at=T0, http_status=529 if i % 2 else None,
                         error="überlastet \u2603 \"q\" \\ end" if i % 2 else None,
                         input_tokens=10 + i, cost_usd=0.000012345 if i % 2 else Decimal("0.000012345"),  # type: ignore[arg-type]
                         latency_ms=12 if i % 2 else 12.3456, ratelimit_wait_ms=0 if i % 3 else 1.5,
                         finished_at=T0 + timedelta(milliseconds=12))
    ok = base.replace(id=f"{tag}-{i}-2", attempt=2, outcome=AttemptOutcome.OK, http_status=200, error=None,
                      input_tokens=1000 + i, output_tokens=333, cache_write_tokens=5, cache_write_1h_tokens=6,
                      cache_read_tokens=7, cost_usd=Decimal("0.123456789"), latency_ms=Decimal("8.125"),
                      ratelimit_wait_ms=2.75, finished_at=None if i % 2 else T0 + timedelta(seconds=1))
    return [base, ok]


def _finish(rid: str, i: int) -> FinishRecord:
    status = [RequestStatus.SUCCEEDED, RequestStatus.FAILED][i % 2]
    return FinishRecord(request_id=rid, status=status, tier_used="haiku", model="claude-haiku", worker="w☃@host",
                        started_at=T0, result="réponse 😀 \"quoted\" {json: no}" if i % 2 == 0 else None,
                        error=None if i % 2 == 0 else "boom \x00 nul",
                        failure_reason=None if i % 2 == 0 else FailureReason.UNWRITABLE,
                        stop_reason="end_turn" if i % 3 else None, finished_at=T0 + timedelta(seconds=2),
                        served_mode="degraded" if i % 3 == 1 else None)


def _write(writer_cls, db, client, tag: str) -> list[str]:
    ids = _submit(client, 6, tag)
    writer = writer_cls(engine=db, notifier=None, linger_ms=50)
    try:
        # attempts recorded in flight first, then their final versions with the finish (a later version wins)
        writer.record([a.replace(outcome=AttemptOutcome.IN_FLIGHT, finished_at=None, cost_usd=Decimal(0))
                       for i, rid in enumerate(ids) for a in _attempts(rid, i, tag)])
        items = [(_attempts(rid, i, tag), _finish(rid, i), None) for i, rid in enumerate(ids)]
        # the same request finished twice in one batch: the first verdict stands
        items.append((_attempts(ids[0], 0, tag), _finish(ids[0], 1).replace(result="second"), None))
        writer.finish_many(items)
        # a redelivered finish, later: a no-op, its (same) attempts counted once
        writer.finish_many([(_attempts(rid, i, tag), _finish(rid, i).replace(result="redelivered"), None)
                            for i, rid in enumerate(ids)])
        assert writer.isolated == 0
    finally:
        writer.close()
    return ids


def _rows(db, ids: list[str]) -> list[tuple[dict, list[dict]]]:
    out = []
    with db.connect() as conn:
        for rid in ids:
            req = conn.execute(select(Request.__table__).where(Request.id == rid)).one()._asdict()
            calls = [c._asdict() for c in conn.execute(select(ApiCall.__table__).where(ApiCall.request_id == rid)
                                                       .order_by(ApiCall.attempt))]
            out.append(({k: v for k, v in req.items() if k not in SKIP_REQ},
                        [{k: v for k, v in c.items() if k not in SKIP_API} for c in calls]))
    return out


@pytest.fixture(params=["rows", "sets", "mixed"])
def sets_from(request, monkeypatch) -> str:
    """Every step row by row, every step as one statement of arrays, or as the writer picks
    (``pgsql.SETS_FROM``: the batches here have 12 attempts, 7 finishes and 6 requests)."""
    monkeypatch.setattr(pgsql, "SETS_FROM", {"rows": 1 << 30, "sets": 1, "mixed": 8}[request.param])
    return request.param


def test_raw_statements_write_what_the_orm_wrote(client, db, sets_from):
    orm = _rows(db, _write(OrmWriter, db, client, f"orm-{sets_from}"))
    raw_ids = _write(GroupCommitWriter, db, client, f"raw-{sets_from}")
    raw = _rows(db, raw_ids)
    assert raw == orm
    req0, calls0 = raw[0]
    assert req0["status"] == "succeeded" and req0["result"].startswith("réponse 😀")  # first verdict, not "second"
    assert req0["attempts"] == 2 and req0["input_tokens"] == 10 + 1000
    assert req0["cost_usd"] == Decimal("0.000012345") + Decimal("0.123456789")
    assert calls0[0]["latency_ms"] == Decimal("12.346") and calls0[1]["latency_ms"] == Decimal("8.125")
    req1, calls1 = raw[1]
    assert req1["status"] == "failed" and req1["result"] is None and req1["served_mode"] is not None
    assert "\x00" not in req1["error"] and calls1[0]["error"].startswith("überlastet ☃")
    assert calls1[0]["cost_usd"] == Decimal("0.000012345") and calls1[1]["finished_at"] is None
    with db.connect() as conn:
        assert conn.execute(select(ApiCall.id).where(ApiCall.request_id.in_(raw_ids))).all().__len__() == 12


def test_an_enqueue_failed_row_is_finished_and_a_finished_one_is_not(client, db, sets_from):
    ids = _submit(client, 3, "guard")
    with db.begin() as conn:
        conn.execute(Request.__table__.update().where(Request.id == ids[0]).values(
            status="failed", failure_reason=str(FailureReason.ENQUEUE_FAILED), started_at=None))
        conn.execute(Request.__table__.update().where(Request.id == ids[1]).values(
            status="failed", failure_reason=str(FailureReason.ENQUEUE_FAILED), started_at=T0))
        conn.execute(Request.__table__.update().where(Request.id == ids[2]).values(status="cancelled"))
    writer = GroupCommitWriter(engine=db, notifier=None)
    try:
        writer.finish_many([([], _finish(rid, 0), None) for rid in ids])
    finally:
        writer.close()
    with db.connect() as conn:
        got = dict(conn.execute(select(Request.id, Request.status).where(Request.id.in_(ids))).all())
    assert [got[r] for r in ids] == ["succeeded", "failed", "cancelled"]


def test_the_loader_reads_what_the_orm_read(client, db):
    ids = _submit(client, 3, "load")
    bare = client.submit(role="researcher", prompt="bare").id
    loader = RequestLoader(engine=db, linger_ms=0.5)
    try:
        rows = {rid: loader.get(rid) for rid in [*ids, bare, "no-such-request"]}
    finally:
        loader.close()
    assert rows["no-such-request"] is None
    from workers.loader import _COLUMNS, RequestRow
    with db.connect() as conn:
        for rid in [*ids, bare]:
            orm = RequestRow(**conn.execute(select(*_COLUMNS).where(Request.id == rid)).one()._asdict())
            assert rows[rid] == orm
    assert rows[ids[1]].metadata == {"k": "v☃", "n": "1"} and rows[ids[1]].stop == ["END", "Ω"]


def test_rows_the_database_refuses_in_a_pipelined_commit_fail_only_their_own_requests(client, db):
    """The four steps go out in one pipeline, whose errors surface at its sync, outside SQLAlchemy's
    execute: they must still be told permanent (isolate the entry) from transient (retry the batch).
    A NUL in an answer (refused by the driver), a lone surrogate (the driver cannot encode it) and
    an attempt row of a request that does not exist (refused by the server's foreign key) sit in
    one batch with three good entries."""
    ids = _submit(client, 6, "refused")
    items = [(_attempts(rid, i, "refused"), _finish(rid, 0), None) for i, rid in enumerate(ids)]
    items[1] = (items[1][0], _finish(ids[1], 0).replace(result="nul \x00 here"), None)
    items[3] = (items[3][0], _finish(ids[3], 0).replace(result="lone \ud800 surrogate"), None)
    items[4] = ([a.replace(request_id="no-such-request") for a in items[4][0]], items[4][1], None)
    writer = GroupCommitWriter(engine=db, notifier=None, linger_ms=50)
    try:
        writer.finish_many(items)
        assert writer.isolated == 3
    finally:
        writer.close()
    with db.connect() as conn:
        got = {r.id: (r.status, r.failure_reason, r.attempts)
               for r in conn.execute(select(Request.id, Request.status, Request.failure_reason, Request.attempts)
                                     .where(Request.id.in_(ids)))}
    ok, refused = ("succeeded", None, 2), ("failed", "unwritable", 2)
    assert [got[r] for r in ids] == [ok, refused, ok, refused, ("failed", "unwritable", 0), ok]


@pytest.mark.parametrize("commit", [False, True], ids=["in-a-transaction", "whole-transaction"])
def test_a_connection_broken_under_a_pipelined_commit_is_invalidated_and_the_error_is_transient(db, commit):
    from sqlalchemy import exc as sa_exc

    from tars_tasks.db.errors import is_transient
    from workers import pgsql

    with db.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.rollback()  # nothing of the next transaction sent yet: commit=True makes it one pipeline
        with db.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(sa_exc.DBAPIError) as info:
            pgsql.write_batch(conn, ids=["some-request"], api_rows=[], finishes=[], commit=commit)
        assert info.value.connection_invalidated and conn.invalidated
        assert is_transient(info.value)
    with db.connect() as conn:  # the pool hands out a working connection next
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1


def test_the_job_hook_is_asked_only_about_requests_that_may_be_job_steps(client, db):
    """A finish known to be no job's step (its row has no step metadata) is not looked up among
    the steps; one known to be a step, or not known either way, is."""
    ids = _submit(client, 4, "hook")
    asked: list[list[str]] = []
    writer = GroupCommitWriter(engine=db, notifier=None, linger_ms=50,
                               on_finished=lambda conn, finished: asked.append(sorted(finished)))
    try:
        writer.finish_many([([], _finish(ids[0], 0).replace(job_step=False), None),
                            ([], _finish(ids[1], 0).replace(job_step=True), None),
                            ([], _finish(ids[2], 0), None)])
        writer.finish_many([([], _finish(ids[3], 0).replace(job_step=False), None)])
    finally:
        writer.close()
    assert asked == [sorted([ids[1], ids[2]])]  # the second batch: no step, no lookup


def _round_trips(raw, fn) -> tuple[list[str], int]:
    """The protocol messages ``fn`` sends on ``raw`` (libpq's trace), and how many times the
    server said it was ready for the next query (one per round trip)."""
    import tempfile

    from psycopg import pq

    with tempfile.TemporaryFile("w+") as fh:
        raw.pgconn.trace(fh.fileno())
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            fn()
        finally:
            raw.pgconn.untrace()
        fh.seek(0)
        lines = fh.read().splitlines()
    sent = [ln.split("\t")[2].split()[0] for ln in lines if ln.startswith("F\t")]
    return sent, sum(1 for ln in lines if ln.startswith("B\t") and "ReadyForQuery" in ln)


def _batch(client, tag: str, n: int = 3):
    from workers.writer import _finish_row

    ids = _submit(client, n, tag)
    api_rows = [a.columns() for i, rid in enumerate(ids) for a in _attempts(rid, i, tag)]
    return sorted(ids), api_rows, [_finish_row(_finish(rid, 0)) for rid in ids]


def _statuses(db, ids) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(select(Request.id, Request.status).where(Request.id.in_(ids))).all())


@pytest.mark.parametrize("sets", [False, True], ids=["rows", "sets"])
def test_a_group_commit_with_nothing_else_in_its_transaction_is_one_round_trip(client, db, sets, monkeypatch):
    """BEGIN, the steps and COMMIT in one pipeline: one Sync, no simple query (psycopg's own BEGIN
    and SQLAlchemy's COMMIT are one each), one ReadyForQuery. Committed when write_batch returns,
    and the connection is transactional again after it. With something still to run in the
    transaction (the job hook), the steps are in the transaction and nothing is committed."""
    monkeypatch.setattr(pgsql, "SETS_FROM", 1 if sets else 1 << 30)
    ids, api_rows, finishes = _batch(client, f"one-trip-{sets}")
    with db.connect() as conn:
        raw = conn.connection.driver_connection
        with conn.begin():
            sent, trips = _round_trips(raw, lambda: pgsql.write_batch(conn, ids=ids, api_rows=api_rows,
                                                                       finishes=finishes, commit=True))
            assert (sent.count("Sync"), sent.count("Query"), trips) == (1, 0, 1), sent
            assert set(_statuses(db, ids).values()) == {"succeeded"}  # seen from another connection
        assert not raw.autocommit
    ids, api_rows, finishes = _batch(client, f"in-tx-{sets}")
    with db.connect() as conn:
        raw = conn.connection.driver_connection
        tx = conn.begin()
        sent, trips = _round_trips(raw, lambda: pgsql.write_batch(conn, ids=ids, api_rows=api_rows,
                                                                   finishes=finishes, commit=False))
        assert trips == 2 and "Query" not in sent, sent  # psycopg's BEGIN, then the steps; no COMMIT
        assert set(_statuses(db, ids).values()) == {"queued"}
        tx.rollback()
    assert set(_statuses(db, ids).values()) == {"queued"}


def test_a_refused_whole_transaction_leaves_nothing_and_the_connection_transactional(client, db):
    """An attempt of a request that does not exist (the foreign key refuses it) in a one-pipeline
    transaction: nothing of the batch is written, the error is SQLAlchemy's IntegrityError, the
    connection lives (not invalidated, out of autocommit, no transaction open), and what runs on
    it next is a transaction again: rolled back, it leaves nothing (in autocommit it would stay)."""
    from sqlalchemy import exc as sa_exc

    from tars_tasks.db.errors import is_transient

    ids, api_rows, finishes = _batch(client, "refused-whole")
    bad = [*api_rows, {**api_rows[0], "id": "refused-whole-x", "request_id": "no-such-request"}]
    with db.connect() as conn:
        raw = conn.connection.driver_connection
        with pytest.raises(sa_exc.IntegrityError) as info, conn.begin():
            pgsql.write_batch(conn, ids=ids, api_rows=bad, finishes=finishes, commit=True)
        assert not is_transient(info.value) and not conn.invalidated and not info.value.connection_invalidated
        assert not raw.autocommit and raw.info.transaction_status == psycopg_idle()
        assert set(_statuses(db, ids).values()) == {"queued"}
        with conn.begin() as tx:
            pgsql.write_batch(conn, ids=ids, api_rows=api_rows, finishes=finishes, commit=False)
            tx.rollback()
        assert set(_statuses(db, ids).values()) == {"queued"}
        with conn.begin():
            pgsql.write_batch(conn, ids=ids, api_rows=api_rows, finishes=finishes, commit=True)
    assert set(_statuses(db, ids).values()) == {"succeeded"}


def psycopg_idle():
    from psycopg import pq

    return pq.TransactionStatus.IDLE


def test_the_loaders_read_is_one_round_trip_and_leaves_the_connection_transactional(client, db):
    """The loader's statement outside a transaction (psycopg's BEGIN and the ROLLBACK after were
    two round trips more); inside one already begun it stays in it."""
    from tars_tasks.db.held import HeldConnection

    ids, _, _ = _batch(client, "load-trip", n=2)
    held = HeldConnection(db)
    try:
        with held.connect() as conn:
            raw = conn.connection.driver_connection
            got: list = []
            sent, trips = _round_trips(raw, lambda: got.extend(pgsql.load_requests(conn, ids)))
            assert sorted(r[0] for r in got) == ids and trips == 1 and "Query" not in sent, sent
            assert not raw.autocommit
        with held.connect() as conn:  # the held connection again, now in a transaction of its own
            conn.exec_driver_sql("SELECT 1")
            sent, trips = _round_trips(raw, lambda: pgsql.load_requests(conn, ids))
            assert trips == 1 and raw.info.transaction_status != psycopg_idle()
    finally:
        held.release()
