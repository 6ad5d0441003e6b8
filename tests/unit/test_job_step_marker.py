"""A finished request is looked up among job steps only if its row may be one (workers.agent):
every step request carries its job under STEP_METADATA_KEY; any other row is known to be none."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tars_tasks.jobs import STEP_METADATA_KEY
from workers.agent import _job_step
from workers.loader import RequestRow


def _row(metadata):
    return RequestRow(id="r", status="queued", role="researcher", tenant="acme", priority=5, prompt="p",
                      tier_requested="haiku", started_at=None, submitted_at=datetime.now(UTC), metadata=metadata)


@pytest.mark.parametrize(("metadata", "step"), [
    (None, False),
    ({}, False),
    ({"customer": "42"}, False),
    ({STEP_METADATA_KEY: "job-1", "step": "research", "item": "0", "revision": "0"}, True),
])
def test_only_a_row_with_the_step_metadata_may_be_a_job_step(metadata, step):
    assert _job_step(_row(metadata)) is step
