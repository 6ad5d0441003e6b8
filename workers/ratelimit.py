"""The fleet-wide rate limiter: requests per minute **and** tokens per minute per (provider, model).

Repairs celery#5732: Celery's ``rate_limit`` is per worker, so N workers overrun a provider's
limit N-fold. Here every worker process on every host shares one Redis hash per
(provider, model) and one Lua script decides atomically.

The algorithm is GCRA (the generic cell rate algorithm) used as a *scheduler*. Each dimension
keeps a theoretical arrival time (TAT, µs on Redis' clock). A call costing ``r`` requests and
``t`` tokens is given the slot ``start = max(now, TAT_req, TAT_tok)``; the script advances
``TAT_req = start + r·T_req`` and ``TAT_tok = start + t·T_tok`` (``T = window / limit``) and
answers "wait ``start - now``". The caller sleeps exactly that long (``time.sleep``, a
greenlet switch under gevent) and calls: no polling, no thundering herd, no CPU burnt.

Guarantees (window ``W``, limit ``L`` after the utilisation factor):
* requests: slots are spaced at least ``W/L`` apart, so no window of length ``W`` holds more
  than ``L`` slot times;
* tokens: a window holds at most ``L_tok`` plus the tokens of the one call that opened it
  (GCRA without burst; reconcile with :meth:`FleetRateLimiter.adjust_tokens` after the call);
* a caller woken more than ``late_tolerance_s`` after its slot (a stalled process) does not
  send late into the next window; it gives the slot up and reserves again;
* a reservation is made at most ``max_wait_s`` ahead. Further out the script reserves nothing
  and answers the wait; the caller sleeps part of it and asks again, so capacity is never
  held for a caller that has gone away (a killed worker wastes at most its own slots, which
  only lowers the rate, never raises it).

Further limits (``also=``: a tenant's own RPM/TPM, and on one tier) are further GCRA keys in the
same script: the slot is the latest of every key's next slot and all of them advance, so each key
keeps the spacing guarantee above for its own limit.

Callers of one process that reserve the same keys at the same moment (a bundle's members, woken
together by their rows' group commit) are served by one script call (``coalesce_s``): the script's
"many" mode books them one after another exactly as that many single reservations would, so the
guarantees above hold unchanged and only the round trips are saved.

The clock is Redis' ``TIME``, so hosts with skewed clocks still agree on slot times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from config.keys import ratelimit_key

log = logging.getLogger(__name__)

_US_PER_S = 1_000_000
#: A caller that wakes this much later than its slot (a CPU-starved or stalled process) gives
#: the slot up and asks again: sent late, it would crowd the next window past the limit.
LATE_TOLERANCE_S = 0.05

#: A deferred token correction not carried by a reservation within this long is sent on its own
#: (with the next correction): a process whose first attempts all hold a dispatcher's slot, or a
#: prefork child whose dispatcher runs in another process, reserves rarely itself.
PENDING_FLUSH_S = 1.0
#: At most this many reservations share one script call ("many" mode).
COALESCE_MAX = 64

#: KEYS: the model's limiter hash, then the hashes of further limits the same call must fit
#: (a tenant's own, a tenant's on one tier: :func:`config.keys.tenant_ratelimit_key`).
#: ARGV: 1 mode ("acquire" | "adjust" | "many"), 2 request cost ("many": the number of calls),
#: 3 token cost (may be negative in "adjust"), 4 max wait µs, 5 now µs ("" = TIME), then per key:
#: µs per request (0 = no request limit of this kind), µs per token (0 = none), token correction
#: of earlier calls applied first (deferred :meth:`FleetRateLimiter.adjust_tokens`); "many": then
#: each call's tokens.
#: Returns {granted (0/1), wait µs}. A slot is the latest of every key's next slot; all advance.
#: "many" books its calls one after another, each a request of cost 1 as "acquire" would (so the
#: same state and waits as that many "acquire" calls at the same ``now``), and stops at the first
#: that would wait more than the max: returns the waits (µs) of those booked, in order.
LIMITER_LUA = """
local now
if ARGV[5] ~= '' then now = tonumber(ARGV[5]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local reqs, toks = tonumber(ARGV[2]), tonumber(ARGV[3])
local st = {}
for i = 1, #KEYS do
  local b = 5 + 3 * (i - 1)
  local v = redis.call('HMGET', KEYS[i], 'r', 't')
  local s = {r = tonumber(v[1] or '0'), t = tonumber(v[2] or '0'),
             ri = tonumber(ARGV[b + 1]), ti = tonumber(ARGV[b + 2]), dirty = false}
  local credit = tonumber(ARGV[b + 3] or '0')
  if credit ~= 0 and s.ti > 0 then s.t = math.max(s.t + credit * s.ti, now); s.dirty = true end
  st[i] = s
end
local function save()
  for i = 1, #KEYS do
    local s = st[i]
    if s.dirty then
      redis.call('HSET', KEYS[i], 'r', string.format('%d', s.r), 't', string.format('%d', s.t))
      redis.call('PEXPIRE', KEYS[i], math.ceil((math.max(s.r, s.t) - now) / 1000) + 60000)
    end
  end
end
if ARGV[1] == 'adjust' then
  if toks ~= 0 then
    for i = 1, #KEYS do
      local s = st[i]
      if s.ti > 0 then s.t = math.max(s.t + toks * s.ti, now); s.dirty = true end
    end
  end
  save()
  return {1, 0}
end
if ARGV[1] == 'many' then
  local base, cap, out = 5 + 3 * #KEYS, tonumber(ARGV[4]), {}
  for j = 1, tonumber(ARGV[2]) do
    local tok = tonumber(ARGV[base + j])
    local start = now
    for i = 1, #KEYS do start = math.max(start, st[i].r, st[i].t) end
    if start - now > cap then break end
    for i = 1, #KEYS do
      local s = st[i]
      -- whole µs, as a single call stores them (so the next one starts where it would)
      if s.ri > 0 then s.r = math.floor(start + s.ri); s.dirty = true end
      if s.ti > 0 then s.t = math.floor(start + tok * s.ti); s.dirty = true end
    end
    out[#out + 1] = string.format('%d', start - now)
  end
  save()
  return out
end
local start = now
for i = 1, #KEYS do start = math.max(start, st[i].r, st[i].t) end
local wait = start - now
if wait > tonumber(ARGV[4]) then save(); return {0, string.format('%d', wait)} end
for i = 1, #KEYS do
  local s = st[i]
  if s.ri > 0 then s.r = start + reqs * s.ri; s.dirty = true end
  if s.ti > 0 then s.t = start + toks * s.ti; s.dirty = true end
end
save()
return {1, string.format('%d', wait)}
"""

@dataclass(frozen=True, slots=True)
class Grant:
    """The script's answer: capacity reserved (``granted``) at ``wait_s`` from now, or not."""

    granted: bool
    wait_s: float


@dataclass(eq=False)
class _Group:
    """Reservations of one process on the same keys, gathered for one "many" script call."""

    tokens: list[int] = field(default_factory=list)
    #: looked up when made, not at import: under gevent, the patched (greenlet-aware) Event
    done: threading.Event = field(default_factory=lambda: threading.Event())
    #: per member: seconds from the answer to its slot, or None (not booked: beyond the max wait)
    waits: list[float | None] | None = None
    error: BaseException | None = None


class SlotMissed(Exception):
    """The reserved slot passed before the caller could use it (its tokens were given back)."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    rpm: int
    tpm: int

    def intervals_us(self, *, window_s: float, utilisation: float) -> tuple[float, float]:
        """µs of the window each request and each token uses up (0: no limit of that kind)."""
        window_us = window_s * _US_PER_S
        return (window_us / (self.rpm * utilisation) if self.rpm > 0 else 0.0,
                window_us / (self.tpm * utilisation) if self.tpm > 0 else 0.0)


#: A further limit a call must fit besides its model's: (Redis key, limits), e.g. a tenant's own
#: (:func:`config.keys.tenant_ratelimit_key`). A 0 in its limits means none of that kind.
ExtraLimit = tuple[str, LimitSpec]


@dataclass(frozen=True, slots=True)
class Ticket:
    """A reserved slot: the call may go out at ``due`` (``time.monotonic()``), not before."""

    provider: str
    model: str
    limits: LimitSpec
    tokens: int
    due: float
    #: The further limits reserved with the model's (given back with it when the slot is missed).
    also: tuple[ExtraLimit, ...] = ()
    #: seconds the limiter slept inside ``reserve`` (a slot too far out to book at once): waiting for
    #: capacity, like the distance to ``due``; the round trips to Redis are not
    slept_s: float = 0.0


class FleetRateLimiter:
    """Shared RPM+TPM limiter. ``acquire`` blocks (cooperatively) until the call may go out.

    Every method takes ``also``: further limits (:data:`ExtraLimit`) the same call must fit, in the
    same script and the same slot — a tenant's own RPM/TPM on top of the model's. A tenant at its
    limit therefore waits without taking the model's capacity, and its retries count against it."""

    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        namespace: str,
        window_s: float = 60.0,
        utilisation: float = 1.0,
        max_wait_s: float = 30.0,
        late_tolerance_s: float = LATE_TOLERANCE_S,
        sleep: Callable[[float], None] = time.sleep,
        pending_flush_s: float = PENDING_FLUSH_S,
        coalesce_s: float | None = None,
    ) -> None:
        """``coalesce_s``: a reservation waits this long (0: one pass of gevent's hub, or a thread
        switch) for others of this process on the same keys to share its script call; None: each
        reservation is a script call of its own."""
        self.redis = redis_client
        self.late_tolerance_s = late_tolerance_s
        self.late_slots = 0  # slots given up because the caller woke too late (this process)
        self.namespace = namespace
        self.window_s = window_s
        self.utilisation = utilisation
        self.max_wait_s = max_wait_s
        self.pending_flush_s = pending_flush_s
        self._sleep = sleep
        self._script = redis_client.register_script(LIMITER_LUA)
        #: Token corrections not yet sent, per key: they ride along with the next reservation of
        #: that key (or a dispatcher's step, :meth:`take_pending`), so reconciling usage costs no
        #: round trip of its own; one not carried within ``pending_flush_s`` is sent by itself.
        self._pending_tokens: dict[str, int] = {}
        self._pending_limits: dict[str, LimitSpec] = {}
        self._pending_since: float | None = None
        self.coalesce_s = coalesce_s
        self._groups: dict[tuple, _Group] = {}
        self._groups_lock = threading.Lock()
        self.script_calls = 0  # reservation script calls of this process (the tests read it)

    def key(self, *, provider: str, model: str) -> str:
        return ratelimit_key(self.namespace, provider, model)

    # --- deferred corrections --------------------------------------------------------------------

    def take_pending(self, key: str) -> int:
        """The deferred token correction of ``key``, handed to a caller that sends it (a dispatcher)."""
        return self._pending_tokens.pop(key, 0)

    def return_pending(self, key: str, tokens: int) -> None:
        """Give back what :meth:`take_pending` handed out but could not send."""
        if tokens:
            self._pending_tokens[key] = self._pending_tokens.get(key, 0) + tokens
            self._pending_since = self._pending_since or time.monotonic()

    def _defer(self, key: str, limits: LimitSpec, tokens: int) -> None:
        self._pending_tokens[key] = self._pending_tokens.get(key, 0) + tokens
        self._pending_limits[key] = limits
        if self._pending_since is None:
            self._pending_since = time.monotonic()

    def flush_pending(self, *, force: bool = False) -> None:
        """Send the deferred corrections in one script call if the oldest is ``pending_flush_s``
        old (or ``force``). An unreachable Redis keeps them for the next try."""
        if self._pending_since is None:
            return
        if not force and time.monotonic() - self._pending_since < self.pending_flush_s:
            return
        pending = {k: v for k, v in self._pending_tokens.items() if v}
        self._pending_tokens.clear()
        self._pending_since = None
        if not pending:
            return
        keys = list(pending)
        args: list[str | int] = ["adjust", 0, 0, "0", ""]
        for k in keys:
            req_us, tok_us = self._pending_limits.get(k, LimitSpec(rpm=0, tpm=0)).intervals_us(
                window_s=self.window_s, utilisation=self.utilisation)
            args += [repr(req_us), repr(tok_us), pending[k]]
        try:
            self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            log.debug("deferred token corrections not sent (%s); kept for the next try", exc)
            for k, v in pending.items():
                self.return_pending(k, v)

    def _args(self, keys_limits: list[tuple[str, LimitSpec]], *, mode: str, requests: int, tokens: int,
              wait_cap_us: float, now_us: int | None) -> tuple[list[str], list[str | int], dict[str, int]]:
        keys: list[str] = []
        args: list[str | int] = [mode, requests, tokens, repr(wait_cap_us), "" if now_us is None else str(now_us)]
        credits: dict[str, int] = {}
        for k, lim in keys_limits:
            req_us, tok_us = lim.intervals_us(window_s=self.window_s, utilisation=self.utilisation)
            credit = self._pending_tokens.pop(k, 0)
            if credit:
                credits[k] = credit
            keys.append(k)
            args += [repr(req_us), repr(tok_us), credit]
        return keys, args, credits

    # --- reserving ------------------------------------------------------------------------------

    def try_reserve(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, requests: int = 1,
        max_wait_s: float | None = None, now_us: int | None = None, also: tuple[ExtraLimit, ...] = (),
    ) -> Grant:
        """One round trip: reserve a slot at most ``max_wait_s`` ahead, or learn the wait."""
        wait_cap_us = (self.max_wait_s if max_wait_s is None else max_wait_s) * _US_PER_S
        keys, args, credits = self._args([(self.key(provider=provider, model=model), limits), *also],
                                         mode="acquire", requests=requests, tokens=tokens,
                                         wait_cap_us=wait_cap_us, now_us=now_us)
        self.script_calls += 1
        try:
            granted, wait_us = self._script(keys=keys, args=args)
        except BaseException:
            for k, v in credits.items():
                self.return_pending(k, v)
            raise
        return Grant(granted=bool(int(granted)), wait_s=int(wait_us) / _US_PER_S)

    def reserve(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, deadline_s: float | None = None,
        also: tuple[ExtraLimit, ...] = (),
    ) -> Ticket:
        """Reserve the next slot without waiting for it: the caller may do its own work (commit
        the attempt row) while the slot comes due, then :meth:`wait_for` it.

        Raises :class:`TimeoutError` (before reserving anything) when the slot would fall
        after ``deadline_s`` (a ``time.monotonic()`` value).
        """
        slept = 0.0
        first = True
        while True:
            if first and self.coalesce_s is not None:
                wait_s = self._reserve_together(provider=provider, model=model, limits=limits, tokens=tokens,
                                                also=also)
                # not booked (beyond the max wait): the single reservation below learns the wait
                grant = (Grant(granted=True, wait_s=wait_s) if wait_s is not None else
                         self.try_reserve(provider=provider, model=model, limits=limits, tokens=tokens, also=also))
            else:
                grant = self.try_reserve(provider=provider, model=model, limits=limits, tokens=tokens, also=also)
            first = False
            now = time.monotonic()
            if deadline_s is not None and now + grant.wait_s > deadline_s:
                if grant.granted:  # give the slot back; a later caller may use it
                    self.adjust_tokens(provider=provider, model=model, limits=limits, tokens=-tokens, also=also)
                raise TimeoutError(f"no {provider}:{model} capacity within the deadline "
                                   f"(next slot in {grant.wait_s:.1f}s)")
            if grant.granted:
                return Ticket(provider=provider, model=model, limits=limits, tokens=tokens, due=now + grant.wait_s,
                              also=also, slept_s=slept)
            # Too far out to reserve: sleep until the slot is within reach, then ask again.
            pause = max(grant.wait_s - self.max_wait_s, 0.001)
            self._sleep(pause)
            slept += pause

    def _reserve_together(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                          also: tuple[ExtraLimit, ...]) -> float | None:
        """Book one slot in a script call shared with this process's other reservations of the
        same keys made meanwhile (the first of them waits ``coalesce_s`` for the others, then
        sends them all). Returns the seconds to this one's slot, or None if it was not booked."""
        gkey = (provider, model, limits, also)
        with self._groups_lock:
            group = self._groups.get(gkey)
            lead = group is None or len(group.tokens) >= COALESCE_MAX
            if lead:
                group = self._groups[gkey] = _Group()
            index = len(group.tokens)
            group.tokens.append(tokens)
        if not lead:
            group.done.wait()
            if isinstance(group.error, redis.RedisError):
                raise group.error  # the fleet state is unreachable for this member too
            # the first was interrupted (its own time limit, a kill): this one reserves alone
            return group.waits[index] if group.waits is not None else None
        try:
            try:
                time.sleep(self.coalesce_s or 0.0)  # gevent: the other ready greenlets run and join
            finally:  # closed: later reservations start a group of their own
                with self._groups_lock:
                    if self._groups.get(gkey) is group:
                        del self._groups[gkey]
            group.waits = self._try_reserve_many(provider=provider, model=model, limits=limits,
                                                 tokens=list(group.tokens), also=also)
        except BaseException as exc:
            group.error = exc
            raise
        finally:
            group.done.set()
        return group.waits[index]

    def _try_reserve_many(self, *, provider: str, model: str, limits: LimitSpec, tokens: list[int],
                          also: tuple[ExtraLimit, ...]) -> list[float | None]:
        """One round trip: book ``len(tokens)`` calls one after another (as many single
        reservations would); the seconds to each one's slot, None for those beyond the max wait."""
        keys, args, credits = self._args([(self.key(provider=provider, model=model), limits), *also],
                                         mode="many", requests=len(tokens), tokens=0,
                                         wait_cap_us=self.max_wait_s * _US_PER_S, now_us=None)
        self.script_calls += 1
        try:
            answer = self._script(keys=keys, args=[*args, *tokens])
        except BaseException:
            for k, v in credits.items():
                self.return_pending(k, v)
            raise
        waits: list[float | None] = [int(w) / _US_PER_S for w in answer]
        return waits + [None] * (len(tokens) - len(waits))

    def wait_for(self, ticket: Ticket) -> None:
        """Sleep until ``ticket``'s slot is due. Raises :class:`SlotMissed` (its tokens given back;
        the request slot is spent) when it is already more than ``late_tolerance_s`` past: sent
        now, the call would crowd the next window past the limit."""
        left = ticket.due - time.monotonic()
        if left > 0:
            self._sleep(left)
        if time.monotonic() - ticket.due > self.late_tolerance_s:
            self.late_slots += 1
            self.adjust_tokens(provider=ticket.provider, model=ticket.model, limits=ticket.limits,
                               tokens=-ticket.tokens, defer=True, also=ticket.also)
            raise SlotMissed(f"{ticket.provider}:{ticket.model} slot missed by "
                             f"{time.monotonic() - ticket.due:.3f}s")

    def acquire(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, deadline_s: float | None = None,
        also: tuple[ExtraLimit, ...] = (),
    ) -> float:
        """Wait until a call of ``tokens`` tokens may be sent; return the seconds the limit made it
        wait (the slots' distance and the sleeps for them, not the round trips to Redis).

        Raises :class:`TimeoutError` (before reserving anything) when the slot would fall
        after ``deadline_s`` (a ``time.monotonic()`` value).
        """
        waited = 0.0
        while True:
            ticket = self.reserve(provider=provider, model=model, limits=limits, tokens=tokens,
                                  deadline_s=deadline_s, also=also)
            waited += ticket.slept_s + max(ticket.due - time.monotonic(), 0.0)
            try:
                self.wait_for(ticket)
            except SlotMissed:
                continue
            return waited

    def adjust_tokens(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                      now_us: int | None = None, defer: bool = False, also: tuple[ExtraLimit, ...] = ()) -> None:
        """Charge (``tokens`` > 0) or refund (< 0) tokens after the call, once usage is known.
        ``defer``: send it with this process's next reservation of the same keys instead of now
        (at the latest ``pending_flush_s`` later, with the next correction)."""
        if tokens == 0:
            return
        keys_limits = [(self.key(provider=provider, model=model), limits), *also]
        if defer:
            for k, lim in keys_limits:
                self._defer(k, lim, tokens)
            self.flush_pending()
            return
        keys, args, credits = self._args(keys_limits, mode="adjust", requests=0, tokens=tokens,
                                         wait_cap_us=0, now_us=now_us)
        try:
            self._script(keys=keys, args=args)
        except BaseException:
            for k, v in credits.items():
                self.return_pending(k, v)
            raise

    def reset(self, *, provider: str, model: str) -> None:
        self.redis.delete(self.key(provider=provider, model=model))
