"""ids_in_broker: a message is found in any priority list of its tier or in unacked, and only there."""

from __future__ import annotations

import json
import uuid

import pytest

from config.keys import UNACKED_KEY, priority_list, queue_for_tier
from tars_tasks.broker.presence import CHUNK, ids_in_broker

pytestmark = pytest.mark.integration


def _message(rid: str) -> bytes:
    return json.dumps({"body": "e30=", "headers": {"id": rid, "task": "tars.run_request"}}).encode()


def test_found_in_any_priority_list_beyond_one_chunk_and_in_unacked_and_nowhere_else(redis):
    ids = [str(uuid.uuid4()) for _ in range(6)]
    deep, high, held, other_tier, absent, _ = ids
    filler = [_message(str(uuid.uuid4())) for _ in range(CHUNK + 5)]
    base = queue_for_tier("haiku")
    redis.lpush(base, _message(deep), *filler)  # the wanted one sits past the first chunk (tail)
    redis.lpush(priority_list(base, 9), _message(high))
    redis.hset(UNACKED_KEY, "tag-1", json.dumps([_message(held).decode(), "", "tars.haiku"]))
    redis.lpush(queue_for_tier("sonnet"), _message(other_tier))
    found = ids_in_broker(redis, ids=[deep, high, held, other_tier, absent], tiers=["haiku"])
    assert found == {deep, high, held}
    assert ids_in_broker(redis, ids=[other_tier], tiers=["haiku", "sonnet"]) == {other_tier}
    assert ids_in_broker(redis, ids=[], tiers=["haiku"]) == set()


def test_a_staged_message_is_found_in_staging_whichever_ring_or_parked_set_names_its_tenant(redis):
    """Dispatch (docs/DISPATCH.md): a request waiting in staging is in the broker, not lost; only
    with the namespace given is staging searched."""
    from config.keys import stage_parked_key, stage_ring_key
    from tars_tasks.staging import StagedMessage, Staging

    ns = "pres"
    staged_a, staged_parked, queued, absent = (str(uuid.uuid4()) for _ in range(4))
    staging = Staging(redis_client=redis, namespace=ns)
    staging.stage([StagedMessage(id=staged_a, tier="haiku", priority=9, tenant="a", tokens=5,
                                 body=_message(staged_a).decode()),
                   StagedMessage(id=staged_parked, tier="haiku", priority=2, tenant="b", tokens=5,
                                 body=_message(staged_parked).decode())])
    # tenant b at its own limit: out of its ring, in the parked set (as the dispatch script leaves it)
    redis.lrem(stage_ring_key(ns, "haiku", 2), 0, "b")
    redis.zadd(stage_parked_key(ns, "haiku"), {"2:b": 1})
    redis.lpush(queue_for_tier("haiku"), _message(queued))
    wanted = [staged_a, staged_parked, queued, absent]
    assert ids_in_broker(redis, ids=wanted, tiers=["haiku"], namespace=ns) == {staged_a, staged_parked, queued}
    assert ids_in_broker(redis, ids=wanted, tiers=["haiku"]) == {queued}
    assert ids_in_broker(redis, ids=[staged_a], tiers=["sonnet"], namespace=ns) == set()
