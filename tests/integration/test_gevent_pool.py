"""``-P gevent`` runs Celery's gevent pool without its reference cycle per task
(tars_tasks/broker/gevent_pool.py).

Celery binds every task greenlet's ``terminate`` to the greenlet itself, so a finished task's
greenlet (its frames, Context, greenlet-locals, the task's arguments) waits for a full collection
of the cyclic collector. The first test runs both pools in a real gevent process with the
collector off and counts what refcounting alone left behind: Celery's pool leaves every task's
greenlet (the test of the fix would fail on it), ours none. The second checks that ``revoke
(terminate=True)``'s two calls still work. The third starts a real worker, runs requests through
it and, as the worker exits, counts the greenlets only the cyclic collector would have freed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tars_tasks.client import TarsClient
from tests.helpers import make_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import gc, json, sys
import gevent
from celery.concurrency import gevent as celery_gevent
from tars_tasks.broker.gevent_pool import TaskPool

cls = TaskPool if sys.argv[1] == "tars" else celery_gevent.TaskPool
pool = cls(limit=20)
pool.start()
gc.disable()  # from here on, only refcounting frees anything
done = []
greenlets = [pool.apply_async(lambda i: i, args=(i,), callback=done.append) for i in range(200)]
gevent.joinall(greenlets)
gevent.sleep(0.05)  # the links run (the pool's map drops its entries)
tracked = hasattr(greenlets[0], "spawning_stack") and greenlets[0].spawning_stack is not None
del greenlets
gc.set_debug(gc.DEBUG_SAVEALL)
gc.collect()
left = sum(1 for o in gc.garbage if isinstance(o, gevent.Greenlet))
print(json.dumps({"ran": len(done), "greenlets_left_to_the_collector": left, "tree_tracked": tracked,
                  "pool_map": len(pool._pool_map)}))
"""


def _run(which: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, which], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, check=True, env={k: v for k, v in os.environ.items()
                                                    if k != "GEVENT_TRACK_GREENLET_TREE"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_finished_task_greenlet_is_freed_by_refcounting_only_with_our_pool():
    celery_pool = _run("celery")
    ours = _run("tars")
    assert celery_pool["ran"] == ours["ran"] == 200
    assert celery_pool["pool_map"] == ours["pool_map"] == 0
    # Celery's pool: every task greenlet is in a cycle (greenlet -> bound ``terminate`` -> greenlet)
    assert celery_pool["greenlets_left_to_the_collector"] >= 200, celery_pool
    assert ours["greenlets_left_to_the_collector"] == 0, ours
    assert celery_pool["tree_tracked"] is True and ours["tree_tracked"] is False


TERMINATE = r"""
from gevent import monkey
monkey.patch_all()
import json, signal
import gevent
from tars_tasks.broker.gevent_pool import TaskPool

pool = TaskPool(limit=5)
pool.start()
outcome = []
g = pool.apply_async(lambda: gevent.sleep(30), callback=outcome.append)
gevent.sleep(0.05)
# what celery.worker.request.Request.terminate calls: the greenlet's terminate, then the pool's
first = g.terminate(signal.SIGTERM)
pool.terminate_job(id(g), signal.SIGTERM)
g.join(5)
gevent.sleep(0.05)
print(json.dumps({"terminate_returned": first, "dead": g.dead, "outcome": [list(o) for o in outcome],
                  "pool_map": len(pool._pool_map)}))
"""


def test_terminating_a_running_task_still_works():
    out = subprocess.run([sys.executable, "-c", TERMINATE], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["terminate_returned"] is None
    assert res["dead"] is True
    # the killable target reports (False, None, None) for a killed task, as with Celery's own pool
    assert res["outcome"] == [[False, None, None]]
    assert res["pool_map"] == 0


PROBE = r"""
import atexit, gc, json, os, sys

if "worker" in sys.argv:
    def _count():
        import gevent
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sum(1 for o in gc.garbage if isinstance(o, gevent.Greenlet))
        pool = sys.modules.get("celery.concurrency").get_implementation("gevent")
        with open(os.environ["TARS_TEST_PROBE_OUT"], "w") as f:
            json.dump({"greenlets_left_to_the_collector": left, "pool": f"{pool.__module__}:{pool.__name__}",
                       "tree_tracked": bool(sys.modules["gevent"].config.track_greenlet_tree),
                       "frozen": gc.get_freeze_count()}, f)
    atexit.register(_count)
"""


@pytest.mark.parametrize("freeze", [True, False], ids=["default", "TARS_WORKER_GC_FREEZE=false"])
def test_a_real_worker_leaves_no_task_greenlet_to_the_cyclic_collector(freeze, fleet_env, start_worker, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(textwrap.dedent(PROBE))
    out = tmp_path / "probe.json"
    env = {"PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TARS_TEST_PROBE_OUT": str(out), **({} if freeze else {"TARS_WORKER_GC_FREEZE": "false"})}
    worker = start_worker(tiers=["haiku"], concurrency=20, env=env)
    with TarsClient(settings=make_settings(fleet_env)) as client:
        # one submit each: sixty messages, sixty tasks (a submit_many would make bundles)
        handles = [client.submit(role="researcher", prompt=f"pool {i}") for i in range(60)]
        assert {r.status for r in client.wait_many([h.id for h in handles], timeout=120)} == {"succeeded"}
    assert worker.stop(timeout=30) == 0, worker.log()[-3000:]
    res = json.loads(out.read_text())
    assert res["pool"] == "tars_tasks.broker.gevent_pool:TaskPool"
    assert res["tree_tracked"] is False
    # Celery's own pool left 21 of the sixty task greenlets here (2a1116a; full collections freed
    # the rest meanwhile); ours none. A few others could be: the worker's own loops, killed at
    # shutdown, holding their exception's traceback.
    assert res["greenlets_left_to_the_collector"] < 5, res
    # what the worker started with is frozen out of the collector's full collections, and says so
    frozen_lines = [line for line in worker.log().splitlines() if "frozen out of the collector" in line]
    if freeze:
        assert res["frozen"] > 50_000, res
        assert len(frozen_lines) == 1, frozen_lines
        logged = int(frozen_lines[0].split("gc: ", 1)[1].split(" objects", 1)[0].replace(",", ""))
        assert logged >= res["frozen"], (logged, res)  # frozen objects freed by refcounting since leave the count
    else:
        assert res["frozen"] == 0 and frozen_lines == [], (res, frozen_lines)
