"""Fallback to the cheaper tier: while a tier's breaker is open, go on with its ``fallback`` tier
(policy ``fallback``, the default; the request's ``tier_used`` records it). With no fallback left,
or with policy ``wait``, wait for the breaker within the request's retry budget and start over
from the requested tier; the budget spent, the request fails ``circuit_open``."""

from __future__ import annotations

import logging
import time

from tars_tasks.errors import CircuitOpen
from workers.callpath.context import Attempt, Call, GiveUp, Move, UseTier
from workers.callpath.path import CallStep

log = logging.getLogger(__name__)

#: Longest single sleep while waiting for an open breaker.
BREAKER_WAIT_STEP_MAX_S = 5.0
#: Shortest such sleep.
BREAKER_WAIT_STEP_MIN_S = 0.05


class FallbackStep(CallStep):
    def __init__(self, *, policy: str = "fallback") -> None:
        self.policy = policy

    def next_move(self, call: Call, attempt: Attempt, exc: BaseException) -> Move | None:
        if not isinstance(exc, CircuitOpen):
            return None
        spec = attempt.spec
        if self.policy == "fallback" and spec.fallback and spec.fallback not in call.tried:
            log.warning("request %s: %s; falling back from tier %s to %s", call.request_id, exc, spec.tier,
                        spec.fallback)
            return UseTier(spec.fallback)
        wait_s = min(max(exc.retry_after_s or 0.0, BREAKER_WAIT_STEP_MIN_S), BREAKER_WAIT_STEP_MAX_S)
        if time.monotonic() + wait_s >= call.deadline:
            return GiveUp(reason=CircuitOpen.outcome,
                          error=f"{CircuitOpen.outcome}: {exc}; tiers tried: {', '.join(call.tried)}; "
                                f"retry budget {call.requested.retry_budget_s:g}s spent")
        call.sleep(wait_s)
        return UseTier(call.requested.tier, restart=True)  # the requested tier may have recovered
