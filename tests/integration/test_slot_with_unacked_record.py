"""A staged message's reserved slot is read in the round trip that records it as unacked.

The worker used to read (and delete) the dispatcher's slot record and Redis' clock in a round
trip of its own per message (issue 13). With :func:`tars_tasks.broker.slots.enable` the transport
adds them to the unacked record's pipeline; the task then finds the answer in the process.
"""

from __future__ import annotations

import time

import pytest
from kombu import Connection, Exchange, Queue

from config.keys import UNACKED_OWNER_KEY, stage_slots_key
from tars_tasks.broker import leases, slots, transport
from tars_tasks.staging import STAGED_HEADER

pytestmark = pytest.mark.integration

NS = "slotread"


def _publish(redis_url: str, queue: Queue, request_id: str, *, staged: bool) -> None:
    with Connection(redis_url) as conn:
        headers = {"id": request_id, "task": "tars.run_request", **({STAGED_HEADER: 40} if staged else {})}
        conn.Producer().publish({"v": 3}, exchange=queue.exchange, routing_key="tars.haiku", declare=[queue],
                                headers=headers)


def test_the_slot_of_a_staged_message_is_read_and_deleted_with_its_unacked_record(redis, redis_url):
    transport.install()
    leases.release_owner()
    owner = leases.claim_owner(node="test")
    queue = Queue("tars.haiku", Exchange("tars.haiku", type="direct"), routing_key="tars.haiku")
    key = stage_slots_key(NS, "haiku")
    sec, usec = redis.time()
    slot_us = sec * 1_000_000 + usec + 300_000  # 0.3 s ahead on Redis' clock
    redis.hset(key, mapping={"r-staged": slot_us, "r-plain": slot_us})
    try:
        _publish(redis_url, queue, "r-staged", staged=True)
        _publish(redis_url, queue, "r-plain", staged=False)
        _publish(redis_url, queue, "r-before", staged=True)
        with Connection(redis_url) as conn:
            ch = conn.default_channel
            first = ch.basic_get("tars.haiku", no_ack=False)  # fetched before enable: read as before
            assert slots.take("r-staged") is None and redis.hexists(key, "r-staged")
            ch.qos.ack(first.delivery_tag)
            slots.enable(namespace=NS)
            before = time.monotonic()
            second = ch.basic_get("tars.haiku", no_ack=False)
            third = ch.basic_get("tars.haiku", no_ack=False)
            after = time.monotonic()
            assert redis.hget(UNACKED_OWNER_KEY, second.delivery_tag).decode() == owner
            assert slots.take("r-plain") is None and redis.hexists(key, "r-plain")  # not staged: not read
            read = slots.take("r-before")  # no slot recorded for it: read as none
            assert read is not None and read.tier == "haiku" and read.slot_monotonic() is None
            ch.qos.ack(second.delivery_tag)
            ch.qos.ack(third.delivery_tag)
        # the first message was fetched before enable: its record is still there for the task to read
        slots.enable(namespace=NS)
        redis.hset(key, "r-again", slot_us)
        _publish(redis_url, queue, "r-again", staged=True)
        with Connection(redis_url) as conn:
            ch = conn.default_channel
            before = time.monotonic()
            msg = ch.basic_get("tars.haiku", no_ack=False)
            after = time.monotonic()
            read = slots.take("r-again")
            ch.qos.ack(msg.delivery_tag)
        assert read is not None and not redis.hexists(key, "r-again")  # read and deleted in that round trip
        at = read.slot_monotonic()
        # the slot, 0.3 s ahead of Redis' clock when it was set, is at most 0.3 s after the fetch here
        assert before - 1.0 < at <= after + 0.3
        assert slots.take("r-again") is None  # taken once
    finally:
        slots.disable()
        leases.release_owner()


def test_the_budget_limits_set_are_counted_with_the_unacked_record_when_enabled(redis, redis_url):
    from config.keys import budget_limits_key

    transport.install()
    leases.release_owner()
    leases.claim_owner(node="test")
    queue = Queue("tars.haiku", Exchange("tars.haiku", type="direct"), routing_key="tars.haiku")
    limits = budget_limits_key(NS)
    redis.delete(limits)
    try:
        for request_id in ("b-apart", "b-none", "b-one"):
            _publish(redis_url, queue, request_id, staged=True)
        with Connection(redis_url) as conn:
            ch = conn.default_channel
            slots.enable(namespace=NS)  # the budgets live elsewhere: not counted
            tags = [ch.basic_get("tars.haiku", no_ack=False).delivery_tag]
            apart = slots.take("b-apart")
            slots.enable(namespace=NS, budget_limits_key=limits)
            tags.append(ch.basic_get("tars.haiku", no_ack=False).delivery_tag)
            none = slots.take("b-none")
            redis.hset(limits, "acme:day", 1000)  # a limit set between two fetches
            tags.append(ch.basic_get("tars.haiku", no_ack=False).delivery_tag)
            one = slots.take("b-one")
            for tag in tags:
                ch.qos.ack(tag)
        assert apart is not None and apart.budget_limits is None and not apart.no_budget_limits(max_age_s=60)
        assert none is not None and none.budget_limits == 0 and none.no_budget_limits(max_age_s=60)
        assert not none.no_budget_limits(max_age_s=0)  # read too long before its call: reserve as ever
        assert one is not None and one.budget_limits == 1 and not one.no_budget_limits(max_age_s=60)
    finally:
        redis.delete(limits)
        slots.disable()
        leases.release_owner()
