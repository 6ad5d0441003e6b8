"""The retry policy step: tenacity decides, per tier, whether a failed attempt is tried again and
after how long (full-jitter exponential backoff, ``Retry-After`` honoured, transient errors only,
capped by ``max_attempts`` and ``retry_budget_s``: :func:`workers.retry.retrying_for`).

Tenacity's own iterator drives it: a tier's first failed attempt gets a fresh
:class:`tenacity.Retrying` (its clock set back to when the tier started, so the retry budget
counts the first attempt too), each failed attempt is set on its state, and the next iteration
either sleeps (through the call's sleep) and yields another attempt, or re-raises, which here
means "no retry". A tier whose first attempt succeeds never builds one: most calls pay nothing
for the policy.
"""

from __future__ import annotations

import time

from workers.callpath.context import RETRY, Attempt, Call, Move
from workers.callpath.path import CallStep
from workers.retry import BACKOFF_INITIAL_S, BACKOFF_MAX_S, retrying_for


class RetryStep(CallStep):
    def __init__(self, *, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.initial_s = initial_s
        self.max_s = max_s

    def before_tier(self, call: Call) -> None:
        assert call.spec is not None
        state = call.state_of(self)
        state["started"], state["attempts"], state["current"] = time.monotonic(), None, None

    def next_move(self, call: Call, attempt: Attempt, exc: BaseException) -> Move | None:
        state = call.state_of(self)
        if state["attempts"] is None:  # the tier's first failure: its policy starts here
            assert call.spec is not None
            attempts = iter(retrying_for(call.spec, sleep=call.sleep, initial_s=self.initial_s, max_s=self.max_s))
            state["attempts"], state["current"] = attempts, next(attempts)
            state["current"].retry_state.start_time = state["started"]
        current = state["current"]
        if current is None:
            return None
        current.retry_state.set_exception((type(exc), exc, exc.__traceback__))
        try:
            state["current"] = next(state["attempts"])
        except BaseException:  # tenacity re-raised (not retryable, or stopped): no retry from here
            state["current"] = None
            return None
        return RETRY
