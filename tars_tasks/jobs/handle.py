"""A producer's handle on a job (``TarsClient.submit_job`` returns one)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tars_tasks.errors import ResultTimeout
from tars_tasks.jobs.store import JobView

if TYPE_CHECKING:
    from tars_tasks.client import TarsClient


@dataclass(frozen=True, slots=True)
class JobHandle:
    id: str
    #: False when an earlier job with the same idempotency key was returned instead.
    created: bool
    client: TarsClient

    def get(self) -> JobView:
        return self.client.get_job(self.id)

    def wait(self, *, timeout: float | None = None) -> JobView:
        return self.client.wait_job(self.id, timeout=timeout)

    def cancel(self) -> JobView:
        return self.client.cancel_job(self.id)


def wait_job(client: TarsClient, job_id: str, *, timeout: float | None, poll_interval_s: float) -> JobView:
    """Block until the job is terminal: its end notice wakes us; the row is the truth."""
    deadline = None if timeout is None else time.monotonic() + timeout
    event = client.listener.event_for(job_id)
    try:
        while True:
            job = client.get_job(job_id)
            if job.done:
                return job
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ResultTimeout(f"job {job_id} is still {job.status} after {timeout}s")
            event.wait(poll_interval_s if remaining is None else min(poll_interval_s, remaining))
    finally:
        client.listener.forget(job_id)
