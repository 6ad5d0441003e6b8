"""A producer submitting under a run asks Postgres about the run once, not on every call, and a
run deleted after it was found is still refused in one line, with nothing recorded (real Postgres)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import event, func, select, text

from loadgen.store import create_run
from tars_tasks.db.models import Request
from tars_tasks.errors import InvalidRequest

pytestmark = pytest.mark.integration

CALLS = 20


def _count_run_lookups(engine):
    seen = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if "FROM runs" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(engine, "before_cursor_execute", before)


def test_many_calls_under_one_run_look_the_run_up_once(client, db):
    run_id = str(uuid.uuid4())
    create_run(db, run_id=run_id, name="lookups", scenario="test", config={})
    seen, stop = _count_run_lookups(client.coordinator.engine)
    try:
        subs = [client.submit_many([{"role": "researcher", "prompt": f"call {i}"}], run_id=run_id)[0]
                for i in range(CALLS)]
    finally:
        stop()
    assert len(seen) == 1
    with db.connect() as conn:
        n = conn.execute(select(func.count()).select_from(Request.__table__)
                         .where(Request.__table__.c.run_id == run_id)).scalar_one()
    assert n == len({s.id for s in subs}) == CALLS


def test_a_run_deleted_after_it_was_found_is_refused_as_unknown_with_nothing_recorded(client, db):
    run_id = str(uuid.uuid4())
    create_run(db, run_id=run_id, name="deleted", scenario="test", config={})
    client.submit(role="researcher", prompt="before", run_id=run_id)
    with db.begin() as conn:
        conn.execute(text("DELETE FROM runs WHERE id = :r"), {"r": run_id})
    with db.connect() as conn:
        before = conn.execute(select(func.count()).select_from(Request.__table__)).scalar_one()
    for _ in range(2):  # the insert's foreign key answers first; then the look-up, no longer remembered
        with pytest.raises(InvalidRequest, match="unknown run_id") as info:
            client.submit_many([{"role": "researcher", "prompt": "after"}, {"role": "writer", "prompt": "x"}],
                               run_id=run_id)
        assert info.value.field == "run_id" and "\n" not in str(info.value)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Request.__table__)).scalar_one() == before
