"""Budgets in USD per tenant per period (UTC day, UTC month), kept in the fleet-state Redis.

**Limits** live in one hash (``<ns>:budget:limits``, field ``TENANT:day`` / ``TENANT:month``, in
nano-dollars), written by ``tars budget set``. A tenant with no limit is not tracked (no Redis
round trip beyond the script's first read).

**Spend** per (tenant, period) is one hash with ``spent`` (settled) and ``reserved`` (in flight).
Before a model call the worker's budget step reserves the call's worst case — the whole input's
estimate plus the output limit (``max_tokens``), at the tier's catalog prices — in one script that
refuses if ``spent + reserved + worst case`` would pass any of the tenant's limits. After the call
it settles: the reservation is released and the real cost (every attempt's ``api_calls`` cost)
added to ``spent``. A retry reserves its own worst case first (the same reservation grows).

**A worker killed between reserving and settling** cannot settle. Every reservation has a lease
(``budget_reservation_lease_s``); any later script for the tenant finds the expired ones and
charges them **at their reserved amount** (the worst case: the call may have been made, and its
``api_calls`` row is on the bill as "outcome unknown") and counts them (``expired``). If the
worker was only slow and settles after all, its settle corrects the charge to the real cost. So
``reserved`` returns to 0 and ``spent`` is never below what was really spent; the error is on
the side of refusing early, never of overspending.

**Overspend** is bounded by the reservations: a call is sent only inside a granted reservation,
so a tenant's real spend passes its limit only by the amount the input estimate undercounted.

Amounts are integers of nano-dollars in Redis (Lua numbers are doubles: exact to ~$9M).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from config.keys import budget_key, budget_limits_key
from tars_tasks.redis_client import queue_script

log = logging.getLogger(__name__)

PERIODS: tuple[str, ...] = ("day", "month")
#: The budget scope of the whole fleet: its limits (``tars budget set '*' --day 100``) bind every
#: tenant's calls together, on top of each tenant's own; its share used is the fleet mode's
#: ``budget_burn`` signal.
FLEET = "*"
NANO = Decimal(1_000_000_000)
#: How long a period's spend hash outlives its period.
_DAY_TTL_S = 3 * 86_400
_MONTH_TTL_S = 62 * 86_400


def to_nano(usd: Decimal | float | int) -> int:
    return int((Decimal(str(usd)) * NANO).to_integral_value(rounding="ROUND_CEILING"))


def to_usd(nano: int | float | str | bytes | None) -> Decimal:
    return Decimal(int(float(nano or 0))) / NANO


def period_names(at: datetime | None = None) -> dict[str, str]:
    """The current period of each kind: ``{"day": "day:2026-12-02", "month": "month:2026-12"}``."""
    at = at or datetime.now(UTC)
    return {"day": f"day:{at:%Y-%m-%d}", "month": f"month:{at:%Y-%m}"}


# The common start of every script. KEYS[1] limits, KEYS[2] day hash, KEYS[3] month hash,
# KEYS[4] reservations hash (id -> "amount|dayhash|monthhash"), KEYS[5] lease zset (id -> expiry ms),
# KEYS[6] charged hash (expired id -> "amount|dayhash|monthhash"). Expired reservations are charged.
_PURGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%d', x) end
local function split(v)
  local a, d, m = string.match(v, '^([^|]+)|([^|]+)|(.+)$')
  return tonumber(a), d, m
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
  local v = redis.call('HGET', KEYS[4], id)
  if v then
    local amt, d, m = split(v)
    for _, h in ipairs({d, m}) do
      redis.call('HINCRBY', h, 'reserved', fmt(-amt))
      redis.call('HINCRBY', h, 'spent', fmt(amt))
      redis.call('HINCRBY', h, 'expired', 1)
    end
    redis.call('HDEL', KEYS[4], id)
    redis.call('HSET', KEYS[6], id, v)
    redis.call('EXPIRE', KEYS[6], 604800)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
"""

#: ARGV: tenant, amount (nano), reservation id, lease ms, day ttl s, month ttl s.
#: Returns {1, 'ok'|'unlimited'} or {0, period, used nano, limit nano}.
RESERVE_LUA = _PURGE + """
local lim = {day = redis.call('HGET', KEYS[1], ARGV[1] .. ':day'),
             month = redis.call('HGET', KEYS[1], ARGV[1] .. ':month')}
if not lim.day and not lim.month then return {1, 'unlimited'} end
local amount = tonumber(ARGV[2])
local hashes = {day = KEYS[2], month = KEYS[3]}
for _, p in ipairs({'day', 'month'}) do
  if lim[p] then
    local used = tonumber(redis.call('HGET', hashes[p], 'spent') or '0')
                 + tonumber(redis.call('HGET', hashes[p], 'reserved') or '0')
    if used + amount > tonumber(lim[p]) then return {0, p, used, tonumber(lim[p])} end
  end
end
local prev = redis.call('HGET', KEYS[4], ARGV[3])
local total = amount
if prev then total = total + split(prev) end
for _, h in ipairs({KEYS[2], KEYS[3]}) do redis.call('HINCRBY', h, 'reserved', fmt(amount)) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[6]))
redis.call('HSET', KEYS[4], ARGV[3], string.format('%d', total) .. '|' .. KEYS[2] .. '|' .. KEYS[3])
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[4]) + 86400000)
return {1, 'ok'}
"""

#: ARGV: reservation id, actual cost (nano). Returns {state}: 'settled', 'corrected' (it had
#: expired and been charged its worst case) or 'none' (no such reservation).
SETTLE_LUA = _PURGE + """
local actual = tonumber(ARGV[2])
local v = redis.call('HGET', KEYS[4], ARGV[1])
if v then
  local amt, d, m = split(v)
  for _, h in ipairs({d, m}) do
    redis.call('HINCRBY', h, 'reserved', fmt(-amt))
    redis.call('HINCRBY', h, 'spent', fmt(actual))
  end
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'settled'}
end
local c = redis.call('HGET', KEYS[6], ARGV[1])
if c then
  local amt, d, m = split(c)
  for _, h in ipairs({d, m}) do redis.call('HINCRBY', h, 'spent', fmt(actual - amt)) end
  redis.call('HDEL', KEYS[6], ARGV[1])
  return {'corrected'}
end
return {'none'}
"""

#: ARGV: reservation id, amount (nano). Takes ``amount`` back off the reservation (what a refused
#: sibling scope would not let it use). Returns {state}: 'ok' or 'none'.
UNRESERVE_LUA = _PURGE + """
local v = redis.call('HGET', KEYS[4], ARGV[1])
if not v then return {'none'} end
local amt, d, m = split(v)
local back = math.min(tonumber(ARGV[2]), amt)
for _, h in ipairs({d, m}) do redis.call('HINCRBY', h, 'reserved', fmt(-back)) end
if amt - back <= 0 then
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
else
  redis.call('HSET', KEYS[4], ARGV[1], fmt(amt - back) .. '|' .. d .. '|' .. m)
end
return {'ok'}
"""

#: ARGV: tenant. Returns {limit day, spent day, reserved day, expired day, limit month, ...} ('' = none).
STATE_LUA = _PURGE + """
local out = {}
for i, p in ipairs({'day', 'month'}) do
  local h = KEYS[1 + i]
  table.insert(out, redis.call('HGET', KEYS[1], ARGV[1] .. ':' .. p) or '')
  table.insert(out, redis.call('HGET', h, 'spent') or '0')
  table.insert(out, redis.call('HGET', h, 'reserved') or '0')
  table.insert(out, redis.call('HGET', h, 'expired') or '0')
end
return out
"""


@dataclass(frozen=True, slots=True)
class PeriodState:
    period: str
    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    #: Reservations charged at their worst case because their worker never settled them.
    expired: int
    #: Whose budget: a tenant's name, or :data:`FLEET`.
    scope: str = ""

    @property
    def owner(self) -> str:
        """Who has the budget, for messages: "tenant 'acme'" or "the fleet"."""
        return "the fleet" if self.scope == FLEET else f"tenant {self.scope!r}"

    @property
    def used_fraction(self) -> float:
        if self.limit_usd is None:
            return 0.0
        if self.limit_usd <= 0:
            return float("inf")
        return float((self.spent_usd + self.reserved_usd) / self.limit_usd)

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period, "limit_usd": None if self.limit_usd is None else str(self.limit_usd),
                "spent_usd": str(self.spent_usd), "reserved_usd": str(self.reserved_usd), "expired": self.expired,
                "used": round(self.used_fraction, 4) if self.limit_usd is not None else None}


@dataclass(frozen=True, slots=True)
class Refusal:
    period: str
    used_usd: Decimal
    limit_usd: Decimal
    #: Whose budget refused: the tenant's name or :data:`FLEET`.
    scope: str = ""

    @property
    def owner(self) -> str:
        """Who has the budget, for messages: "tenant 'acme'" or "the fleet"."""
        return "the fleet" if self.scope == FLEET else f"tenant {self.scope!r}"


class Budgets:
    def __init__(self, *, redis_client: redis.Redis, namespace: str, lease_s: float = 600.0) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.lease_ms = int(lease_s * 1000)
        self._reserve = redis_client.register_script(RESERVE_LUA)
        self._settle = redis_client.register_script(SETTLE_LUA)
        self._state = redis_client.register_script(STATE_LUA)
        self._unreserve = redis_client.register_script(UNRESERVE_LUA)

    @classmethod
    def for_settings(cls, settings: Any, *, timeout_s: float | None = None) -> Budgets | None:
        url = settings.shared_redis_url
        if not url:
            return None
        from tars_tasks.redis_client import get_redis

        return cls(redis_client=get_redis(url, settings=settings, timeout_s=timeout_s), namespace=settings.namespace,
                   lease_s=settings.budget_reservation_lease_s)

    def _keys(self, tenant: str, at: datetime | None = None) -> list[str]:
        ns, p = self.namespace, period_names(at)
        return [budget_limits_key(ns), budget_key(ns, tenant, p["day"]), budget_key(ns, tenant, p["month"]),
                f"{ns}:budget:res:{tenant}", f"{ns}:budget:lease:{tenant}", f"{ns}:budget:charged:{tenant}"]

    # --- limits -------------------------------------------------------------------------------

    def set_limit(self, *, tenant: str, period: str, usd: Decimal | None) -> None:
        """Set (``usd``) or remove (None) a tenant's limit for ``period`` ("day" or "month")."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}")
        field = f"{tenant}:{period}"
        if usd is None:
            self.redis.hdel(budget_limits_key(self.namespace), field)
        else:
            self.redis.hset(budget_limits_key(self.namespace), field, to_nano(usd))

    def tenants(self) -> list[str]:
        fields = self.redis.hkeys(budget_limits_key(self.namespace))
        return sorted({(f.decode() if isinstance(f, bytes) else f).rsplit(":", 1)[0] for f in fields})

    # --- state --------------------------------------------------------------------------------

    def state(self, tenant: str, *, at: datetime | None = None) -> list[PeriodState]:
        return self._periods(tenant, self._state(keys=self._keys(tenant, at), args=[tenant]), at=at)

    def states(self, scopes: Sequence[str], *, at: datetime | None = None) -> dict[str, list[PeriodState]]:
        """:meth:`state` of several tenants (and :data:`FLEET`) in one round trip."""
        scopes = list(dict.fromkeys(scopes))
        if len(scopes) == 1:
            return {scopes[0]: self.state(scopes[0], at=at)}
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            queue_script(pipe, self._state, keys=self._keys(scope, at), args=[scope])
        return {scope: self._periods(scope, raw, at=at) for scope, raw in zip(scopes, pipe.execute(), strict=True)}

    def _periods(self, tenant: str, raw: Sequence[Any], *, at: datetime | None) -> list[PeriodState]:
        raw = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
        names = period_names(at)
        out = []
        for i, p in enumerate(PERIODS):
            lim, spent, reserved, expired = raw[4 * i: 4 * i + 4]
            out.append(PeriodState(period=names[p], limit_usd=to_usd(lim) if lim else None, spent_usd=to_usd(spent),
                                   reserved_usd=to_usd(reserved), expired=int(expired), scope=tenant))
        return out

    def used_fraction(self, tenant: str) -> float:
        """The largest share of any of the tenant's limits spent or reserved (0: no limits)."""
        return max((s.used_fraction for s in self.state(tenant)), default=0.0)

    def fleet_burn(self) -> float:
        """The fleet-wide budget's share spent or reserved (0 without one): the fleet mode's
        ``budget_burn`` signal. A tenant's own budget is enforced for that tenant alone."""
        return self.used_fraction(FLEET)

    # --- reserve and settle ----------------------------------------------------------------------

    def reserve(self, *, tenant: str, reservation_id: str, usd: Decimal) -> Refusal | None:
        """Reserve ``usd`` more under ``reservation_id`` against the tenant's budget and the fleet's
        (:data:`FLEET`), both or neither; a :class:`Refusal` if a limit forbids it."""
        refusal, _held = self.reserve_held(tenant=tenant, reservation_id=reservation_id, usd=usd)
        return refusal

    def reserve_held(self, *, tenant: str, reservation_id: str, usd: Decimal) -> tuple[Refusal | None, bool]:
        """:meth:`reserve`, and whether anything is now held: False when neither the tenant nor the
        fleet has a limit (the scripts recorded no reservation, so there is nothing to settle and the
        settle's round trip can be skipped — its answer would be ``none``)."""
        scopes = [tenant] if tenant == FLEET else [tenant, FLEET]
        pipe = self.redis.pipeline(transaction=True)
        for scope in scopes:
            queue_script(pipe, self._reserve, keys=self._keys(scope),
                         args=[scope, to_nano(usd), reservation_id, self.lease_ms, _DAY_TTL_S, _MONTH_TTL_S])
        results = pipe.execute()
        refused = next(((scope, r) for scope, r in zip(scopes, results, strict=True) if int(r[0]) != 1), None)
        if refused is None:
            return None, any(_s(r[1]) != "unlimited" for r in results)
        for scope, r in zip(scopes, results, strict=True):  # give back what the other scope granted
            if int(r[0]) == 1 and _s(r[1]) == "ok":
                self._unreserve(keys=self._keys(scope), args=[reservation_id, to_nano(usd)])
        scope, res = refused
        return Refusal(period=_s(res[1]), used_usd=to_usd(res[2]), limit_usd=to_usd(res[3]), scope=scope), False

    def settle(self, *, tenant: str, reservation_id: str, usd: Decimal) -> str:
        """Release the reservation and add the real cost (the tenant's and the fleet's); returns the
        tenant's settled / corrected / none."""
        scopes = [tenant] if tenant == FLEET else [tenant, FLEET]
        pipe = self.redis.pipeline(transaction=True)
        for scope in scopes:
            queue_script(pipe, self._settle, keys=self._keys(scope), args=[reservation_id, to_nano(usd)])
        (state, *_), *_ = pipe.execute()
        return _s(state)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
