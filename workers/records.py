"""The typed records that cross from the call path and the sub-agent to the group-commit writer:
one :class:`AttemptRecord` per ``api_calls`` row, one :class:`FinishRecord` per request verdict.
Only the writer turns them into SQL parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tars_tasks.codes import AttemptOutcome, FailureReason, RequestStatus


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt's ``api_calls`` row: written ``in_flight`` before the call, again when it ended."""

    id: str
    request_id: str
    attempt: int
    tier: str
    provider: str
    model: str
    outcome: AttemptOutcome
    worker: str
    started_at: datetime
    http_status: int | None = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    latency_ms: float | None = None
    ratelimit_wait_ms: float = 0.0
    finished_at: datetime | None = None

    def replace(self, **changes: Any) -> AttemptRecord:
        return dataclasses.replace(self, **changes)

    def columns(self) -> dict[str, Any]:
        """The row's columns (codes as plain strings)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["outcome"] = str(self.outcome)
        return d


@dataclass(frozen=True, slots=True)
class FinishRecord:
    """The verdict on one request, as the writer's finishing UPDATE takes it."""

    request_id: str
    status: RequestStatus
    tier_used: str
    model: str
    worker: str
    started_at: datetime
    result: str | None = None
    error: str | None = None
    failure_reason: FailureReason | None = None
    stop_reason: str | None = None
    finished_at: datetime = field(default_factory=_now)
    #: The fleet mode that moved queued work to a cheaper tier when it ran (None: the row keeps
    #: the mode it was admitted under).
    served_mode: str | None = None
    #: Whether the request may be a job's step (its row has the step metadata); None: not known.
    #: The writer's job hook looks up only requests not known to be none.
    job_step: bool | None = None

    def replace(self, **changes: Any) -> FinishRecord:
        return dataclasses.replace(self, **changes)
