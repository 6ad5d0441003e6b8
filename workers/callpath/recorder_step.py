"""The attempt recorder: every attempt is written ``in_flight`` (and durable) *before* the call,
and completed after it, whatever happened — so every call a provider could bill has a row, even
if the worker is killed the instant the call goes out. An attempt recorded but never sent (its
rate-limit slot came too late and no new one came in time) is ``not_sent``.

The completed rows go to the database with the request's verdict (:class:`CallOutcome.api_rows`).
"""

from __future__ import annotations

from typing import Protocol

from tars_tasks.codes import AttemptOutcome
from tars_tasks.errors import ProviderError
from workers.callpath.context import ERROR_MAX_CHARS, Attempt, Call, now, record_of
from workers.callpath.path import CallStep
from workers.records import AttemptRecord


class RowSink(Protocol):
    """Where attempt rows go before the call (the group-commit writer); returns once they are durable."""

    def record(self, attempts: list[AttemptRecord]) -> None: ...


class RecorderStep(CallStep):
    def __init__(self, *, writer: RowSink) -> None:
        self.writer = writer

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        self.writer.record([record_of(attempt, request_id=call.request_id)])
        attempt.recorded = True

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        c = attempt.completion
        assert c is not None
        attempt.outcome, attempt.http_status, attempt.finished_at = AttemptOutcome.OK, c.http_status, now()

    def after_attempt_failed(self, call: Call, attempt: Attempt, exc: BaseException) -> None:
        if not attempt.recorded:
            return
        attempt.finished_at = now()
        if not attempt.sent:
            attempt.outcome, attempt.latency_ms = AttemptOutcome.NOT_SENT, 0
            attempt.error_text = f"not sent: {exc}"[:ERROR_MAX_CHARS]
            return
        attempt.outcome = exc.outcome if isinstance(exc, ProviderError) else AttemptOutcome.ERROR
        attempt.http_status = exc.status_code if isinstance(exc, ProviderError) else None
        attempt.error_text = str(exc)[:ERROR_MAX_CHARS]
