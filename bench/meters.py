"""CPU and memory meters for the benchmarks: CPU seconds per process group between two points,
resident memory of worker processes, and a least-squares slope.

Process groups are given as functions returning pids, read at the start and at the end: a
process present at both ends counts its CPU delta, one that appeared in between (a Postgres
backend opened during the run) counts all its CPU. A process that ended in between is lost
(its CPU is not counted); the benchmarks keep their processes alive for the whole interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


def _cpu(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return t.user + t.system


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a worker's pool children, if any)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class CpuMeter:
    groups: dict[str, Callable[[], list[int]]]
    _start: dict[str, dict[int, float]] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        self._start = {name: {pid: c for pid in pids() if (c := _cpu(pid)) is not None}
                       for name, pids in self.groups.items()}
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds (user + system) each group used since :meth:`start`."""
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            before = self._start.get(name, {})
            total = 0.0
            for pid in pids():
                now = _cpu(pid)
                if now is not None:
                    total += now - before.get(pid, 0.0)
            out[name] = total
        return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def redis_pid(client) -> int | None:
    try:
        return int(client.info("server")["process_id"])
    except Exception:
        return None


def postgres_backends(dsn: str, database: str) -> Callable[[], list[int]]:
    """A pid reader for the Postgres server processes serving ``database`` right now."""
    import psycopg

    def read() -> list[int]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,))]

    return read
