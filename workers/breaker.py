"""The fleet-wide circuit breaker per (provider, model), its state in one Redis hash.

Repairs two failures of per-process breakers: twenty workers each needing five failures of
their own before they stop hammering a sick model (a hundred failed calls instead of five),
and a 401 retried by every worker until the account is banned.

States (one hash at :func:`config.keys.breaker_key`, changed only by :data:`BREAKER_LUA`):

* ``closed`` — calls go through; ``failures`` counts consecutive failed calls; a success
  resets it; ``threshold`` failures in a row open the breaker.
* ``open`` — calls are refused with :class:`~tars_tasks.errors.CircuitOpen` until
  ``open_until``; a 401 opens it at once (``trip``).
* ``half_open`` — after the cooldown the first caller gets a *probe lease* and is let
  through; everyone else is refused while the lease lasts. The probe's success closes the
  breaker; its failure opens it for another cooldown. A lease whose holder died expires,
  and the next caller becomes the probe.

Which failures count is the caller's choice (:func:`counts_as_failure`): 5xx, 529, timeouts
and connection errors do; 429 does not (that is the limiter's and the backoff's business),
nor do 400/403/404 (the request's fault, not the model's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from config.keys import breaker_key
from tars_tasks.errors import AuthenticationFailed, CircuitOpen, RateLimited, TransientProviderError

STATE_CLOSED = "closed"
STATE_OPEN = "open"
STATE_HALF_OPEN = "half_open"

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOLDOWN_S = 30.0
DEFAULT_PROBE_LEASE_S = 60.0
#: A breaker hash nobody touched for this long is forgotten (it was closed or long expired).
BREAKER_TTL_S = 24 * 3600

#: KEYS[1] = breaker hash. ARGV: op, threshold, cooldown µs, probe lease µs, ttl s, reason, now µs ("" = TIME).
#: op "allow"   -> {verdict, n}: 0 = call (closed; n = consecutive failures so far), 1 = call as the probe,
#:                 2 = refused (n = µs until a call may pass)
#: op "success" -> {0, 0}; op "failure" / "trip" -> {1 if the breaker is now open else 0, failures}
BREAKER_LUA = """
local now
if ARGV[7] ~= '' then now = tonumber(ARGV[7]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local k = KEYS[1]
local op = ARGV[1]
local state = redis.call('HGET', k, 'state') or 'closed'
local function fmt(x) return string.format('%d', x) end
local function open(reason)
  redis.call('HSET', k, 'state', 'open', 'open_until', fmt(now + tonumber(ARGV[3])), 'reason', reason,
             'opened_at', fmt(now), 'probe_until', '0')
  redis.call('HINCRBY', k, 'trips', 1)
end
if op == 'allow' then
  if state == 'closed' then return {0, tonumber(redis.call('HGET', k, 'failures') or '0')} end
  if state == 'open' then
    local until_ = tonumber(redis.call('HGET', k, 'open_until') or '0')
    if now < until_ then return {2, fmt(until_ - now)} end
  else
    local lease = tonumber(redis.call('HGET', k, 'probe_until') or '0')
    if now < lease then return {2, fmt(math.min(lease - now, tonumber(ARGV[3])))} end
  end
  redis.call('HSET', k, 'state', 'half_open', 'probe_until', fmt(now + tonumber(ARGV[4])))
  redis.call('EXPIRE', k, ARGV[5])
  return {1, 0}
end
if op == 'success' then
  local f = redis.call('HGET', k, 'failures')
  if state ~= 'closed' or (f and f ~= '0') then
    redis.call('HSET', k, 'state', 'closed', 'failures', '0', 'probe_until', '0', 'closed_at', fmt(now))
    redis.call('EXPIRE', k, ARGV[5])
  end
  return {0, 0}
end
local failures = redis.call('HINCRBY', k, 'failures', 1)
local opened = 0
if op == 'trip' or state == 'half_open' or (state == 'closed' and failures >= tonumber(ARGV[2])) then
  open(ARGV[6]); opened = 1
elseif state == 'open' then opened = 1 end
redis.call('EXPIRE', k, ARGV[5])
return {opened, failures}
"""

_US_PER_S = 1_000_000


def counts_as_failure(exc: BaseException) -> bool:
    """Errors that say the *model* is unwell: transient ones except rate limiting."""
    return isinstance(exc, TransientProviderError) and not isinstance(exc, RateLimited)


def trips_at_once(exc: BaseException) -> bool:
    """A 401: every further call is refused too, and repeating it risks a ban."""
    return isinstance(exc, AuthenticationFailed)


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to call: ``probe`` is True for the one half-open trial call. ``failures`` is the
    closed breaker's count of consecutive failures (a success need only be reported when > 0)."""

    probe: bool
    failures: int = 0

    @property
    def success_matters(self) -> bool:
        return self.probe or self.failures > 0


@dataclass(frozen=True, slots=True)
class BreakerView:
    provider: str
    model: str
    state: str
    failures: int
    retry_in_s: float
    reason: str
    trips: int

    def describe(self) -> str:
        if self.state == STATE_CLOSED:
            return f"closed ({self.failures} consecutive failures)" if self.failures else "closed"
        if self.state == STATE_OPEN:
            return f"open for {self.retry_in_s:.1f}s more ({self.reason}); trips={self.trips}"
        return f"half_open (probe in flight); trips={self.trips}"


class FleetBreaker:
    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        namespace: str,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        probe_lease_s: float = DEFAULT_PROBE_LEASE_S,
    ) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.probe_lease_s = probe_lease_s
        self._script = redis_client.register_script(BREAKER_LUA)

    def key(self, *, provider: str, model: str) -> str:
        return breaker_key(self.namespace, provider, model)

    def _run(self, op: str, *, provider: str, model: str, reason: str = "", probe_lease_s: float | None = None,
             now_us: int | None = None) -> list[int]:
        lease_s = self.probe_lease_s if probe_lease_s is None else probe_lease_s
        out = self._script(
            keys=[self.key(provider=provider, model=model)],
            args=[op, self.failure_threshold, int(self.cooldown_s * _US_PER_S), int(lease_s * _US_PER_S),
                  BREAKER_TTL_S, reason[:200], "" if now_us is None else str(now_us)],
        )
        return [int(x) for x in out]

    def allow(self, *, provider: str, model: str, probe_lease_s: float | None = None,
              now_us: int | None = None) -> Permit:
        """Leave to make one call, or :class:`CircuitOpen` with the time until a retry may pass."""
        verdict, n = self._run("allow", provider=provider, model=model, probe_lease_s=probe_lease_s,
                               now_us=now_us)
        if verdict == 2:
            raise CircuitOpen(f"circuit breaker for {provider}:{model} is open", retry_after_s=n / _US_PER_S)
        return Permit(probe=verdict == 1, failures=n if verdict == 0 else 0)

    def record_success(self, *, provider: str, model: str, now_us: int | None = None) -> None:
        self._run("success", provider=provider, model=model, now_us=now_us)

    def record_failure(self, *, provider: str, model: str, reason: str, trip: bool = False,
                       now_us: int | None = None) -> bool:
        """Count one failed call (``trip``: open at once). Returns True if the breaker is open now."""
        opened, _ = self._run("trip" if trip else "failure", provider=provider, model=model, reason=reason,
                              now_us=now_us)
        return bool(opened)

    def view(self, *, provider: str, model: str) -> BreakerView:
        return self._view_of(provider, model, self.redis.hgetall(self.key(provider=provider, model=model)))

    def _view_of(self, provider: str, model: str, h: dict[bytes, bytes]) -> BreakerView:
        def get(name: str, default: str = "") -> str:
            v = h.get(name.encode())
            return v.decode() if v is not None else default

        state = get("state", STATE_CLOSED)
        retry_in_s = 0.0
        if state == STATE_OPEN:
            retry_in_s = max(0.0, int(get("open_until", "0")) / _US_PER_S - _redis_now_s(self.redis))
        return BreakerView(provider=provider, model=model, state=state, failures=int(get("failures", "0")),
                           retry_in_s=retry_in_s, reason=get("reason"), trips=int(get("trips", "0")))

    def all_views(self) -> list[BreakerView]:
        """Every breaker of this namespace that has state (``tars status``)."""
        prefix = breaker_key(self.namespace, "", "")[:-1]  # "<ns>:breaker:"
        views = []
        for raw in self.redis.scan_iter(match=f"{prefix}*", count=500):
            key = raw.decode()
            provider, _, model = key[len(prefix):].partition(":")
            views.append(self._view_of(provider, model, self.redis.hgetall(key)))
        return sorted(views, key=lambda v: (v.provider, v.model))

    def reset(self, *, provider: str, model: str) -> None:
        self.redis.delete(self.key(provider=provider, model=model))


def _redis_now_s(r: redis.Redis) -> float:
    try:
        sec, usec = r.time()
        return sec + usec / _US_PER_S
    except redis.RedisError:  # pragma: no cover - status display only
        return time.time()
