"""The fleet-wide admission bound: a tier's queue never holds more than ``max_queue_depth``.

Checking a sampled depth in each producer and then publishing let four producers overshoot the
bound by 1.33x (each saw room that the others were filling). Here a producer *reserves* room
before it writes anything, atomically in the broker's Redis: one script counts the tier's queued
messages (every priority list) plus the live reservations of all producers and grants the
reservation only if the sum stays within the bound. Staged messages (waiting for dispatch,
``docs/DISPATCH.md``) count as queued: the tier's staged count is read in the same script.
The producer publishes (or stages), then releases the reservation (its messages are now
counted in the lists). A producer that dies in between holds its reservation only until it
expires (``admission_reservation_ttl_s``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from config.keys import PRIORITY_MAX, PRIORITY_MIN, admission_key, priority_list, queue_for_tier, stage_count_key

#: KEYS[1] = reservations zset (member -> expiry ms), KEYS[2] = reservation sizes hash,
#: KEYS[3] = the tier's staged count, KEYS[4..] = the tier's priority lists.
#: ARGV: unused, n, limit, ttl ms, reservation id.
#: The clock is Redis's own (producers' clocks may disagree). Returns {granted 0/1, depth before}.
RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[2], id) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local depth = tonumber(redis.call('GET', KEYS[3]) or '0')
for i = 4, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do depth = depth + tonumber(v) end
local n = tonumber(ARGV[2])
if depth + n > tonumber(ARGV[3]) then return {0, depth} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[5])
redis.call('HSET', KEYS[2], ARGV[5], n)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 2)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) * 2)
return {1, depth}
"""

RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    tier: str
    id: str
    n: int


class AdmissionBound:
    def __init__(self, *, redis_client, namespace: str, limit: int, ttl_s: float) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.limit = limit
        self.ttl_ms = int(ttl_s * 1000)
        self._reserve = redis_client.register_script(RESERVE_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)

    def _keys(self, tier: str) -> list[str]:
        base = admission_key(self.namespace, tier)
        queue = queue_for_tier(tier)
        lists = [priority_list(queue, p) for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1)]
        return [base, f"{base}:n", stage_count_key(self.namespace, tier), *lists]

    def reserve(self, *, tier: str, n: int) -> tuple[Reservation | None, int]:
        """Room for ``n`` more messages on ``tier``, or (None, depth) if the bound forbids it."""
        rid = uuid.uuid4().hex
        granted, depth = self._reserve(keys=self._keys(tier), args=[0, n, self.limit, self.ttl_ms, rid])
        return (Reservation(tier=tier, id=rid, n=n) if int(granted) else None), int(depth)

    def release(self, reservation: Reservation) -> None:
        keys = self._keys(reservation.tier)[:2]
        self._release(keys=keys, args=[reservation.id])
