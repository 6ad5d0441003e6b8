"""The schema: every request, every API call attempt, every load run.

Requests are written once by the coordinator (status ``queued``) and finished once by a
sub-agent; api_calls get one row per attempt, keyed by an attempt id made before the
call, so a redelivered task adds rows for the calls it really made and never repeats one.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tars_tasks.codes import OUTCOMES_UNKNOWN as _OUTCOMES_UNKNOWN
from tars_tasks.codes import TERMINAL_STATUSES as _TERMINAL_STATUSES
from tars_tasks.codes import AttemptOutcome, FailureReason, RequestStatus

# Postgres gets exact decimals; 6 decimal places cover a single token of the cheapest model.
USD = Numeric(18, 9)

# The codes of status, outcome and failure_reason are tars_tasks.codes' enums; these names stay
# as aliases for code written against them (compare with the enums).
STATUS_QUEUED = RequestStatus.QUEUED
STATUS_SUCCEEDED = RequestStatus.SUCCEEDED
STATUS_FAILED = RequestStatus.FAILED
TERMINAL_STATUSES = _TERMINAL_STATUSES
OUTCOME_IN_FLIGHT = AttemptOutcome.IN_FLIGHT
OUTCOME_UNKNOWN = AttemptOutcome.UNKNOWN
OUTCOME_OK = AttemptOutcome.OK
OUTCOME_NOT_SENT = AttemptOutcome.NOT_SENT
OUTCOMES_UNKNOWN = _OUTCOMES_UNKNOWN
ENQUEUE_FAILED = FailureReason.ENQUEUE_FAILED


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One loadgen run (or any named batch of requests)."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    scenario: Mapped[str | None] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_requests_tenant_idempotency_key"),
        Index("ix_requests_status", "status"),
        Index("ix_requests_run_id", "run_id"),
        Index("ix_requests_batch_lane_queued", "tier_queued", "submitted_at",
              postgresql_where=text("lane = 'batch' AND status = 'queued'"),
              sqlite_where=text("lane = 'batch' AND status = 'queued'")),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(50))
    tier_requested: Mapped[str] = mapped_column(String(20))
    #: The tier whose queue the request was published to (admission may have degraded it).
    tier_queued: Mapped[str | None] = mapped_column(String(20))
    tier_used: Mapped[str | None] = mapped_column(String(20))
    model: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer)
    #: The new user turn (None for a request given only as ``messages``).
    prompt: Mapped[str | None] = mapped_column(Text)
    #: The model request beyond the prompt, as stored at submit (the role's defaults filled in):
    #: the system prompt ("" = none, explicitly), earlier turns, output limit, sampling, stop
    #: sequences, "text"/"json", and the producer's own labels.
    system: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    temperature: Mapped[float | None] = mapped_column(Float)
    stop: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    response_format: Mapped[str | None] = mapped_column(String(20))
    #: Attribute ``metadata_`` (``metadata`` is SQLAlchemy's own); the column is ``metadata``.
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON(none_as_null=True))
    status: Mapped[str] = mapped_column(String(20))
    result: Mapped[str | None] = mapped_column(Text)
    #: Why the model stopped: end_turn, max_tokens, stop_sequence, refusal, ... (None until it answered).
    stop_reason: Mapped[str | None] = mapped_column(String(50))
    error: Mapped[str | None] = mapped_column(Text)
    #: Why a failed request failed, as a short code (``poison``, ``unwritable``, a provider
    #: outcome, ...); ``error`` has the human-readable detail.
    failure_reason: Mapped[str | None] = mapped_column(String(50))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Totals of all the request's api_calls, by token class (see ``config.pricing``).
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_1h_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    #: How it was answered: ``exact`` (the response cache, at submit), ``semantic`` (the semantic
    #: cache, at submit), ``model`` (a provider call); None until it succeeded.
    answered_by: Mapped[str | None] = mapped_column(String(20))
    #: What a cache hit saved: the cost of the call that filled the entry ($0 for a model answer).
    saved_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0), server_default="0")
    #: The fleet's degradation mode when the request was admitted (tars_tasks/fleetmode.py).
    served_mode: Mapped[str | None] = mapped_column(String(20))
    #: The response cache's digest of the canonical request and its scope (None: not cacheable);
    #: the worker fills ``cache:<model>:<digest>`` with the answer (tars_tasks/cache.py).
    cache_digest: Mapped[str | None] = mapped_column(String(64))
    #: A semantic hit's cosine similarity to the prompt whose answer it took (None otherwise).
    cache_similarity: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(200))
    #: ``interactive`` (a Celery queue and a call of its own) or ``batch`` (gathered into a provider
    #: batch at the batch price by the batch runner: workers/batchlane/, docs/COST_CONTROLS.md).
    lane: Mapped[str] = mapped_column(String(20), default="interactive", server_default="interactive")
    #: How long the producer accepted to wait for the answer, in seconds (the ``deadline`` field;
    #: None: not given). A deadline of at least the batch window chose the batch lane.
    deadline_s: Mapped[int | None] = mapped_column(Integer)
    #: A batch-lane request's completion channel (an interactive one's travels in its message).
    reply_to: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("runs.id", ondelete="SET NULL"))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiCall(Base):
    """One attempt at a model API call — what a provider would bill."""

    __tablename__ = "api_calls"
    __table_args__ = (
        Index("ix_api_calls_request_id", "request_id"),
        Index("ix_api_calls_in_flight_worker", "worker", postgresql_where=text("outcome = 'in_flight'"),
              sqlite_where=text("outcome = 'in_flight'")),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), ForeignKey("requests.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(30))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    #: Tokens by billing class: input not cached, output, prompt-cache writes (5-minute and
    #: 1-hour lifetimes) and cache reads; ``cost_usd`` prices each at its own catalog price.
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_1h_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    #: None while the call is in flight; stays None for an attempt whose worker died mid-call.
    latency_ms: Mapped[float | None] = mapped_column(Numeric(12, 3))
    #: Time spent waiting for fleet rate-limit capacity before the call.
    ratelimit_wait_ms: Mapped[float] = mapped_column(Numeric(12, 3), default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModeChange(Base):
    """One transition of the fleet's degradation mode (tars_tasks/fleetmode.py): when, from, to,
    why, and the signals it was decided from. ``seq`` is the transition's number in Redis and ``at``
    Redis's time of it, so a transition recorded twice (two processes writing the log) is one row,
    and a Redis that lost the mode (numbering from 1 again) does not collide with older rows."""

    __tablename__ = "mode_changes"
    __table_args__ = (
        UniqueConstraint("namespace", "seq", "at", name="uq_mode_changes_transition"),
        Index("ix_mode_changes_at", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    from_mode: Mapped[str] = mapped_column(String(20))
    to_mode: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    signals: Mapped[dict[str, Any]] = mapped_column(JSON)
    seq: Mapped[int] = mapped_column(Integer)
    namespace: Mapped[str] = mapped_column(String(100))


class ProviderBatch(Base):
    """One batch sent (or about to be sent) to a provider's batch API (workers/batchlane/). The row
    and its members (``batch_items``) are committed before the batch is submitted; ``state`` is
    ``pending`` (formed) -> ``submitting`` (a submit may have reached the provider) -> ``submitted``
    (``provider_batch_id`` known) -> ``done`` (every member's result recorded)."""

    __tablename__ = "provider_batches"
    __table_args__ = (Index("ix_provider_batches_state", "state"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tier: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20))
    provider_batch_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    request_count: Mapped[int] = mapped_column(Integer)
    submit_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    polls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    provider_status: Mapped[str | None] = mapped_column(String(50))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    submit_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchItem(Base):
    """A request's membership of a provider batch: one batch per request at most (the primary key)."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_batch_id", "batch_id"),)

    request_id: Mapped[str] = mapped_column(String(36), ForeignKey("requests.id", ondelete="CASCADE"),
                                            primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(36), ForeignKey("provider_batches.id", ondelete="CASCADE"))
    #: The provider's verdict (succeeded, errored, expired, canceled, missing); None until recorded.
    outcome: Mapped[str | None] = mapped_column(String(20))
    #: Sent on to the interactive lane after the batch could not answer it.
    retried: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class DeadLetter(Base):
    """A message the fleet could not run at all (unknown task, undecodable body)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reason: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str | None] = mapped_column(Text)
    queue: Mapped[str | None] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
