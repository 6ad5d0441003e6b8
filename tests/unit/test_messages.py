"""The task message: one type, encoded by the publisher and decoded by the task, carrying only
what the worker uses (id, tier, reply channel)."""

from __future__ import annotations

import pytest

from tars_tasks.messages import MESSAGE_VERSION, MalformedMessage, RunRequestMessage

RID = "6f1c1a8e-2d4b-4c1e-9a57-0e0c4bb0a001"


def _decode(kwargs, *, task_id=RID, priority=None):
    return RunRequestMessage.decode(args=(), kwargs=kwargs, task_id=task_id, delivery_priority=priority)


def test_what_the_publisher_encodes_the_task_decodes_to_the_same_message():
    m = RunRequestMessage(request_id=RID, tier="sonnet", reply_to="tars:done:abc")
    wire = m.encode()
    assert wire == {"v": MESSAGE_VERSION, "request_id": RID, "tier": "sonnet", "reply_to": "tars:done:abc"}
    assert _decode(wire) == m
    assert "prompt" not in wire and "tenant" not in wire and "priority" not in wire
    assert m.kwargsrepr() == f"{{'request_id': '{RID}', 'tier': 'sonnet'}}"


def test_a_layout_2_message_queued_before_an_upgrade_still_runs_its_extra_fields_ignored():
    old = {"v": 2, "request_id": RID, "tier": "haiku", "tenant": "acme", "priority": 7, "reply_to": None}
    assert _decode(old) == RunRequestMessage(request_id=RID, tier="haiku", reply_to=None)


@pytest.mark.parametrize("kwargs,match", [
    ({"v": 3, "request_id": RID, "tier": "haiku", "tenant": "acme"}, "unknown field"),
    ({"v": 9, "request_id": RID, "tier": "haiku"}, "unknown message layout"),
    ({"v": "3", "request_id": RID, "tier": "haiku"}, "unknown message layout"),
    ({"v": 3, "request_id": RID}, "missing field"),
    ({"v": 3, "request_id": "not-a-uuid", "tier": "haiku"}, "not a UUID"),
    ({"v": 3, "request_id": RID, "tier": "huge"}, "unknown tier"),
])
def test_a_message_that_cannot_be_run_says_why(kwargs, match):
    with pytest.raises(MalformedMessage, match=match):
        _decode(kwargs)


def test_a_plain_celery_message_carries_the_request_fields_for_a_row_to_be_made():
    m = _decode({"role": "engineer", "prompt": "hi", "tenant": "acme"}, priority=None)
    assert m.request_id == RID and m.tier is None and m.spec["prompt"] == "hi" and m.spec["tenant"] == "acme"
    assert "priority" in m.spec
