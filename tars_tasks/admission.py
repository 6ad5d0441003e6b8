"""Admission control and graceful degradation, decided by the coordinator before a write.

The mode is the **fleet's** (:mod:`tars_tasks.fleetmode`: one mode in Redis for every producer,
decided with hysteresis from queue depths — waiting messages, queued or staged for dispatch, over
``max_queue_depth`` —, limiter backlog and breaker states, every transition a ``mode_changes``
row). What each mode does to a request:

* ``optimal`` — requests go where routing sends them;
* ``high_load`` — requests below high priority (9) move from sonnet/opus to the tier's cheaper
  ``fallback`` tier (sonnet → haiku, opus → sonnet); the row keeps the tier that was asked for
  (``tier_requested``) and the one it was queued for (``tier_queued``);
* ``critical`` — as high load, requests are answered from the response cache where it can (the
  cheaper tier's answer too; a moved request, the answer of the tier it asked for too), and
  low-priority requests (< normal) that the cache cannot answer are refused (the coordinator
  raises after its cache lookup, before any write);
* full — a tier at ``max_queue_depth`` refuses everything, so queues stay bounded (per tier).

Refusals raise :class:`~tars_tasks.errors.Overloaded` with a ``retry_after_s`` hint, before
anything is recorded or queued. The embedded fleet (no Redis) always runs ``optimal``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from config.catalog import Catalog
from config.keys import TIERS
from config.settings import Settings
from tars_tasks.errors import Overloaded

PRIORITY_HIGH = 9
PRIORITY_NORMAL = 5
#: What a refused producer is told to wait before trying again.
RETRY_AFTER_S = 1.0
#: The tiers high load and critical mode move below-high-priority work away from.
DEGRADABLE_TIERS: tuple[str, ...] = ("sonnet", "opus")


class Mode(StrEnum):
    OPTIMAL = "optimal"
    HIGH_LOAD = "high_load"
    CRITICAL = "critical"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Decision:
    tier: str
    mode: Mode
    degraded_from: str | None = None
    #: Critical mode, low priority: admitted only if the response cache answers it.
    cache_or_refuse: bool = False


def mode_for(load: float, *, settings: Settings) -> Mode:
    if load >= 1.0:
        return Mode.FULL
    if load >= settings.degrade_critical_at:
        return Mode.CRITICAL
    if load >= settings.degrade_high_load_at:
        return Mode.HIGH_LOAD
    return Mode.OPTIMAL


class QueueDepthGauge:
    """Queued messages per tier, read from Redis at most every ``interval_s`` (one pipeline)."""

    def __init__(self, *, read_depths: Callable[[], dict[str, int]], interval_s: float) -> None:
        self._read = read_depths
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._depths: dict[str, int] = {t: 0 for t in TIERS}

    def depths(self) -> dict[str, int]:
        now = time.monotonic()
        with self._lock:
            if now - self._at >= self._interval_s:
                self._depths = self._read()
                self._at = now
            return dict(self._depths)

    def add(self, tier: str, n: int) -> None:
        """Count what this producer just queued until the next sample sees it."""
        with self._lock:
            self._depths[tier] = self._depths.get(tier, 0) + n


def redis_depth_reader(settings: Settings) -> Callable[[], dict[str, int]]:
    from tars_tasks.broker.depths import waiting_by_tier

    def read() -> dict[str, int]:
        return waiting_by_tier(settings, timeout_s=settings.client_timeout_s)  # queued + staged

    return read


class Admission:
    def __init__(self, *, settings: Settings, catalog: Catalog, gauge: QueueDepthGauge | None,
                 mode: Callable[[], Mode] | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.gauge = gauge if settings.max_queue_depth > 0 else None
        #: The fleet's mode now (None: always optimal, the embedded fleet).
        self.mode = mode
        self.mode_source: Any = None

    @classmethod
    def for_settings(cls, *, settings: Settings, catalog: Catalog, engine: Any = None) -> Admission:
        from tars_tasks.fleetmode import FleetModeSource

        gauge = None
        if settings.broker_redis_url and settings.max_queue_depth > 0:
            gauge = QueueDepthGauge(read_depths=redis_depth_reader(settings),
                                    interval_s=settings.admission_sample_interval_ms / 1000)
        source = FleetModeSource.for_settings(settings=settings, catalog=catalog, engine=engine)
        mode = (lambda: Mode(source.current().mode)) if source is not None else None
        adm = cls(settings=settings, catalog=catalog, gauge=gauge, mode=mode)
        adm.mode_source = source
        return adm

    def fleet_mode(self) -> Mode:
        return self.mode() if self.mode is not None else Mode.OPTIMAL

    def decide_many(self, requests: list[tuple[str, int]]) -> list[Decision]:
        """Decide (tier, priority) pairs of one submit call under the fleet's mode; refuse the call
        if a tier is full. Low priority in critical mode is marked ``cache_or_refuse``."""
        mode = self.fleet_mode()
        depths = self.gauge.depths() if self.gauge is not None else {}
        pending = dict.fromkeys(TIERS, 0)
        limit = self.settings.max_queue_depth
        out = []
        for tier, priority in requests:
            chosen, degraded_from = tier, None
            if mode is not Mode.OPTIMAL and priority < PRIORITY_HIGH and tier in DEGRADABLE_TIERS:
                fallback = self.catalog.spec(tier).fallback
                if fallback:
                    chosen, degraded_from = fallback, tier
            if self.gauge is not None and depths.get(chosen, 0) + pending[chosen] >= limit:
                raise Overloaded(
                    f"tier {chosen!r} is full ({depths.get(chosen, 0) + pending[chosen]} queued, "
                    f"limit {limit}); retry in {RETRY_AFTER_S:.0f}s",
                    retry_after_s=RETRY_AFTER_S,
                )
            pending[chosen] += 1
            out.append(Decision(tier=chosen, mode=mode, degraded_from=degraded_from,
                                cache_or_refuse=mode is Mode.CRITICAL and priority < PRIORITY_NORMAL))
        return out

    def admitted(self, decisions: list[Decision]) -> None:
        if self.gauge is None:
            return
        for tier in TIERS:
            n = sum(1 for d in decisions if d.tier == tier)
            if n:
                self.gauge.add(tier, n)
