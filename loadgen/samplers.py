"""Worker memory and CPU, sampled with psutil while a run is in progress.

A sample is (t, pid, rss bytes, cpu %) for every process of every worker (children included:
a prefork pool's processes count). For the embedded fleet the workers are threads of this
process, so the process itself is sampled — and the figure then includes the generator.

:func:`summarise` turns the samples into peak / average RSS, CPU, growth per minute after
warm-up (least-squares slope of the fleet's total RSS) with a 95% interval, and a leak
indicator read from that interval: *growing* if even its lower end exceeds the threshold,
*flat* if its upper end is below it, *inconclusive* otherwise.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

DEFAULT_INTERVAL_S = 0.5
LEAK_THRESHOLD_MIB_PER_MIN = 1.0
#: Below this much steady sampling the leak indicator stays "inconclusive" whatever the slope:
#: start-up allocation dominates short runs.
LEAK_MIN_SPAN_S = 20.0
_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # epoch s
    pid: int
    rss: int
    cpu_percent: float


class ResourceSampler:
    """``with ResourceSampler(pids=lambda: [...]):`` samples in a daemon thread until exit."""

    def __init__(self, *, pids: Callable[[], Sequence[int]], interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.clock = clock
        self.samples: list[Sample] = []
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadgen-sampler", daemon=True)

    def _processes(self) -> list[psutil.Process]:
        procs: list[psutil.Process] = []
        for pid in self.pids():
            try:
                root = self._procs.get(pid) or psutil.Process(pid)
                self._procs.setdefault(pid, root)
                procs.append(root)
                for child in root.children(recursive=True):
                    procs.append(self._procs.setdefault(child.pid, child))
            except psutil.Error:
                continue
        return procs

    def sample_once(self) -> None:
        t = self.clock()
        for p in self._processes():
            try:
                with p.oneshot():
                    self.samples.append(Sample(t=t, pid=p.pid, rss=p.memory_info().rss,
                                               cpu_percent=p.cpu_percent(interval=None)))
            except psutil.Error:
                continue

    def _run(self) -> None:
        for p in self._processes():  # prime cpu_percent: the first reading of a process is 0
            try:
                p.cpu_percent(interval=None)
            except psutil.Error:
                pass
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def start(self) -> ResourceSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return self.samples

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def this_process() -> list[int]:
    return [os.getpid()]


def totals(samples: Sequence[Sample]) -> list[tuple[float, float, float]]:
    """(t, total RSS MiB, total CPU %) per sampling instant, summed over processes."""
    by_t: dict[float, list[Sample]] = defaultdict(list)
    for s in samples:
        by_t[s.t].append(s)
    return [(t, sum(s.rss for s in ss) / _MIB, sum(s.cpu_percent for s in ss)) for t, ss in sorted(by_t.items())]


def slope_per_min(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares slope (units per minute) and its standard error, or None for < 3 points."""
    n = len(points)
    if n < 3:
        return None
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx <= 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    resid = sum((p[1] - (my + b * (p[0] - mx))) ** 2 for p in points)
    se = math.sqrt(resid / (n - 2) / sxx)
    return b * 60.0, se * 60.0


def summarise(samples: Sequence[Sample], *, after: float, processes: str,
              threshold_mib_per_min: float = LEAK_THRESHOLD_MIB_PER_MIN) -> dict[str, Any]:
    """Memory and CPU figures; growth and leak use only samples taken at or after ``after``."""
    tot = totals(samples)
    if not tot:
        return {"sampled": False, "processes": processes, "samples": 0}
    rss = [m for _, m, _ in tot]
    cpu = [c for _, _, c in tot]
    per_pid: dict[int, float] = defaultdict(float)
    for s in samples:
        per_pid[s.pid] = max(per_pid[s.pid], s.rss / _MIB)
    steady = [(t, m) for t, m, _ in tot if t >= after]
    fit = slope_per_min(steady)
    leak = "inconclusive"
    growth = ci = None
    span = (steady[-1][0] - steady[0][0]) if len(steady) > 1 else 0.0
    if fit is not None:
        growth, se = fit
        ci = (growth - 1.96 * se, growth + 1.96 * se)
        if span < LEAK_MIN_SPAN_S:
            pass
        elif ci[0] > threshold_mib_per_min:
            leak = "growing"
        elif ci[1] < threshold_mib_per_min:
            leak = "flat"
    return {
        "sampled": True, "processes": processes, "samples": len(tot), "pids": len(per_pid),
        "interval_s": (tot[-1][0] - tot[0][0]) / (len(tot) - 1) if len(tot) > 1 else None,
        "rss_peak_mib": max(rss), "rss_avg_mib": sum(rss) / len(rss), "rss_first_mib": rss[0], "rss_last_mib": rss[-1],
        "rss_peak_per_process_mib": max(per_pid.values()),
        "cpu_avg_percent": sum(cpu) / len(cpu), "cpu_peak_percent": max(cpu),
        "growth_mib_per_min": growth, "growth_ci95_mib_per_min": ci, "steady_span_s": span,
        "leak": leak, "leak_threshold_mib_per_min": threshold_mib_per_min, "leak_min_span_s": LEAK_MIN_SPAN_S,
        "series": [[round(t, 3), round(m, 3), round(c, 1)] for t, m, c in tot],
    }
