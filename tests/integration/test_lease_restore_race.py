"""A dead worker's message restored and taken again at once keeps its new holder on record.

Seen in the fault runner (poison case, N = 1000, 2026-12-04): a worker restored a dead worker's
bundle and took it back within the same moment; the restore then deleted the message's owner
entry *after* its transaction, i.e. the new holder's. When that holder died too, no lease sweep
knew the message (it only follows owners) and the visibility timeout (an hour by default) was
the only way back: its request stayed ``queued`` for the rest of the case.

Real Redis, the project's kombu transport; the only stand-in is where the second consumer's
fetch happens: between the restore's transaction and whatever the restore does next.
"""

from __future__ import annotations

from contextlib import contextmanager

import kombu
import pytest

from config.keys import UNACKED_OWNER_KEY
from tars_tasks.broker import leases, transport

QUEUE = "tars.race"


@contextmanager
def _owner(name: str):
    """This process as the lease owner ``name`` for a while (the owner is process-wide state)."""
    saved = leases._owner, leases._owner_pid
    leases.release_owner()
    try:
        yield leases.claim_owner(node=name)
    finally:
        leases._owner, leases._owner_pid = saved


class _TakesItBackAfterTheRestore:
    """A Redis client whose ``transaction`` (kombu's restore_by_tag runs one per message) is
    followed at once by another consumer taking the restored message."""

    def __init__(self, client, take):
        self._client, self._take = client, take
        self.restores = 0

    def transaction(self, *args, **kwargs):
        out = self._client.transaction(*args, **kwargs)
        self.restores += 1
        self._take()
        return out

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.fixture
def channels(redis_url, redis):
    transport.install()
    conns = [kombu.Connection(redis_url), kombu.Connection(redis_url)]
    try:
        chans = [c.channel() for c in conns]
        for ch in chans:
            ch.queue_declare(queue=QUEUE)
        yield chans
    finally:
        for c in conns:
            c.release()


def test_a_message_taken_again_right_after_its_restore_keeps_its_new_owner(channels, redis):
    dead_ch, live_ch = channels
    dead_ch.basic_publish(dead_ch.prepare_message("payload"), exchange="", routing_key=QUEUE)
    with _owner("dead") as dead:
        held = dead_ch.basic_get(QUEUE, no_ack=False)
    assert held is not None
    tag = held.delivery_tag
    assert redis.hget(UNACKED_OWNER_KEY, tag).decode() == dead  # no lease key for it: it is dead

    taken: list = []

    def take() -> None:  # the live worker's BRPOP wins the race for the restored message
        with _owner("live"):
            taken.append((live_ch.basic_get(QUEUE, no_ack=False), leases.current_owner()))

    with live_ch.conn_or_acquire() as real:
        racing = _TakesItBackAfterTheRestore(real, take)

        @contextmanager
        def conn_or_acquire(client=None):
            yield client or racing

        live_ch.conn_or_acquire = conn_or_acquire
        restored = leases.restore_dead(live_ch, [tag])

    assert restored == 1 and racing.restores == 1
    (again, live), = taken
    assert again is not None and again.delivery_tag == tag  # kombu keeps the tag on a restore
    # the live holder is on record, so a sweep restores the message if this holder dies too
    assert redis.hget(UNACKED_OWNER_KEY, tag).decode() == live
    assert redis.hexists(dead_ch.unacked_key, tag)


def test_an_owner_entry_with_no_message_is_still_dropped(channels, redis):
    ch = channels[0]
    redis.hset(UNACKED_OWNER_KEY, "orphan-tag", "dead:1:abc")
    assert leases.restore_dead(ch, ["orphan-tag"]) == 0
    assert not redis.hexists(UNACKED_OWNER_KEY, "orphan-tag")
