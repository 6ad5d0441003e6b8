"""Fixtures of the fault suite: a case context on this test's fresh database and Redis."""

from __future__ import annotations

import pytest

from tests.faults.cases import CaseContext


@pytest.fixture
def ctx(fleet_env, db, redis, tmp_path):
    c = CaseContext(env=dict(fleet_env), engine=db, broker=redis, log_dir=tmp_path)
    yield c
    c.close()
