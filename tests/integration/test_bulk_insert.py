"""The submit path's insert (tars_tasks/db/bulk.py) against SQLAlchemy's, on the real Postgres.

Rows of random content — unicode text, JSON lists and objects, NULLs, ints past 32,767, floats
given as ints, Decimals given as ints and floats, codes as str enums — inserted both ways leave
the same rows, column for column, read back through the ORM; a row whose (tenant,
idempotency key) exists already is skipped and its id not returned, as ``ON CONFLICT DO NOTHING``
was.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tars_tasks.codes import RequestStatus
from tars_tasks.db.bulk import insert_rows
from tars_tasks.db.models import Request
from tars_tasks.db.upsert import insert_for

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=8)

row = st.fixed_dictionaries({
    "role": st.sampled_from(["researcher", "writer"]),
    "tier_requested": st.sampled_from(["haiku", "sonnet", "opus"]),
    "priority": st.integers(0, 9),
    "prompt": st.none() | text,
    "system": st.none() | text,
    "messages": st.none() | st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": text}), max_size=2),
    "max_tokens": st.none() | st.integers(1, 2**31 - 1),
    "temperature": st.none() | st.floats(0, 2) | st.integers(0, 2),
    "stop": st.none() | st.lists(text, max_size=3),
    "metadata_": st.none() | st.dictionaries(text, text, max_size=3),
    "saved_usd": st.decimals(0, 10, places=9) | st.integers(0, 5) | st.floats(0, 1, allow_nan=False).map(
        lambda f: round(f, 6)),
    "cache_similarity": st.none() | st.floats(0, 1) | st.integers(0, 1),
    "deadline_s": st.none() | st.integers(0, 100_000),
    "status": st.sampled_from([RequestStatus.QUEUED, RequestStatus.SUCCEEDED]),
    "idempotency_key": st.none() | st.sampled_from(["k1", "k2", "k3"]),
})


def _as_columns(r: dict, *, tenant: str) -> dict:
    cols = {("metadata" if k == "metadata_" else k): v for k, v in r.items()}
    return {"id": str(uuid.uuid4()), "tenant": tenant, "tier_queued": r["tier_requested"], "submitted_at": T0,
            "started_at": None, "finished_at": T0 + timedelta(seconds=1), "lane": "interactive",
            "run_id": None, "reply_to": None, "result": "réponse 😀", "answered_by": None, **cols}


def _read(db, ids: list[str]) -> list[dict]:
    skip = {"id", "tenant"}
    with db.connect() as conn:
        by_id = {r.id: r._asdict() for r in conn.execute(select(Request.__table__).where(Request.id.in_(ids)))}
    return [{k: v for k, v in by_id[i].items() if k not in skip} if i in by_id else None for i in ids]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=1, max_size=12))
def test_rows_inserted_as_arrays_read_back_as_sqlalchemy_inserted_them(db, rows):
    ref_tenant, tenant = f"ref-{uuid.uuid4().hex[:8]}", f"arr-{uuid.uuid4().hex[:8]}"
    ref_rows = [_as_columns(r, tenant=ref_tenant) for r in rows]
    arr_rows = [_as_columns(r, tenant=tenant) for r in rows]
    # a key already taken before the call: skipped, as is a key's second row within the call
    taken = {"id": str(uuid.uuid4()), **{k: v for k, v in arr_rows[0].items() if k != "id"}, "idempotency_key": "k3"}
    ref_taken = {**taken, "id": str(uuid.uuid4()), "tenant": ref_tenant}
    seen, ref_keep, arr_keep = set(), [], []
    for ref, arr in zip(ref_rows, arr_rows, strict=True):
        key = arr["idempotency_key"]
        if key is not None and (key in seen or key == "k3"):
            continue
        if key is not None:
            seen.add(key)
        ref_keep.append(ref)
        arr_keep.append(arr)
    with db.begin() as conn:
        stmt = insert_for(conn, Request.__table__)
        conn.execute(stmt, [ref_taken])
        conn.execute(stmt, [taken])
        ref_stmt = stmt.on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"]).returning(
            Request.__table__.c.id)
        ref_created = {r[0] for r in conn.execute(ref_stmt, ref_rows)}
        created = set(insert_rows(conn, Request.__table__, arr_rows,
                                  on_conflict_do_nothing=("tenant", "idempotency_key"), returning="id"))
    assert created == {r["id"] for r in arr_keep}
    assert ref_created == {r["id"] for r in ref_keep}
    assert _read(db, [r["id"] for r in arr_keep]) == _read(db, [r["id"] for r in ref_keep])


def test_a_row_of_the_wrong_shape_is_refused_with_sqlalchemys_error(db):
    from sqlalchemy.exc import IntegrityError

    bad = _as_columns({"role": "researcher", "tier_requested": "haiku", "priority": 5, "status": "queued"},
                      tenant="t")
    bad["run_id"] = "no-such-run"
    with pytest.raises(IntegrityError), db.begin() as conn:
        insert_rows(conn, Request.__table__, [bad], returning="id")


def test_a_submit_records_its_rows_without_a_transaction_round_trip_and_returns_the_connection_as_it_was(
        client, db):
    """The submit's INSERT runs in autocommit: no BEGIN or COMMIT is sent (two round trips of four:
    the pool's ping, BEGIN, INSERT, COMMIT); a submit with an idempotency key seen before still finds
    the first request; and the pooled connection is handed back out of autocommit, so the next
    user of the pool gets a transaction (rolled back, it leaves nothing)."""
    import tempfile

    from psycopg import pq
    from sqlalchemy import event, text

    engine = client.coordinator.engine
    traces: list = []

    def on_checkout(dbapi_conn, _record, _proxy):
        fh = tempfile.TemporaryFile("w+")
        dbapi_conn.pgconn.trace(fh.fileno())
        dbapi_conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        traces.append((dbapi_conn, fh))

    def on_checkin(dbapi_conn, _record):
        assert not dbapi_conn.autocommit, "a connection went back to the pool in autocommit"

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "checkin", on_checkin)
    try:
        first = client.submit(role="researcher", prompt="one trip", idempotency_key="k-trip")
        again = client.submit(role="researcher", prompt="one trip", idempotency_key="k-trip")
    finally:
        event.remove(engine, "checkout", on_checkout)
        for dbapi_conn, _ in traces:
            dbapi_conn.pgconn.untrace()
    event.remove(engine, "checkin", on_checkin)
    assert again.id == first.id
    sent = []
    for _, fh in traces:
        fh.seek(0)
        sent += [ln for ln in fh.read().splitlines() if ln.startswith("F\t")]
        fh.close()
    assert any("INSERT INTO" in ln for ln in sent), sent
    assert not any("BEGIN" in ln or "COMMIT" in ln for ln in sent), sent
    with engine.connect() as conn:  # a pooled connection: in a transaction again
        conn.execute(text("UPDATE requests SET role = 'writer' WHERE id = :i"), {"i": first.id})
        conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(select(Request.role).where(Request.id == first.id)).scalar_one() == "researcher"


PRODUCER = r"""
import json, random, sys, time
from config.settings import get_settings
from tars_tasks.client import TarsClient

seed, start_at, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
keys = [f"race-{i}" for i in range(n)]
random.Random(seed).shuffle(keys)
got = {}
with TarsClient(settings=get_settings()) as client:
    client.submit(role="researcher", prompt="warm", tenant=f"warm-{seed}")  # connections open before the start
    time.sleep(max(0.0, start_at - time.time()))
    for i in range(0, n, 25):
        chunk = keys[i:i + 25]
        subs = client.submit_many([{"role": "researcher", "prompt": k, "idempotency_key": k, "tenant": "race"}
                                   for k in chunk])
        got.update({k: [s.id, s.created] for k, s in zip(chunk, subs)})
print(json.dumps(got))
"""


def test_producers_racing_on_the_same_idempotency_keys_record_each_key_once(fleet_env, db, redis):
    """Four producer processes submit the same 300 keys at once, each in its own order (1,200
    submits, in calls of 25): the INSERT runs in autocommit, so what stops a second row is ON
    CONFLICT alone and what finds the first is the look-up after it. Every key is one row, every
    producer was answered with that row's id, exactly one submit per key says it created it, and
    exactly one message per key is waiting."""
    import json
    import time

    from tests.helpers import start_producer_script, waiting_messages

    n, start_at = 300, time.time() + 4
    kids = [start_producer_script(PRODUCER, fleet_env, args=[str(seed), str(start_at), str(n)]) for seed in range(4)]
    answers = []
    for kid in kids:
        out, err = kid.communicate(timeout=180)
        assert kid.returncode == 0, err[-3000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    with db.connect() as conn:
        rows = dict(conn.execute(select(Request.idempotency_key, Request.id).where(Request.tenant == "race")).all())
    assert len(rows) == n
    for got in answers:
        assert {k: v[0] for k, v in got.items()} == rows
    assert sum(v[1] for got in answers for v in got.values()) == n
    assert waiting_messages(redis, tiers=["haiku"]) == n + 4  # and the four warm-up requests
