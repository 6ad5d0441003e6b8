"""TARS priorities on kombu's Redis lists: 9 is polled first, and no priority at all is normal."""

from __future__ import annotations

from config.keys import (
    KOMBU_PRIORITY_SEP,
    PRIORITY_NORMAL,
    PRIORITY_POLL_ORDER,
    kombu_priority,
    priority_list,
    tars_priority,
)
from tars_tasks.broker.transport import Channel


def test_workers_poll_the_steps_from_tars_priority_nine_down_to_zero():
    assert [tars_priority(step) for step in PRIORITY_POLL_ORDER] == list(range(9, -1, -1))


def test_a_message_without_priority_is_normal_priority():
    # kombu puts a message with no priority property in step 0, the bare queue list
    assert tars_priority(None) == PRIORITY_NORMAL
    assert tars_priority(0) == PRIORITY_NORMAL
    assert priority_list("tars.haiku", PRIORITY_NORMAL) == "tars.haiku"


def test_every_tars_priority_has_its_own_list_with_kombus_default_separator():
    lists = {priority_list("tars.haiku", p) for p in range(10)}
    assert len(lists) == 10
    assert priority_list("tars.haiku", 9) == f"tars.haiku{KOMBU_PRIORITY_SEP}{kombu_priority(9)}"
    assert all(tars_priority(kombu_priority(p)) == p for p in range(10))


def test_the_channel_maps_every_step_to_itself_although_the_poll_order_is_not_sorted():
    ch = Channel.__new__(Channel)
    ch.priority_steps = list(PRIORITY_POLL_ORDER)
    assert [ch.priority(n) for n in range(10)] == list(range(10))
    assert ch.priority(42) == 9
