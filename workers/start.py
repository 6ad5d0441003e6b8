"""Worker start-up: the one place that knows the Celery command line of a sub-agent pool.

``tars worker``, ``tars fleet up``, the compose file and the tests all start workers
with :func:`worker_argv`, so they cannot drift apart.
"""

from __future__ import annotations

import os
import sys

from config.keys import TIERS, queue_for_tier
from config.settings import get_settings


def worker_argv(
    *,
    tiers: list[str],
    concurrency: int | None = None,
    pool: str | None = None,
    name: str | None = None,
    loglevel: str = "INFO",
    events: bool | None = None,
) -> list[str]:
    """``python -m celery -A tars_tasks worker ...`` for a pool consuming ``tiers``' queues."""
    for tier in tiers:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}: tiers are {', '.join(TIERS)}")
    s = get_settings()
    argv = [
        sys.executable, "-m", "celery", "-A", "tars_tasks", "worker",
        "-Q", ",".join(queue_for_tier(t) for t in tiers),
        "-P", pool or s.worker_pool,
        "-c", str(concurrency or s.worker_concurrency),
        "-n", name or f"{'+'.join(tiers)}.%i@%h",
        "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]
    if events if events is not None else s.task_events:
        argv.append("-E")
    return argv


def exec_worker(**kwargs) -> None:  # pragma: no cover - replaces the process
    argv = worker_argv(**kwargs)
    os.execv(argv[0], argv)
