"""Retry policy for model calls (tenacity): exponential backoff with full jitter,
``Retry-After`` honoured, transient errors only, capped by attempts and total time."""

from __future__ import annotations

import time
from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from config.catalog import ModelSpec
from tars_tasks.errors import ProviderError

BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 20.0
#: A server's Retry-After is honoured up to this; longer is treated as this (the retry budget
#: then decides whether another attempt fits at all).
RETRY_AFTER_MAX_S = 120.0


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


class wait_backoff_or_retry_after:
    """Full-jitter exponential backoff, but never less than the server's ``Retry-After``."""

    def __init__(self, *, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S) -> None:
        self._jitter = wait_random_exponential(multiplier=initial_s, max=max_s)
        self._max_s = max_s

    def __call__(self, state: RetryCallState) -> float:
        delay = self._jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after:
            delay = max(delay, min(float(retry_after), RETRY_AFTER_MAX_S))
        return delay


def retrying_for(
    spec: ModelSpec,
    *,
    sleep: Callable[[float], None] = time.sleep,
    initial_s: float = BACKOFF_INITIAL_S,
    max_s: float = BACKOFF_MAX_S,
) -> Retrying:
    """Attempts for one tier. Stops at ``max_attempts``, or *before* a backoff sleep that would
    end past ``retry_budget_s`` (no sleeping into a retry that the budget then forbids)."""
    return Retrying(
        stop=stop_after_attempt(spec.max_attempts) | stop_before_delay(spec.retry_budget_s),
        wait=wait_backoff_or_retry_after(initial_s=initial_s, max_s=max_s),
        retry=retry_if_exception(is_retryable),
        sleep=sleep,
        reraise=True,
    )
