"""Dollars per request, interactive lane vs batch lane, for the same requests (issue 11).

    .venv/bin/python bench/bench_batch_lane.py --n 200 --redis-url redis://127.0.0.1:6384/5

Everything on 127.0.0.1: the mock provider (``tars mock-llm``, fixed output length so both lanes
get the same token counts), one ``tars worker`` for the interactive lane, one ``tars batch-runner``,
the project's own catalog (``config/models.toml``: list prices, ``batch_multiplier`` 0.5) with every
tier pointed at the mock's Anthropic API. The same N prompts (per tier: haiku, sonnet) are submitted
once interactive and once with ``lane="batch"``; the figures are read back from ``api_calls`` (what a
provider would bill) and the mock's counters (what it answered). Bounded: N requests per lane, one
batch per tier, a deadline of ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgdb import fresh_db  # noqa: E402

DB_NAME = "tars_bench_batch"


def _fresh_db() -> str:
    return fresh_db(DB_NAME)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="requests per lane (split over haiku and sonnet)")
    ap.add_argument("--redis-url", required=True, help="a Redis database of your own, e.g. redis://127.0.0.1:6384/5")
    ap.add_argument("--timeout-s", type=float, default=300.0)
    args = ap.parse_args()
    for k in [k for k in os.environ if k.startswith("TARS_")]:
        del os.environ[k]

    import redis as redis_lib
    from sqlalchemy import text

    from tars_tasks import supervisor
    from tars_tasks.client import TarsClient
    from tars_tasks.db.engine import get_engine
    from tests.helpers import make_settings
    from tests.integration.model_calls_support import FAKE_ANTHROPIC_KEY, start_mock
    from workers.start import worker_argv

    redis_lib.Redis.from_url(args.redis_url).flushdb()
    db_url = _fresh_db()
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    mock = start_mock(tmp, "--latency", "fixed:20", "--output-tokens", "200:200", "--config-json",
                      '{"batch_delay_s": 2.0}')
    env = {"TARS_BROKER_URL": args.redis_url, "TARS_DATABASE_URL": db_url,
           "TARS_NAMESPACE": f"bb{uuid.uuid4().hex[:6]}", "TARS_TASK_EVENTS": "false",
           "TARS_PROVIDER_OVERRIDE": "anthropic", "TARS_PROVIDER_BASE_URL": mock.url,
           "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "TARS_BATCH_MAX_AGE_S": "1", "TARS_BATCH_POLL_INTERVAL_S": "0.5",
           "TARS_BATCH_MAX_REQUESTS": str(max(1, args.n))}
    full_env = {**os.environ, **env}
    argv = worker_argv(tiers=["haiku", "sonnet"], concurrency=50, pool="gevent", name="bench@batch", loglevel="INFO",
                       events=False)
    argv[0] = sys.executable
    procs = [supervisor.start(argv, cwd=ROOT, env=full_env, log_path=tmp / "worker.log"),
             supervisor.start([sys.executable, "-m", "tars_tasks.cli", "batch-runner"], cwd=ROOT, env=full_env,
                              log_path=tmp / "runner.log")]
    try:
        prompts = [("researcher" if i % 2 == 0 else "engineer",
                    f"Summarise report {i}: which figures follow from the rows, which do not, and why?")
                   for i in range(args.n)]
        lanes: dict[str, list[str]] = {}
        with TarsClient(settings=make_settings(env)) as client:
            t0 = time.monotonic()
            for lane in ("interactive", "batch"):
                lanes[lane] = [h.id for h in client.submit_many(
                    [{"role": r, "prompt": p, "lane": lane, "temperature": 0} for r, p in prompts])]
            results = client.wait_many([i for ids in lanes.values() for i in ids], timeout=args.timeout_s)
            wall = time.monotonic() - t0
        bad = [r for r in results if r.status != "succeeded"]
        engine = get_engine(db_url)
        print(f"bench_batch_lane: n={args.n} per lane, wall {wall:.1f} s, not succeeded: {len(bad)}")
        print("| lane | requests | api calls | input tokens | output tokens | cost (USD) | USD per request |")
        print("|---|---|---|---|---|---|---|")
        cost: dict[str, Decimal] = {}
        with engine.connect() as conn:
            for lane, ids in lanes.items():
                row = conn.execute(text(
                    "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
                    "coalesce(sum(cost_usd), 0) FROM api_calls WHERE request_id = ANY(:ids)"), {"ids": ids}).one()
                cost[lane] = Decimal(row[3])
                print(f"| {lane} | {len(ids)} | {row[0]} | {row[1]:,} | {row[2]:,} | {cost[lane]:.6f} | "
                      f"{cost[lane] / len(ids):.8f} |")
            batches = conn.execute(text("SELECT tier, request_count, state FROM provider_batches ORDER BY tier")).all()
        saved = cost["interactive"] - cost["batch"]
        ratio = cost["batch"] / cost["interactive"] if cost["interactive"] else Decimal(0)
        print(f"saved by the batch lane: ${saved:.6f} ({(1 - ratio) * 100:.1f}% of the interactive cost); "
              f"batch / interactive = {ratio:.4f}")
        print(f"provider batches: {[tuple(b) for b in batches]}")
        total = mock.stats()["models"]
        print("mock answered (requests, of which batched): "
              + ", ".join(f"{m} {t['total'].get('requests', 0)}/{t['total'].get('batched', 0)}"
                          for m, t in sorted(total.items()) if not m.startswith("_")))
        return 0 if not bad else 1
    finally:
        supervisor.stop(procs, grace_s=10)
        mock.proc.terminate()
        mock.proc.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
