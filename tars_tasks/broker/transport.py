"""Kombu's Redis transport with three repairs; :func:`install` makes ``redis://`` use it.

1. **Priority without surprises.** A message published with no priority lands in kombu's step 0
   (the bare queue list), which a stock worker polls *first*: a plain ``send_task`` ran as high
   priority. This channel polls the steps in :data:`config.keys.PRIORITY_POLL_ORDER`, where step
   0 is TARS's normal priority (see :mod:`config.keys`).
2. **Leases on unacked messages.** With ``acks_late`` kombu keeps every message a worker holds in
   the ``unacked`` hash and gives it back only after ``visibility_timeout`` (an hour by default),
   so a SIGKILLed worker's requests waited an hour; a short timeout instead reruns live long
   calls. Here every unacked entry also records the lease owner of the worker process that took
   it, in the same pipeline (:data:`config.keys.UNACKED_OWNER_KEY`); the owner keeps a lease key
   alive while it lives, and a live worker restores the messages of owners whose lease expired
   (:mod:`tars_tasks.broker.leases`). Entries with no owner (a stock worker's) still fall back to
   the visibility timeout. Messages this process had to give up while Redis was away (a broken
   connection's give-back failed) are restored by the process itself once Redis answers
   (:func:`tars_tasks.broker.leases.restore_abandoned`).
3. **Half-open connections on the gevent path** (:mod:`tars_tasks.broker.halfopen`): the pub/sub
   health check also runs where Celery's gevent pool drains events.
"""

from __future__ import annotations

from contextlib import contextmanager
from time import time

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from config.keys import PRIORITY_POLL_ORDER, QUEUE_PREFIX, UNACKED_OWNER_KEY, stage_slots_key
from tars_tasks.broker import leases, slots
from tars_tasks.broker.halfopen import HalfOpenChecks
from tars_tasks.staging import STAGED_HEADER


class LeasedQoS(kombu_redis.QoS):
    """Kombu's Redis ack emulation, plus the owner of each unacked message."""

    def append(self, message, delivery_tag):
        owner = leases.current_owner()
        if owner is None:
            return super().append(message, delivery_tag)
        delivery = message.delivery_info
        staged = _staged_slot(message, delivery)
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()}) \
                    .hset(self.unacked_key, delivery_tag,
                          dumps([message._raw, delivery["exchange"], delivery["routing_key"]])) \
                    .hset(UNACKED_OWNER_KEY, delivery_tag, owner)
                limits_key = slots.budget_limits_key() if staged is not None else None
                if staged is not None:  # its reserved slot, in the same round trip (tars_tasks.broker.slots)
                    key, request_id, _tier = staged
                    pipe.hget(key, request_id).hdel(key, request_id).time()
                    if limits_key is not None:  # and whether any budget limit is set
                        pipe.hlen(limits_key)
                replies = pipe.execute()
        except Exception:  # the record may have been applied with its reply lost: never run here
            leases.abandon([delivery_tag])
            raise
        if staged is not None:
            _key, request_id, tier = staged
            slots.put(request_id, slots.answer(tier=tier, slot=replies[3], redis_time=replies[5],
                                               budget_limits=int(replies[6]) if limits_key is not None else None))
        virtual.QoS.append(self, message, delivery_tag)

    def restore_unacked(self, client=None):
        """Kombu gives back what the consumer holds when its connection breaks; if Redis is away
        the give-back fails and the entries would stay under this live owner forever."""
        tags = list(self._delivered)
        try:
            return super().restore_unacked(client)
        except Exception:
            leases.abandon(tags)
            self._delivered.clear()
            raise

    def restore_visible(self, start=0, num=10, interval=10):
        """Kombu's visibility-timeout restore, for messages *without* a lease owner only: a message
        a TARS worker holds is restored when its owner's lease expires, never because a live call
        outlasted the visibility timeout."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = time() - self.visibility_timeout
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    visible = client.zrange(self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                                            offset=num and start, num=num, withscores=True)
                    tags = [tag for tag, _score in visible or []]
                    if not tags:
                        return
                    owned = client.hmget(UNACKED_OWNER_KEY, tags)
                    for tag, owner in zip(tags, owned, strict=True):
                        if owner is None:
                            self.restore_by_tag(tag, client)
            except kombu_redis.MutexHeld:
                pass

    def _remove_from_indices(self, delivery_tag, pipe=None):
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.zrem(self.unacked_index_key, delivery_tag) \
                       .hdel(self.unacked_key, delivery_tag) \
                       .hdel(UNACKED_OWNER_KEY, delivery_tag)


def _staged_slot(message, delivery) -> tuple[str, str, str] | None:
    """(slot hash, request id, tier) of a staged TARS message, when the slot is read here."""
    ns = slots.namespace()
    if ns is None:
        return None
    headers = getattr(message, "headers", None) or {}
    request_id, queue = headers.get("id"), delivery.get("routing_key") or ""
    if STAGED_HEADER not in headers or not isinstance(request_id, str) or not queue.startswith(QUEUE_PREFIX):
        return None
    tier = queue[len(QUEUE_PREFIX):]
    return stage_slots_key(ns, tier), request_id, tier


class Channel(kombu_redis.Channel):
    QoS = LeasedQoS
    priority_steps = list(PRIORITY_POLL_ORDER)
    _shared_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        """Kombu builds a new ``redis.Redis`` around the same pool for every call made without a
        client (the unacked record and the ack of every message: two per message); building one
        was ~5% of a worker's CPU in a zero-latency drain. A client is only a handle on the pool
        (each command checks a connection out of it), so one per channel serves every greenlet;
        it is rebuilt when kombu replaces the pool (after a connection error)."""
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    def priority(self, n):
        """The step of priority ``n``; kombu's version bisects, which needs sorted steps."""
        steps = self.priority_steps
        if n in steps:
            return n
        lower = [s for s in steps if s <= n]
        return max(lower) if lower else min(steps)


class Transport(HalfOpenChecks, kombu_redis.Transport):
    Channel = Channel


#: URL schemes served by :class:`Transport` once :func:`install` ran.
SCHEMES = ("redis", "rediss")


def install() -> None:
    """Make ``redis://`` and ``rediss://`` use :class:`Transport` in this process (idempotent).

    Through kombu's alias table rather than Celery's ``broker_transport`` setting: with a class
    path there, ``Connection.as_uri()`` starts with that path instead of ``redis://``, and
    Flower, which picks its broker inspector by that scheme, loses its Broker tab.
    """
    target = f"{__name__}:Transport"
    for scheme in SCHEMES:
        if kombu_transport.TRANSPORT_ALIASES.get(scheme) != target:
            kombu_transport.TRANSPORT_ALIASES[scheme] = target
            kombu_transport._transport_cache.pop(scheme, None)  # resolved before: resolve again
