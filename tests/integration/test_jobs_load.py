"""200 concurrent jobs from two producer processes on three real workers: every job terminal exactly once."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from tests.helpers import start_producer_script
from tests.integration.test_jobs_faults import _check_books, _ended_lines

pytestmark = pytest.mark.integration

PRODUCER = """
import json, sys
from tars_tasks.client import TarsClient
tag, n = sys.argv[1], int(sys.argv[2])
with TarsClient() as c:
    hs = [c.submit_job(template="research-write-validate", idempotency_key=f"{tag}-{i}", tenant=f"t{i % 3}",
                       priority=i % 10, input={"question": f"{tag} {i}", "topics": ["a", "b", "c"][: 1 + i % 3],
                       "reviewer_notes": ['<<sim-answer:{"valid": false}>>'] if i % 4 == 0 else []})
          for i in range(n)]
    jobs = [c.wait_job(h.id, timeout=240) for h in hs]
    print(json.dumps({"ids": [h.id for h in hs], "statuses": sorted({j.status for j in jobs})}))
"""


def test_two_hundred_concurrent_jobs_from_two_producers_each_end_exactly_once(fleet_env, start_worker, db):
    workers = [start_worker(tiers=[tier], concurrency=100) for tier in ("haiku", "sonnet")]
    workers.append(start_worker(tiers=["haiku", "sonnet"], concurrency=100))
    procs = [start_producer_script(PRODUCER, fleet_env, args=[tag, "100"]) for tag in ("p1", "p2")]
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = [i for out, _ in outs for i in json.loads(out)["ids"]]
    assert len(set(ids)) == 200
    assert [json.loads(out)["statuses"] for out, _ in outs] == [["succeeded"], ["succeeded"]]
    with db.connect() as conn:
        assert dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY 1")).all()) == {"succeeded": 200}
        assert conn.execute(text("SELECT count(*) FROM jobs WHERE finished_at IS NULL OR result IS NULL")).scalar() == 0
        # 1-3 researchers, a writer, a validator, and a revision for every fourth job
        expected = sum((1 + i % 3) + 2 + (2 if i % 4 == 0 else 0) for i in range(100)) * 2
        assert conn.execute(text("SELECT count(*) FROM job_steps")).scalar() == expected
    _check_books(db)
    ended = _ended_lines(workers)
    assert set(ended) == set(ids) and set(ended.values()) == {1}  # every job ended once, by one worker
