"""The codes stored in ``requests.status``, ``api_calls.outcome`` and ``requests.failure_reason``:
the one definition every writer and reader compares by (never the error text).

They are :class:`enum.StrEnum`: a member *is* its string (``RequestStatus.FAILED == "failed"``),
so rows written before these types, JSON and SQL read back as plain strings compare equal.
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    """``requests.status``: written ``queued`` by the coordinator, finished once by a sub-agent."""

    QUEUED = "queued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self is not RequestStatus.QUEUED


TERMINAL_STATUSES: tuple[RequestStatus, ...] = (RequestStatus.SUCCEEDED, RequestStatus.FAILED)


class AttemptOutcome(StrEnum):
    """``api_calls.outcome``: how one attempt ended (a provider error's :attr:`ProviderError.outcome`)."""

    #: recorded before the call and not (yet) finished
    IN_FLIGHT = "in_flight"
    #: its worker died during the call: the provider may have served (and billed) it
    UNKNOWN = "unknown"
    OK = "ok"
    #: recorded but never sent (its rate-limit slot came too late, no new one in time): not billed
    NOT_SENT = "not_sent"
    ERROR = "error"
    TRANSIENT_ERROR = "transient_error"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    PERMANENT_ERROR = "permanent_error"
    CONTEXT_TOO_LONG = "context_too_long"
    AUTH_ERROR = "auth_error"
    NOT_CONFIGURED = "not_configured"


#: Attempts that are billed, outcome unknown (counted as such in status, metrics, reports).
OUTCOMES_UNKNOWN: tuple[AttemptOutcome, ...] = (AttemptOutcome.IN_FLIGHT, AttemptOutcome.UNKNOWN)


class FailureReason(StrEnum):
    """``requests.failure_reason``: why a failed request failed (``error`` has the detail for people)."""

    # a provider error's outcome, after the retries (or at once for a permanent one)
    ERROR = "error"
    TRANSIENT_ERROR = "transient_error"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    PERMANENT_ERROR = "permanent_error"
    CONTEXT_TOO_LONG = "context_too_long"
    AUTH_ERROR = "auth_error"
    NOT_CONFIGURED = "not_configured"
    # the call path's own
    CIRCUIT_OPEN = "circuit_open"
    FLEET_STATE_UNAVAILABLE = "fleet_state_unavailable"
    # the sub-agent's and the writer's
    POISON = "poison"
    INTERNAL_ERROR = "internal_error"
    UNWRITABLE = "unwritable"
    # a budget step's (cost control): the call did not fit what was left
    BUDGET_EXCEEDED = "budget_exceeded"
    # the tenant's budget (tars_tasks/budgets.py) had no room for the call's worst case: queued work
    # that met a spent budget
    BUDGET = "budget"
    # the batch lane's: the provider's batch did not answer it (expired, canceled) and the policy is "fail"
    BATCH_EXPIRED = "batch_expired"
    # the producer's: its publish raised (the row was marked failed, the producer was told)
    ENQUEUE_FAILED = "enqueue failed"

    @classmethod
    def of(cls, exc: BaseException) -> FailureReason:
        """The reason an error ends a request with (its ``outcome``; ``error`` if it has none)."""
        try:
            return cls(getattr(exc, "outcome", "error"))
        except ValueError:
            return cls.ERROR
