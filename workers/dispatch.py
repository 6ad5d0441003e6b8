"""Dispatch: where requests wait when a rate limit binds, so that priority and fairness apply.

Repairs the priority inversion of issue 9: a worker slot that takes a message and then waits in
the limiter holds the slot, and the waits end in greenlet order, not priority order. Here a
request waits in **staging** (Redis lists in front of the Celery queues) and is moved into its
Celery queue list only when the fleet-wide limits will let its call go out within
``horizon_s`` (about one dispatcher tick). The full design: ``docs/DISPATCH.md``.

Two Lua scripts, each one atomic step:

* ``stage`` (producer side, :meth:`Staging.stage`): appends entries to the list of their
  (tier, TARS priority, tenant), keeps the round-robin ring of tenants with work at each
  priority, and the tier's staged count.
* ``dispatch`` (worker side, :meth:`Dispatcher.dispatch`): moves up to ``max_moves`` entries
  into the Celery queue lists, in strict priority order (9 first), weighted deficit round robin
  across the tenants at one priority, reserving for every moved message the model's fleet-wide
  RPM + TPM (the same GCRA hash as :class:`workers.ratelimit.FleetRateLimiter`, so worker-side
  acquires and dispatch share one limit) and the tenant's own RPM/TPM and per-(tenant, tier)
  limits. A tenant at its limit is skipped (its entries stay staged, in order, and take none of
  the model's capacity); the model at its limit stops the step. ``max_ready`` caps the Celery
  lists' ready depth (about the caller's free slots), so an unconstrained flood waits in staging
  too, not in the FIFO Celery list.

A moved message has its **first attempt's** capacity reserved: the worker must not acquire the
limiter again for that attempt. Retries, fallbacks, redeliveries and messages that never went
through staging use ``FleetRateLimiter.acquire`` as before.

Delivery: staging is part of the broker's state. An entry is either staged or in a Celery list,
never both and never neither (one script moves it); a dispatcher killed at any point loses
nothing, because Redis runs a script to completion or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis

from config.catalog import Catalog, ModelSpec
from config.keys import (
    budget_limits_key,
    queue_for_tier,
    ratelimit_key,
    stage_count_key,
    stage_prefix,
    stage_wake_channel,
    tenant_config_key,
    tenant_limit_prefix,
)
from config.tenants import TenantConfig
from tars_tasks.errors import InvalidRequest
from tars_tasks.redis_client import PubSubWatch
from tars_tasks.staging import (  # noqa: F401 - the producer's half, re-exported for the worker side and tests
    PRIORITIES,
    STAGE_BATCH_MAX,
    STAGE_LUA,
    STAGED_HEADER,
    StagedMessage,
    Staging,
    staged_tokens,
)

log = logging.getLogger(__name__)

_US_PER_S = 1_000_000
#: A dispatcher moves a message only if its reserved slot is due within this horizon.
DEFAULT_HORIZON_S = 0.05
#: A dispatcher loop ticks at least this often when it has nothing better to wait for.
DEFAULT_TICK_S = 0.02
#: Most messages one dispatch call moves (one script run; keeps Redis responsive).
DEFAULT_BATCH_MAX = 200
#: A loop whose tiers are all at their models' limits sleeps until the next slot, but at most this.
MODEL_LIMIT_SLEEP_MAX_S = 1.0
#: After a wake (a slot freed), how long the loop waits for more slots to free before it steps.
WAKE_COALESCE_S = 0.002
#: How long a dispatcher's listener for staging wakes blocks per read (it checks for stop between).
LISTEN_POLL_S = 1.0
#: After its subscription broke, the listener subscribes again after this long.
LISTEN_RETRY_S = 1.0
#: How often a dispatcher loop re-writes the tenant configuration into Redis (it survives a
#: Redis restart without persistence this way).
TENANT_CONFIG_REFRESH_S = 30.0
#: Seconds between two exact counts of the requests a worker holds (:class:`HeldRequests`).
HELD_REFRESH_S = 0.1


def celery_list(queue: str, priority: int) -> str:
    """The Redis list kombu's transport uses for ``queue`` at a TARS ``priority``.

    The mapping lives in :func:`config.keys.priority_list` (TARS 5 is the bare queue name).
    """
    if priority not in PRIORITIES:
        raise InvalidRequest(f"priority {priority!r} is out of range 0..9", field="priority")
    from config.keys import priority_list

    return priority_list(queue, priority)


def estimated_tokens(*, spec: ModelSpec, prompt: str) -> int:
    """Tokens a first attempt of a bare prompt reserves (:func:`tars_tasks.staging.staged_tokens`)."""
    return staged_tokens(spec=spec, prompt=prompt)


# --- the scripts ---------------------------------------------------------------------------------

#: KEYS[1] = the model's limiter hash (workers/ratelimit.py), KEYS[2] = the tenant config hash,
#: KEYS[3] = the tier's staged count.
#: ARGV: 1 staging prefix, 2 tier, 3 now µs ('' = Redis TIME), 4 max moves, 5 max ready depth
#: (-1 = no cap), 6 horizon µs, 7 model µs per request, 8 model µs per token, 9 model token
#: correction applied first (deferred FleetRateLimiter.adjust_tokens), 10 limit window µs,
#: 11 utilisation, 12 default weight, 13 default tenant rpm, 14 default tenant tpm, 15 default
#: tenant-tier rpm, 16 default tenant-tier tpm (0 = none), 17 tenant limit key prefix,
#: 18..27 the Celery list of TARS priority 0..9.
#: Returns {moved (requests), reason, wait µs, staged left, the script's now µs, then per moved
#: entry: id, tenant, priority, tokens, slot µs from now, requests (a bundle's members; else 1)}.
#: reason: 'empty' | 'batch' | 'ready_cap' | 'model_limit' |
#: 'tenant_limit' (wait = until the model's / the earliest blocked tenant's next slot).
DISPATCH_LUA = """
-- Times are whole µs on Redis' clock (~1.7e15: a double's step there is 0.25 µs, so fractions
-- would be lost). Every cost is rounded up to whole µs before it is added: never early.
local now
if ARGV[3] ~= '' then now = tonumber(ARGV[3]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local prefix, tier = ARGV[1], ARGV[2]
local max_moves, max_ready, horizon = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local m_req, m_tok = tonumber(ARGV[7]), tonumber(ARGV[8])
local window, util = tonumber(ARGV[10]), tonumber(ARGV[11])
local dflt = {w = tonumber(ARGV[12]), rpm = tonumber(ARGV[13]), tpm = tonumber(ARGV[14]),
              trpm = tonumber(ARGV[15]), ttpm = tonumber(ARGV[16])}
local tlp = ARGV[17]
local lists = {}
for p = 0, 9 do lists[p] = ARGV[18 + p] end

-- Fast paths, the common case of a worker's tick: nothing staged; the model at its limit.
local staged0 = tonumber(redis.call('GET', KEYS[3]) or '0')
if staged0 <= 0 then return {0, 'empty', '0', staged0, string.format('%d', now)} end
local mv = redis.call('HMGET', KEYS[1], 'r', 't')
local mr, mt = tonumber(mv[1] or '0'), tonumber(mv[2] or '0')
local credit = tonumber(ARGV[9])
local model_dirty = false
if credit ~= 0 then mt = math.max(mt + math.ceil(credit * m_tok), now); model_dirty = true end
local function save_model()
  redis.call('HSET', KEYS[1], 'r', string.format('%d', math.ceil(mr)), 't', string.format('%d', math.ceil(mt)))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(mr, mt) - now) / 1000) + 60000)
end
if math.max(now, mr, mt) - now > horizon then
  if model_dirty then save_model() end
  return {0, 'model_limit', string.format('%d', math.max(now, mr, mt) - now), staged0, string.format('%d', now)}
end

-- The ready-depth cap counts, for an entry of priority P, the ready messages served no later
-- than it (the Celery lists of priority >= P): a backlog of plain-Celery messages at normal
-- priority does not keep a staged high-priority entry out of its list.
local budget = max_moves
local ahead = {}
if max_ready >= 0 then
  local seen, acc = {}, 0
  for p = 9, 0, -1 do
    local l = lists[p]
    if not seen[l] then seen[l] = true; acc = acc + redis.call('LLEN', l) end
    ahead[p] = acc
  end
  budget = math.min(budget, max_ready - ahead[9])
end
if budget <= 0 then
  if model_dirty then save_model() end
  return {0, 'ready_cap', '0', staged0, string.format('%d', now)}
end

local states = {}
local function state(key, rpm, tpm)
  local s = states[key]
  if s then return s end
  local v = redis.call('HMGET', key, 'r', 't')
  s = {key = key, r = tonumber(v[1] or '0'), t = tonumber(v[2] or '0'),
       ri = (rpm > 0) and window / (rpm * util) or 0, ti = (tpm > 0) and window / (tpm * util) or 0,
       dirty = false}
  states[key] = s
  return s
end
local cfgs = {}
local function cfg(tenant)
  local c = cfgs[tenant]
  if c then return c end
  local v = redis.call('HMGET', KEYS[2], 'w:' .. tenant, 'rpm:' .. tenant, 'tpm:' .. tenant,
                       'rpm:' .. tenant .. ':' .. tier, 'tpm:' .. tenant .. ':' .. tier)
  if v[1] then
    c = {w = tonumber(v[1]), rpm = tonumber(v[2] or '0'), tpm = tonumber(v[3] or '0'),
         trpm = tonumber(v[4] or '0'), ttpm = tonumber(v[5] or '0')}
  else
    c = {w = dflt.w, rpm = dflt.rpm, tpm = dflt.tpm, trpm = dflt.trpm, ttpm = dflt.ttpm}
  end
  if c.rpm > 0 or c.tpm > 0 then c.lk = state(tlp .. tenant, c.rpm, c.tpm) end
  if c.trpm > 0 or c.ttpm > 0 then c.tk = state(tlp .. tenant .. ':' .. tier, c.trpm, c.ttpm) end
  cfgs[tenant] = c
  return c
end
local function reserve(s, start, tokens)
  s.r = start + math.ceil(s.ri); s.t = start + math.ceil(tokens * s.ti); s.dirty = true
end

-- Tenants parked at their own limits rejoin their ring (at the tail) once their own next slot is
-- no later than the model's next slot.
local parked = prefix .. ':parked'
for _, member in ipairs(redis.call('ZRANGEBYSCORE', parked, '-inf', math.max(now, mr, mt))) do
  redis.call('ZREM', parked, member)
  local sep = string.find(member, ':', 1, true)
  redis.call('RPUSH', prefix .. ':ring:' .. string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
end

local moved, out = 0, {}
local reason, wait = nil, 0
local guard = 0
for prio = 9, 0, -1 do
  if moved >= budget or reason then break end
  local ring = prefix .. ':ring:' .. prio
  local dkey = prefix .. ':deficit:' .. prio
  while moved < budget do
    if max_ready >= 0 and ahead[prio] + moved >= max_ready then reason = 'ready_cap'; break end
    -- Bound one script's run (parking many tenants at once, tiny weights): stop as if the batch
    -- were done, so the caller steps again at once and Redis serves other clients meanwhile.
    guard = guard + 1
    if guard > 256 + 4 * budget then reason = 'batch'; break end
    local tenant = redis.call('LINDEX', ring, 0)
    if not tenant then break end
    local q = prefix .. ':q:' .. prio .. ':' .. tenant
    local head = redis.call('LINDEX', q, 0)
    if not head then
      redis.call('LPOP', ring); redis.call('HDEL', dkey, tenant)
    else
      local s1 = string.find(head, '|', 1, true)
      local s2 = string.find(head, '|', s1 + 1, true)
      local tokfield = string.sub(head, 1, s1 - 1)
      local start = math.max(now, mr, mt)
      if start - now > horizon then reason = 'model_limit'; wait = start - now; break end
      local c = cfg(tenant)
      local own = 0
      if c.lk then own = math.max(own, c.lk.r, c.lk.t) end
      if c.tk then own = math.max(own, c.tk.r, c.tk.t) end
      if own > start then
        -- The tenant's own next slot comes after the model's: the model's slot goes to someone
        -- else (taking it later would leave a hole in the model's schedule). The tenant leaves
        -- the ring until its slot; its turn is forfeited; its entries stay staged in order.
        redis.call('LPOP', ring)
        redis.call('ZADD', parked, string.format('%d', math.ceil(own)), prio .. ':' .. tenant)
        redis.call('HDEL', dkey, tenant)
      else
        local d = tonumber(redis.call('HGET', dkey, tenant) or '0')
        if d < 1 then d = d + c.w end
        if d < 1 then
          redis.call('HSET', dkey, tenant, tostring(d))
          redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        else
          redis.call('LPOP', q)
          redis.call('LPUSH', lists[prio], string.sub(head, s2 + 1))
          -- One slot per request: a bundle's members (comma-separated tokens) get the slots k
          -- single moves would get, one after the other (only the first within the horizon; the
          -- rest wait in the worker that takes the bundle, at most the bundle's own span). A member
          -- the tenant's own limit would push past the model's next slot (a hole in the model's
          -- schedule) is not reserved, nor those after it: slot '0', the worker acquires for them.
          local slots, tokens, k, at, held = {}, 0, 0, start, true
          for tok in string.gmatch(tokfield, '[^,]+') do
            local t = tonumber(tok)
            if k > 0 and held then
              at = math.max(now, mr, mt)
              local own_j = 0
              if c.lk then own_j = math.max(own_j, c.lk.r, c.lk.t) end
              if c.tk then own_j = math.max(own_j, c.tk.r, c.tk.t) end
              if own_j > at then held = false end
            end
            k = k + 1
            if held then
              mr = at + math.ceil(m_req); mt = at + math.ceil(t * m_tok)
              if c.lk then reserve(c.lk, at, t) end
              if c.tk then reserve(c.tk, at, t) end
              tokens = tokens + t; slots[k] = string.format('%d', math.ceil(at))
            else
              slots[k] = '0'
            end
          end
          d = d - k; moved = moved + k
          local n = #out
          -- the slot(s), for the worker that takes the message: sent much later, it gives a slot up
          local eid = string.sub(head, s1 + 1, s2 - 1)
          redis.call('HSET', prefix .. ':slots', eid, table.concat(slots, ','))
          out[n + 1] = eid; out[n + 2] = tenant; out[n + 3] = prio
          out[n + 4] = tokens; out[n + 5] = string.format('%d', math.ceil(start - now)); out[n + 6] = k
          if redis.call('LLEN', q) == 0 then
            redis.call('LPOP', ring); redis.call('HDEL', dkey, tenant)
          elseif d < 1 then
            redis.call('HSET', dkey, tenant, tostring(d))
            redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
          else
            redis.call('HSET', dkey, tenant, tostring(d))
          end
        end
      end
    end
  end
end

if moved > 0 or model_dirty then save_model() end
for _, s in pairs(states) do
  if s.dirty then
    redis.call('HSET', s.key, 'r', string.format('%d', math.ceil(s.r)), 't', string.format('%d', math.ceil(s.t)))
    redis.call('PEXPIRE', s.key, math.ceil((math.max(s.r, s.t) - now) / 1000) + 60000)
  end
end
local staged = staged0
if moved > 0 then
  staged = redis.call('DECRBY', KEYS[3], moved)
  redis.call('PEXPIRE', prefix .. ':slots', 3600000)
end
if not reason then
  if moved >= budget then
    if budget < max_moves then reason = 'ready_cap' else reason = 'batch' end
  else
    local first = redis.call('ZRANGE', parked, 0, 0, 'WITHSCORES')
    if first[2] then reason = 'tenant_limit'; wait = math.max(tonumber(first[2]) - now, 0)
    else reason = 'empty' end
  end
end
local reply = {moved, reason, string.format('%d', wait), staged, string.format('%d', now)}
for i = 1, #out do reply[#reply + 1] = out[i] end
return reply
"""


# --- worker side ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one moved message had reserved: its first attempt's slot and tokens."""

    id: str
    tenant: str
    priority: int
    tokens: int
    #: The reserved slot on Redis' clock (µs since the epoch), and seconds from the step to it (0 .. horizon);
    #: a bundle's first member's (the others' follow it, recorded for the worker).
    slot_us: int
    slot_in_s: float
    #: Requests the message carries (a bundle's members; else 1), each with its own slot.
    requests: int = 1


@dataclass(frozen=True, slots=True)
class DispatchResult:
    moved: list[Reservation]
    #: Why the step stopped: "empty" (nothing movable staged), "batch" (``max_moves`` reached),
    #: "ready_cap" (the Celery lists hold ``max_ready``), "model_limit" (the model's next slot is
    #: beyond the horizon), "tenant_limit" (what is left belongs to tenants at their limits).
    reason: str
    #: model_limit / tenant_limit: seconds until the next slot of the model / the soonest tenant.
    wait_s: float
    #: Entries still staged in the tier after the step.
    staged: int
    #: The step's clock (Redis TIME, µs since the epoch).
    at_us: int = 0


@dataclass(frozen=True, slots=True)
class LimitWindow:
    """The limiter's window and utilisation (``TARS_RATELIMIT_WINDOW_S`` / ``_UTILISATION``)."""

    window_s: float = 60.0
    utilisation: float = 1.0


@dataclass
class Dispatcher:
    """The worker's side: move staged messages of a tier into its Celery queue lists.

    ``catalog`` must be the *effective* catalog (provider overrides applied, as
    ``ModelCaller.catalog``), so the model's limiter key is the one the worker's calls use.
    """

    redis_client: redis.Redis
    namespace: str
    catalog: Catalog
    tenants: TenantConfig = field(default_factory=TenantConfig)
    limits: LimitWindow = field(default_factory=LimitWindow)
    horizon_s: float = DEFAULT_HORIZON_S
    #: The worker's limiter, if any: its deferred token corrections for the model ride along.
    limiter: object | None = None

    def __post_init__(self) -> None:
        self._script = self.redis_client.register_script(DISPATCH_LUA)

    def model_key(self, tier: str) -> str:
        spec = self.catalog.spec(tier)
        return ratelimit_key(self.namespace, spec.provider, spec.model)

    def publish_tenant_config(self) -> None:
        """Write the tenant configuration into Redis (replacing what was there), atomically."""
        key = tenant_config_key(self.namespace)
        fields = self.tenants.redis_fields()
        pipe = self.redis_client.pipeline(transaction=True)
        pipe.delete(key)
        if fields:
            pipe.hset(key, mapping=fields)
        pipe.execute()

    def dispatch(self, *, tier: str, max_moves: int, max_ready: int | None = None,
                 now_us: int | None = None) -> DispatchResult:
        """One atomic step: move up to ``max_moves`` staged messages of ``tier`` into its Celery
        lists (at most until they hold ``max_ready`` ready messages; ``None`` = no cap), reserving
        each one's first call. ``now_us`` replaces Redis' clock (tests only)."""
        if max_moves <= 0:  # nothing asked for: as if the ready lists were full
            staged = int(self.redis_client.get(stage_count_key(self.namespace, tier)) or 0)
            return DispatchResult(moved=[], reason="ready_cap", wait_s=0.0, staged=staged)
        spec = self.catalog.spec(tier)
        window_us = self.limits.window_s * _US_PER_S
        req_us = window_us / (spec.rpm * self.limits.utilisation)
        tok_us = window_us / (spec.tpm * self.limits.utilisation)
        d = self.tenants.defaults
        dtier = d.tiers.get(tier)
        key = self.model_key(tier)
        credit = self._take_credit(key)
        queue = queue_for_tier(tier)
        args: list[str | int] = [
            stage_prefix(self.namespace, tier), tier, "" if now_us is None else str(now_us), max_moves,
            -1 if max_ready is None else max(0, max_ready), repr(self.horizon_s * _US_PER_S), repr(req_us),
            repr(tok_us), credit, repr(window_us), repr(self.limits.utilisation), repr(float(d.weight)), d.rpm,
            d.tpm, dtier.rpm if dtier else 0, dtier.tpm if dtier else 0, tenant_limit_prefix(self.namespace),
            *(celery_list(queue, p) for p in PRIORITIES),
        ]
        try:
            reply = self._script(keys=[key, tenant_config_key(self.namespace),
                                       stage_count_key(self.namespace, tier)], args=args)
        except BaseException:
            self._give_back_credit(key, credit)
            raise
        n, reason, wait_us, staged, at_us = (int(reply[0]), _s(reply[1]), int(reply[2]), int(reply[3]),
                                             int(reply[4]))
        rest = reply[5:]
        moved = [Reservation(id=_s(rest[i]), tenant=_s(rest[i + 1]), priority=int(rest[i + 2]),
                             tokens=int(rest[i + 3]), slot_us=at_us + int(rest[i + 4]),
                             slot_in_s=int(rest[i + 4]) / _US_PER_S, requests=int(rest[i + 5]))
                 for i in range(0, len(rest), 6)]
        assert sum(r.requests for r in moved) == n, (n, moved)
        return DispatchResult(moved=moved, reason=reason, wait_s=wait_us / _US_PER_S, staged=staged, at_us=at_us)

    def _take_credit(self, key: str) -> int:
        take = getattr(self.limiter, "take_pending", None)
        return int(take(key)) if take is not None else 0

    def _give_back_credit(self, key: str, credit: int) -> None:
        if credit and self.limiter is not None:
            self.limiter.return_pending(key, credit)  # type: ignore[attr-defined]


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class HeldRequests:
    """How many requests a worker holds (prefetched or running), for its dispatcher's free slots.

    Exactly, it is a walk over Celery's reserved requests, a bundle counting its members
    (``count``); made at every dispatch step, that walk was 6.6% of a worker's py-spy samples at C = 1,000
    (py-spy, 2026-12-07). So :meth:`free` walks at most every ``refresh_s`` and in between adds what
    the worker received since (:meth:`received`, from Celery's ``task_received``), never subtracting
    what finished: the count errs high only, the free slots it gives err low only, and where they
    are below ``exact_below`` (they could bind a step) they are walked again, exactly. A message
    received just before a walk may join Celery's reserved requests just after it (``task_received``
    comes first; with a threads pool the walk may run in between), so what was received before a
    walk is still added until the walk after it.
    """

    def __init__(self, *, count: Callable[[], int], refresh_s: float = HELD_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._walked = 0
        #: Requests received since the last walk, and between the two walks before it.
        self._since = 0
        self._before = 0
        self._walked_at = -float("inf")

    def received(self, n: int) -> None:
        """The worker received a message standing for ``n`` requests."""
        with self._lock:
            self._since += n

    def exact(self) -> int:
        """The walk: requests held now (what :meth:`free` adds to it, see above, starts again)."""
        with self._lock:
            self._before, self._since = self._since, 0
        walked = self._count()
        self._walked, self._walked_at = walked, self._clock()
        return walked

    def free(self, concurrency: int, *, exact_below: int) -> int:
        """``concurrency`` less the requests held: exact if below ``exact_below``, else at most that."""
        if self._clock() - self._walked_at < self._refresh_s:
            free = concurrency - self._walked - self._before - self._since
            if free >= exact_below:
                return free
        walked = self.exact()
        # exact for this step: what was received just before the walk and is not among the reserved
        # yet is counted from the next step on (and a step's moves arrive after it anyway)
        return concurrency - walked


class DispatchLoop:
    """A worker's dispatcher: one thread (a greenlet under gevent) stepping every tier it consumes.

    ``free_slots()`` answers how many more messages the worker could start now (its free
    slots); it caps one step's moves (shared by the tiers, in the order given) and the ready
    depth of each tier's Celery lists.
    ``wake()`` makes the loop step at once instead of at its next tick; ``slot_freed()`` (a task
    finished) does so only if the last step was held back by the free slots;
    ``staged(tier)`` (a producer staged in ``tier``: :meth:`listen` hears it on
    :func:`config.keys.stage_wake_channel`) does too, and asks that tier even if it was found
    empty within the tick.
    The loop never raises: a Redis error is logged and retried after a tick, like kombu's own
    reconnects.
    """

    def __init__(self, *, dispatcher: Dispatcher, tiers: Sequence[str], free_slots: Callable[[], int],
                 tick_s: float = DEFAULT_TICK_S, batch_max: int = DEFAULT_BATCH_MAX,
                 on_result: Callable[[str, DispatchResult], None] | None = None,
                 held: HeldRequests | None = None) -> None:
        self.dispatcher = dispatcher
        #: What ``free_slots`` counts, told of each message the worker receives (:meth:`received`).
        self.held = held
        self.tiers = list(tiers)
        self.free_slots = free_slots
        self.tick_s = tick_s
        self.batch_max = batch_max
        self.on_result = on_result
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._config_written = 0.0
        #: tier -> time.monotonic() before which a tier found with nothing staged is not asked again
        self._idle_until: dict[str, float] = {}
        #: Whether the last step left work staged for want of free slots (then a freed slot matters).
        self._slot_bound = False
        #: Tiers a staging wake named since their last dispatch began: a step that found one of
        #: them empty does not mark it idle (what was staged meanwhile moves at the next step).
        self._woken: set[str] = set()

    def start(self) -> DispatchLoop:
        self._thread = threading.Thread(target=self.run, name="tars-dispatch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in (self._thread, self._listener):
            if t is not None:
                t.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    @property
    def slot_bound(self) -> bool:
        """Whether the last step left work staged for want of this worker's free slots."""
        return self._slot_bound

    def slot_freed(self) -> None:
        """A task finished: step at once if the last step was held back by the free slots (a full
        worker, a ready cap, a batch cut at the slots); else the slot changes nothing a step would
        see (new work wakes the loop through :meth:`staged`), and the loop is left asleep."""
        if self._slot_bound:
            self._wake.set()

    def received(self, request) -> None:
        """The worker received ``request`` (Celery's ``task_received``)."""
        if self.held is not None:
            self.held.received(_requests_in(request))

    def staged(self, tier: str) -> None:
        """Entries were staged in ``tier``: step it at once (no-op for a tier not stepped here)."""
        if tier in self.tiers:
            self._woken.add(tier)
            self._idle_until.pop(tier, None)
            self._wake.set()

    def listen(self, *, redis_client: redis.Redis, namespace: str) -> DispatchLoop:
        """Hear producers' staging (:func:`config.keys.stage_wake_channel`) until :meth:`stop`.
        A lost subscription (Redis restarted, connection dropped) is made again after a second,
        and once it is confirmed every tier is stepped: what was staged unheard moves then, no wake
        is lost for longer than that (and the loop's tick bounds it anyway)."""
        self._listener = threading.Thread(target=self._listen, args=(redis_client, stage_wake_channel(namespace)),
                                          name="tars-dispatch-wakes", daemon=True)
        self._listener.start()
        return self

    def _listen(self, client: redis.Redis, channel: str) -> None:
        while not self._stop.is_set():
            pubsub = client.pubsub()
            # a frozen connection is dropped (and subscribed again), not waited on for ever
            watch = (PubSubWatch(pubsub) if pubsub.connection_pool.connection_kwargs.get("health_check_interval")
                     else None)
            try:
                pubsub.subscribe(channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if watch is not None:
                        watch.check()
                    if msg is None:
                        continue
                    if msg.get("type") == "message":
                        self.staged(_s(msg["data"]))
                    elif msg.get("type") == "subscribe":  # (re)subscribed: what was staged unheard moves now
                        for tier in self.tiers:
                            self.staged(tier)
            except Exception as exc:  # never ends the listener: Redis errors, and anything else
                log.warning("staging wakes unheard (%s); the dispatcher steps at its tick meanwhile", exc)
                self._stop.wait(LISTEN_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def step(self) -> float:
        """Step every tier once; return how long to sleep before the next step."""
        now = time.monotonic()
        if now - self._config_written >= TENANT_CONFIG_REFRESH_S:
            self.dispatcher.publish_tenant_config()
            self._config_written = now
        sleeps = []
        slot_bound = False
        free = self.free_slots()  # shared by the tiers of this worker: what one tier got, the next cannot
        for tier in self.tiers:
            if free <= 0:
                slot_bound = True
                sleeps.append(self.tick_s)  # a finishing task wakes the loop sooner
                continue
            idle_left = self._idle_until.get(tier, 0.0) - now
            if idle_left > 0:
                # Nothing was staged for this tier at its last step: a freed slot (a wake) does not
                # stage anything, so it is asked again at its tick, not at every finishing task
                # (with one busy tier and two idle ones, two of every three scripts were idle ones).
                sleeps.append(idle_left)
                continue
            self._woken.discard(tier)
            result = self.dispatcher.dispatch(tier=tier, max_moves=min(free, self.batch_max), max_ready=free)
            if result.reason == "empty" and result.staged <= 0 and tier not in self._woken:
                self._idle_until[tier] = now + self.tick_s
            else:
                self._idle_until.pop(tier, None)
            free -= sum(r.requests for r in result.moved)
            if result.reason == "ready_cap" or (result.reason == "batch" and free <= 0):
                slot_bound = True
            if self.on_result is not None:
                self.on_result(tier, result)
            until_slot = max(result.wait_s - self.dispatcher.horizon_s, 0.001)
            if result.reason == "batch":
                sleeps.append(0.0)
            elif result.reason == "model_limit":
                # Nothing of this tier can move before the model's next slot, whatever is staged meanwhile.
                sleeps.append(min(until_slot, MODEL_LIMIT_SLEEP_MAX_S))
            elif result.reason == "tenant_limit":
                sleeps.append(min(self.tick_s, until_slot))  # another tenant's new work may come sooner
            else:
                sleeps.append(self.tick_s)
        self._slot_bound = slot_bound
        return min(sleeps, default=self.tick_s)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                sleep_s = self.step()
            except Exception:
                log.exception("dispatch step failed; retrying in %.2fs", self.tick_s)
                sleep_s = self.tick_s
            if sleep_s > 0:
                if self._wake.wait(sleep_s) and not self._stop.is_set():
                    # Woken by a finishing task: let the tasks finishing with it free their slots
                    # too, so one step refills several (one script per slot otherwise).
                    self._stop.wait(WAKE_COALESCE_S)
                self._wake.clear()


# --- in a worker ---------------------------------------------------------------------------------

#: Pools whose tasks run in the worker's own process (its limiter's deferred corrections ride along).
_IN_PROCESS_POOLS = ("gevent", "eventlet", "threads", "solo")


def runs_in_process(pool: object) -> bool:
    """Whether a Celery pool runs its tasks in the process that fetches them."""
    return any(p in type(pool).__module__ for p in _IN_PROCESS_POOLS)


def consumed_tiers(consumer) -> list[str]:
    """The tiers whose queues a Celery consumer consumes (``tars.{tier}``), highest tier first."""
    from config.keys import TIERS

    names = set(consumer.app.amqp.queues.consume_from or consumer.app.amqp.queues)
    return [t for t in reversed(TIERS) if queue_for_tier(t) in names]


def _requests_in(request) -> int:
    """Requests a Celery request held by the worker stands for (a bundle's members; else 1)."""
    from config.keys import TASK_RUN_BUNDLE

    if getattr(request, "name", None) != TASK_RUN_BUNDLE:
        return 1
    ids = (getattr(request, "kwargs", None) or {}).get("request_ids")
    return len(ids) if isinstance(ids, list) and ids else 1


def _members_done() -> Callable[[], int]:
    from workers.agent import members_done

    return members_done


def start_for_worker(*, consumer, settings) -> DispatchLoop | None:
    """Start this worker process's dispatcher for the tiers it consumes (at ``worker_ready``).

    Its free slots are the pool's concurrency less the requests the worker holds (prefetched or
    running): a worker pulls from staging only what it can start now. Needs a Redis broker
    (staging lives there); returns None otherwise.
    """
    from celery.worker import state

    from config.catalog import load_catalog
    from config.tenants import load_tenants
    from tars_tasks.redis_client import get_redis

    if settings.broker_redis_url is None:
        return None
    tiers = consumed_tiers(consumer)
    if not tiers:
        return None
    concurrency = int(getattr(consumer.pool, "limit", None) or settings.worker_concurrency)
    limiter = None
    if runs_in_process(consumer.pool):
        from workers.agent import get_agent

        caller = get_agent().caller
        catalog = caller.catalog
        if settings.ratelimit_redis_url == settings.broker_redis_url:  # one limiter state: the same hash
            limiter = caller.limiter
            if limiter is not None:  # the task reads its slot where it was fetched: with its unacked record
                from tars_tasks.broker import slots

                # the budgets' limits are counted there too when they live in the same Redis
                limits = (budget_limits_key(settings.namespace)
                          if settings.shared_redis_url == settings.broker_redis_url else None)
                slots.enable(namespace=settings.namespace, budget_limits_key=limits)
    else:
        catalog = load_catalog(settings.catalog_path).with_overrides(provider=settings.provider_override,
                                                                     base_url=settings.provider_base_url)
    # Without a fleet limiter the dispatcher does not pace either (a vanishing window: no limit binds).
    window = LimitWindow(window_s=settings.ratelimit_window_s if settings.ratelimit_enabled else 1e-9,
                         utilisation=settings.ratelimit_utilisation)
    dispatcher = Dispatcher(redis_client=get_redis(settings.broker_redis_url), namespace=settings.namespace,
                            catalog=catalog, tenants=load_tenants(settings.tenants_path), limits=window,
                            horizon_s=settings.dispatch_horizon_s, limiter=limiter)

    held = None
    if settings.bundle_max > 1:  # a bundle held stands for its members (tars_tasks.bundles): a walk
        # less the members already finished of bundles still held (counted where the tasks run)
        done = _members_done() if runs_in_process(consumer.pool) else (lambda: 0)
        held = HeldRequests(count=lambda: sum(_requests_in(r) for r in list(state.reserved_requests)) - done())

        def free_slots() -> int:
            return held.free(concurrency, exact_below=DEFAULT_BATCH_MAX)
    else:
        def free_slots() -> int:
            return concurrency - len(state.reserved_requests)

    log.info("dispatcher for %s (%d slots, horizon %.3fs)", ", ".join(tiers), concurrency, dispatcher.horizon_s)
    return DispatchLoop(dispatcher=dispatcher, tiers=tiers, free_slots=free_slots, held=held,
                        tick_s=settings.dispatch_tick_s).start().listen(redis_client=dispatcher.redis_client,
                                                                         namespace=settings.namespace)
