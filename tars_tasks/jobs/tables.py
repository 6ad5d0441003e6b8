"""The schema of jobs: one row per job, one row per step instance (each an ordinary request).

A step instance is keyed by ``(job_id, step, item, revision)`` — unique, so however often a
finish is delivered or a scheduling pass is repeated, no instance is created twice. Its
request carries the idempotency key ``job:<job_id>:<step>:<item>:<revision>`` too (unique per
tenant in ``requests``): a second, independent guard.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tars_tasks.db.models import Base

JOB_RUNNING = "running"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_TERMINAL = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)

#: ``requests.failure_reason`` of a step request stopped before it ran (job cancelled, failed or done).
REASON_CANCELLED = "cancelled"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_run_id", "run_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    #: The template's name and its definition as it was at submit (a running job never sees an edit).
    template: Mapped[str] = mapped_column(String(100))
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    #: The output of the template's ``output`` step (its latest revision).
    result: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    #: ``step_failed``, ``not_validated``, ``quorum_not_reached``, ``bad_fanout_source``, ``render_failed``,
    #: ``cancelled``, ``enqueue failed``.
    failure_reason: Mapped[str | None] = mapped_column(String(50))
    #: The step whose failure failed the job.
    failed_step: Mapped[str | None] = mapped_column(String(100))
    #: The submitter's completion channel (a notice when the job ends); None: no one listens.
    reply_to: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(36))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobStep(Base):
    __tablename__ = "job_steps"
    __table_args__ = (
        UniqueConstraint("job_id", "step", "item", "revision", name="uq_job_steps_instance"),
        UniqueConstraint("request_id", name="uq_job_steps_request_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(100))
    #: Position in the fan-out list (0 for a step that is not fanned out).
    item: Mapped[int] = mapped_column(Integer)
    #: 0, then 1, 2, ... each time a validator sends the step back.
    revision: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(36))
    #: The fan-out item this instance works on (JSON), None for a step that is not fanned out.
    item_value: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
