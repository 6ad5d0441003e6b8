"""Arrival schedules for the open loop, made in advance and independent of the fleet.

A schedule is an increasing array of offsets in seconds from the start of the load phase.
It is fixed before the first request is sent, so nothing the fleet does (a stall, a slow
reply) can change when a request *should* have been sent: latency is measured from these
intended times, which is what keeps coordinated omission out of the figures.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from tars_tasks.errors import LoadgenError

Arrival = Literal["constant", "poisson"]


def make_schedule(
    *, rate_per_s: float, arrival: Arrival = "constant", duration_s: float | None = None,
    count: int | None = None, seed: int = 0,
) -> np.ndarray:
    """Offsets (s) of every arrival: ``rate_per_s`` on average, bounded by ``duration_s`` or ``count``.

    ``constant`` spaces arrivals exactly ``1/rate`` apart; ``poisson`` draws exponential gaps
    from a generator seeded with ``seed`` (same seed, same schedule).
    """
    if rate_per_s <= 0:
        raise LoadgenError(f"arrival rate must be positive, got {rate_per_s}")
    if (duration_s is None) == (count is None):
        raise LoadgenError("an open-loop schedule needs exactly one of duration_s or count")
    n = count if count is not None else max(1, int(np.ceil(rate_per_s * float(duration_s))) + 1)
    if arrival == "constant":
        offsets = np.arange(n, dtype=np.float64) / rate_per_s
    elif arrival == "poisson":
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / rate_per_s, size=n)
        gaps[0] = 0.0
        offsets = np.cumsum(gaps)
    else:
        raise LoadgenError(f"unknown arrival process {arrival!r}: use constant or poisson")
    if duration_s is not None:
        offsets = offsets[offsets < duration_s]
    return offsets
