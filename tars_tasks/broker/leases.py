"""Leases: which live worker process holds which unacked message, and restoring the rest.

A worker process takes a lease owner id at start (:func:`claim_owner`) and keeps the key
:func:`config.keys.lease_key` alive with a TTL (``lease_ttl_s``), renewed every
``lease_renew_interval_s`` (``workers.maintenance.LeaseKeeper``). Every message it takes is
recorded under that owner next to kombu's ``unacked`` entry (:mod:`tars_tasks.broker.transport`).

:func:`dead_tags` finds, in one server-side pass per chunk, the delivery tags whose owner's
lease key is gone; :func:`restore_dead` puts those messages back on their queues (kombu's own
``restore_by_tag``: one WATCH/MULTI transaction each, flagged ``redelivered``). A worker that is
alive but cannot reach Redis for longer than its lease looks dead; the sweeper therefore waits a
grace period after any Redis error of its own and while Redis itself has just restarted, so a
short outage does not rerun live work.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

from config.keys import UNACKED_OWNER_KEY, lease_key, lease_prefix

_owner: str | None = None
_owner_pid: int | None = None
_lock = threading.Lock()


def claim_owner(*, node: str | None = None) -> str:
    """Give this process a lease owner id (once per process; a forked child gets its own)."""
    global _owner, _owner_pid
    with _lock:
        if _owner is None or _owner_pid != os.getpid():
            base = node or socket.gethostname()
            _owner = f"{base}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
            _owner_pid = os.getpid()
        return _owner


def current_owner() -> str | None:
    """The lease owner of the worker this process belongs to, or None (producers, stock workers).
    A prefork child keeps its parent's: the parent holds the messages, the child runs them."""
    return _owner


def release_owner() -> None:
    global _owner, _owner_pid
    with _lock:
        _owner, _owner_pid = None, None


#: KEYS[1] = the owner hash; ARGV: HSCAN cursor, chunk size, lease key prefix.
#: Returns {next cursor, {dead tag, owner, dead tag, owner, ...}}.
DEAD_TAGS_LUA = """
local res = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local alive = {}
local dead = {}
local fields = res[2]
for i = 1, #fields, 2 do
  local owner = fields[i + 1]
  local a = alive[owner]
  if a == nil then
    a = redis.call('EXISTS', ARGV[3] .. owner)
    alive[owner] = a
  end
  if a == 0 then
    dead[#dead + 1] = fields[i]
    dead[#dead + 1] = owner
  end
end
return {res[1], dead}
"""


def dead_tags(client, *, namespace: str, chunk: int = 500) -> dict[str, str]:
    """Delivery tag -> owner, for every unacked message whose owner's lease has expired."""
    script = client.register_script(DEAD_TAGS_LUA)
    cursor: bytes | int = 0
    out: dict[str, str] = {}
    while True:
        cursor, flat = script(keys=[UNACKED_OWNER_KEY], args=[cursor, chunk, lease_prefix(namespace)])
        for i in range(0, len(flat), 2):
            out[_s(flat[i])] = _s(flat[i + 1])
        if int(cursor) == 0:
            return out


#: KEYS = [owner hash, kombu's unacked hash]; ARGV = [tag]. Drops the tag's owner entry only if
#: no message is unacked under that tag: a consumer records the two together (one MULTI), so a
#: message restored and taken again meanwhile keeps its new holder's entry.
DROP_ORPHAN_OWNER_LUA = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


def restore_dead(channel, tags: list[str]) -> int:
    """Put the messages of ``tags`` back on their queues; returns how many were restored.

    Each restore is kombu's transaction, which removes the message's owner entry with its
    unacked entry before the message is visible again. An owner entry left with no message is
    dropped afterwards, but only while still no message is unacked under its tag: the restored
    message may already be held again (same delivery tag) by a worker whose entry must stay, or
    no sweep would restore it if that worker died too (seen: a request queued for the rest of a
    fault case)."""
    restored = 0
    with channel.conn_or_acquire() as client:
        drop_orphan = client.register_script(DROP_ORPHAN_OWNER_LUA)
        for tag in tags:
            held = client.hexists(channel.unacked_key, tag)
            channel.qos.restore_by_tag(tag, client=client)
            restored += int(bool(held))
            drop_orphan(keys=[UNACKED_OWNER_KEY, channel.unacked_key], args=[tag])
    return restored


# --- messages this process gave up while its lease lives on ------------------------------------
#
# On a broken broker connection kombu gives back every message the consumer holds
# (``QoS.restore_unacked``) and Celery drops the tasks it had reserved but not started. With
# Redis away that give-back fails, and the entries stay in ``unacked`` under *this* process's
# owner, whose lease is alive again a second later: no lease sweep and no visibility-timeout
# restore would ever touch them (seen: one request of 80 queued forever after a Redis restart).
# Such tags are remembered here and restored by this process once Redis answers, except those
# whose task is still running here (restored once it ends; by then its request is terminal and
# the redelivery only re-announces it).

_abandoned: set[str] = set()


def abandon(tags) -> None:
    """Remember ``tags`` (delivery tags) as given up by this process's consumer."""
    with _lock:
        _abandoned.update(str(t) for t in tags)


def abandoned() -> list[str]:
    with _lock:
        return sorted(_abandoned)


def restore_abandoned(channel, *, running: set[str]) -> int:
    """Put the messages this process gave up back on their queues (kombu's own restore, one
    WATCH/MULTI transaction each); tags in ``running`` wait. Returns how many were restored."""
    todo = [t for t in abandoned() if t not in running]
    if not todo:
        return 0
    restored = restore_dead(channel, todo)
    with _lock:
        _abandoned.difference_update(todo)
    return restored


def live_owners(client, *, namespace: str) -> set[str]:
    prefix = lease_prefix(namespace)
    return {_s(k)[len(prefix):] for k in client.scan_iter(match=f"{prefix}*", count=500)}


def lease_alive(client, *, namespace: str, owner: str) -> bool:
    return bool(client.exists(lease_key(namespace, owner)))


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
