"""Fixtures for loadgen's integration tests: a Runner that starts its own local worker fleet."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadgen.runner import Runner
from tests.helpers import make_settings


@pytest.fixture
def make_runner(fleet_env, tmp_path) -> Iterator[Callable[..., Runner]]:
    """``make_runner(env={...})``: a local-fleet Runner on this test's Redis/Postgres; fleet stopped after."""
    made: list[Runner] = []

    def _make(*, env: dict[str, str] | None = None, out: Path | None = None, **kw) -> Runner:
        full = {**fleet_env, **(env or {})}
        r = Runner(settings=make_settings(full), out_dir=out or tmp_path / "report", mode="local",
                   worker_env=full, **kw)
        made.append(r)
        return r

    yield _make
    for r in made:
        r.stop_fleet()
