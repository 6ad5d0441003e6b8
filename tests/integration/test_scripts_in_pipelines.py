"""Lua scripts queued on a pipeline cost no extra round trip and survive a script flush (real Redis).

redis-py's ``script(..., client=pipe)`` makes ``pipe.execute()`` first send ``SCRIPT EXISTS`` for
the pipeline's scripts (``Pipeline.load_scripts``), a round trip of its own on every execute: on a
producer, one for the budgets' state and one for staging in every submit call.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
import redis as redis_lib

from tars_tasks.budgets import FLEET, Budgets
from tars_tasks.staging import StagedMessage, Staging

pytestmark = pytest.mark.integration


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """The commands pipelines sent outside their batch (what ``load_scripts`` sends)."""
    out: list[str] = []
    original = redis_lib.client.Pipeline.immediate_execute_command

    def spy(self, *args, **options):
        out.append(" ".join(str(a) for a in args[:2]).upper())
        return original(self, *args, **options)

    monkeypatch.setattr(redis_lib.client.Pipeline, "immediate_execute_command", spy)
    return out


def _messages(n: int, tier: str = "haiku") -> list[StagedMessage]:
    return [StagedMessage(id=f"m{i}", tier=tier, priority=i % 10, tenant="t", tokens=3, body=json.dumps({"i": i}))
            for i in range(n)]


def test_staging_and_budgets_send_no_script_exists_and_work_after_a_script_flush(redis, sent):
    ns = f"scripts-{uuid.uuid4().hex[:8]}"
    staging = Staging(redis_client=redis, namespace=ns)
    budgets = Budgets(redis_client=redis, namespace=ns)
    budgets.set_limit(tenant="acme", period="day", usd=Decimal("1"))
    for round_ in range(2):  # the second round after SCRIPT FLUSH: nothing is loaded any more
        staging.stage(_messages(7) + _messages(3, tier="sonnet"))
        states = budgets.states(["acme", FLEET])
        refusal, held = budgets.reserve_held(tenant="acme", reservation_id=f"r{round_}", usd=Decimal("0.25"))
        assert refusal is None and held
        assert budgets.settle(tenant="acme", reservation_id=f"r{round_}", usd=Decimal("0.1")) == "settled"
        assert states["acme"][0].limit_usd == Decimal("1")
        redis.script_flush()
    assert staging.staged_count(tier="haiku") == 14 and staging.staged_count(tier="sonnet") == 6
    assert budgets.state("acme")[0].spent_usd == Decimal("0.2")
    assert [c for c in sent if c.startswith("SCRIPT")] == []
