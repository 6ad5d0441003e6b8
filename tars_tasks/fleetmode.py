"""The fleet's degradation mode: one mode for every producer and worker, decided with hysteresis,
kept in Redis, every transition a ``mode_changes`` row.

**Signals** (each a fraction; the mode follows the largest, ``load``):

* ``queue_load`` — the fullest tier's waiting messages (its broker lists plus its staged
  messages) / ``max_queue_depth``;
* ``limiter_backlog`` — how far ahead the fleet rate limiter's slots are booked, the most booked
  (provider, model), as a fraction of ``ratelimit_max_wait_s`` (a limiter that binds books ahead;
  one that does not has no backlog);
* ``breakers_open`` — the fraction of tiers whose fleet breaker is open or half-open;
* ``budget_burn`` — the fleet's budgets as a whole: what the tenants with a limit have spent or
  reserved this period over the sum of their limits (:meth:`tars_tasks.budgets.Budgets.fleet_burn`;
  one tenant's own budget is enforced for that tenant alone, by its soft threshold and limit).

**Modes and hysteresis.** ``optimal`` → ``high_load`` at ``degrade_high_load_at`` (60%) →
``critical`` at ``degrade_critical_at`` (85%). Moving up is immediate; moving down needs the load
below the mode's trigger minus ``mode_leave_margin`` (leave critical below 75%, high load below 50%)
and the mode to have lasted ``mode_min_dwell_s``. A load oscillating around a trigger therefore
changes the mode once, not on every swing.

**One mode.** The decision is one Lua script on the fleet-state Redis (its clock, its hash): any
process may run it with what it measured, at most every ``mode_interval_s``; the script applies
the rule to the mode stored there, so two processes can never disagree about the mode or make one
transition twice. Each transition gets a number (``seq``) and goes on a short log in Redis; the
process whose call made it writes the ``mode_changes`` rows of the log it has not seen written
(``ON CONFLICT (namespace, seq, at) DO NOTHING``), so a process that died before writing its row
has it written by the next transition.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from config.catalog import Catalog
from config.keys import TIERS, breaker_key, fleet_mode_key, ratelimit_key
from config.settings import Settings

log = logging.getLogger(__name__)

#: How many transitions the Redis log keeps (for rows a crashed process did not write).
LOG_MAX = 100


class FleetMode(StrEnum):
    OPTIMAL = "optimal"
    HIGH_LOAD = "high_load"
    CRITICAL = "critical"


#: KEYS[1] = the mode hash, KEYS[2] = the transition log. ARGV: load, high_at, critical_at, margin,
#: dwell ms, signals JSON, dominant signal name, now ms ('' = Redis TIME), log max.
#: Returns {mode, changed 0/1, from, seq, since ms, reason}.
DECIDE_LUA = """
local now
if ARGV[8] ~= '' then now = tonumber(ARGV[8]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local names = {[0] = 'optimal', [1] = 'high_load', [2] = 'critical'}
local rank = {optimal = 0, high_load = 1, critical = 2}
local enter = {[1] = tonumber(ARGV[2]), [2] = tonumber(ARGV[3])}
local margin = tonumber(ARGV[4])
local load = tonumber(ARGV[1])
local mode = redis.call('HGET', KEYS[1], 'mode')
if not mode then
  mode = 'optimal'
  redis.call('HSET', KEYS[1], 'mode', mode, 'since', now, 'seq', 0)
end
local since = tonumber(redis.call('HGET', KEYS[1], 'since'))
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local cur = rank[mode] or 0
local target = 0
if load >= enter[2] then target = 2 elseif load >= enter[1] then target = 1 end
local new = cur
local reason = ''
if target > cur then
  new = target
  reason = string.format('%s %.3f >= %s trigger %.2f', ARGV[7], load, names[new], enter[new])
elseif target < cur and now - since >= tonumber(ARGV[5]) then
  while new > 0 and load < enter[new] - margin do new = new - 1 end
  if new < cur then
    reason = string.format('%s %.3f < %.2f (leave %s) after %.1fs in it', ARGV[7], load, enter[cur] - margin,
                           names[cur], (now - since) / 1000)
  end
end
redis.call('HSET', KEYS[1], 'signals', ARGV[6], 'measured_at', now)
if new == cur then return {mode, 0, mode, seq, since, ''} end
seq = seq + 1
redis.call('HSET', KEYS[1], 'mode', names[new], 'since', now, 'seq', seq)
redis.call('RPUSH', KEYS[2], cjson.encode({seq = seq, at_ms = now, from = mode, to = names[new], reason = reason,
                                           signals = cjson.decode(ARGV[6])}))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[9]), -1)
return {names[new], 1, mode, seq, now, reason}
"""


@dataclass(frozen=True, slots=True)
class ModeView:
    mode: FleetMode
    seq: int
    #: Redis ms since which the mode holds.
    since_ms: int
    signals: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    seq: int
    at_ms: int
    from_mode: str
    to_mode: str
    reason: str
    signals: dict[str, Any]


def dominant(signals: dict[str, float]) -> tuple[str, float]:
    """The largest signal (the load the mode follows) and its name."""
    if not signals:
        return "queue_load", 0.0
    name = max(signals, key=lambda k: signals[k])
    return name, float(signals[name])


class ModeBook:
    """The Redis side: decide (the script), read, and the transition log."""

    def __init__(self, *, redis_client: redis.Redis, namespace: str, settings: Settings) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.settings = settings
        self._decide = redis_client.register_script(DECIDE_LUA)

    @property
    def key(self) -> str:
        return fleet_mode_key(self.namespace)

    @property
    def log_key(self) -> str:
        return f"{self.key}:log"

    def decide(self, signals: dict[str, float], *, now_ms: int | None = None) -> tuple[ModeView, bool]:
        """Apply the hysteresis rule to the stored mode with ``signals``; (the mode, whether it changed)."""
        s = self.settings
        name, load = dominant(signals)
        mode, changed, _from, seq, since, _reason = self._decide(
            keys=[self.key, self.log_key],
            args=[repr(float(load)), s.degrade_high_load_at, s.degrade_critical_at, s.mode_leave_margin,
                  int(s.mode_min_dwell_s * 1000), json.dumps(signals, sort_keys=True), name,
                  "" if now_ms is None else int(now_ms), LOG_MAX])
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return ModeView(mode=FleetMode(mode), seq=int(seq), since_ms=int(since), signals=signals), bool(int(changed))

    def read(self) -> ModeView:
        h = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}
        signals = json.loads(h["signals"]) if h.get("signals") else {}
        return ModeView(mode=FleetMode(h.get("mode", FleetMode.OPTIMAL)), seq=int(h.get("seq", 0)),
                        since_ms=int(h.get("since", 0)), signals=signals)

    def transitions(self) -> list[Transition]:
        out = []
        for raw in self.redis.lrange(self.log_key, 0, -1):
            d = json.loads(raw)
            out.append(Transition(seq=int(d["seq"]), at_ms=int(d["at_ms"]), from_mode=d["from"], to_mode=d["to"],
                                  reason=d["reason"], signals=d.get("signals") or {}))
        return out


def measure_signals(*, settings: Settings, catalog: Catalog, broker: redis.Redis | None,
                    state: redis.Redis | None, limiter: redis.Redis | None = None) -> dict[str, float]:
    """The signals the mode follows, read from the broker's lists, the limiter's hashes (in
    ``limiter``, default ``state``: see ``Settings.ratelimit_redis_url``) and the fleet-state hashes."""
    from config.keys import PRIORITY_MAX, PRIORITY_MIN, priority_list, queue_for_tier

    signals: dict[str, float] = {"queue_load": 0.0, "limiter_backlog": 0.0, "breakers_open": 0.0,
                                 "budget_burn": 0.0}
    if broker is not None and settings.max_queue_depth > 0:
        from config.keys import stage_count_key

        pipe = broker.pipeline(transaction=False)
        for t in TIERS:
            for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1):
                pipe.llen(priority_list(queue_for_tier(t), p))
            pipe.get(stage_count_key(settings.namespace, t))  # waiting in staging for dispatch
        n = PRIORITY_MAX - PRIORITY_MIN + 2
        lens = [int(x or 0) for x in pipe.execute()]
        depths = [sum(lens[i * n:(i + 1) * n]) for i in range(len(TIERS))]
        signals["queue_load"] = round(max(depths) / settings.max_queue_depth, 4)
    if state is not None:
        cat = catalog.with_overrides(provider=settings.provider_override, base_url=settings.provider_base_url)
        specs = [cat.spec(t) for t in TIERS if t in cat.tiers]
        lim = limiter if limiter is not None else state
        pipe = lim.pipeline(transaction=False)
        pipe.time()
        for spec in specs:
            pipe.hmget(ratelimit_key(settings.namespace, spec.provider, spec.model), "r", "t")
        try:
            booked_res = pipe.execute()
        except redis.RedisError as exc:
            if lim is state:
                raise
            # the limiter's hashes sit in the broker's Redis (dispatch): unreachable, its backlog is
            # unknown — the submit's own broker write reports the broker, not the mode's measurement
            log.debug("limiter backlog unreadable (%s); counted as none", exc)
            booked_res = [(0, 0), *([(None, None)] * len(specs))]
        sec, usec = booked_res[0]
        lim_now_us = int(sec) * 1_000_000 + int(usec)
        pipe = state.pipeline(transaction=False)
        pipe.time()
        for spec in specs:
            pipe.hmget(breaker_key(settings.namespace, spec.provider, spec.model), "state", "open_until",
                       "probe_until")
        res = pipe.execute()
        sec, usec = res[0]
        now_us = int(sec) * 1_000_000 + int(usec)
        backlog, open_n = 0.0, 0
        for i in range(len(specs)):
            r, t = booked_res[1 + i]
            booked = max(int(r or 0), int(t or 0)) - lim_now_us
            backlog = max(backlog, booked / 1e6 / settings.ratelimit_max_wait_s)
            state_, open_until, probe_until = res[1 + i]
            st = (state_ or b"closed").decode()
            # refusing calls until its cooldown ends, or letting only a live probe through
            if (st == "open" and int(open_until or 0) > now_us) or (st == "half_open"
                                                                    and int(probe_until or 0) > now_us):
                open_n += 1
        signals["limiter_backlog"] = round(max(0.0, backlog), 4)
        signals["breakers_open"] = round(open_n / len(specs), 4) if specs else 0.0
        if settings.budgets_enabled:
            from tars_tasks.budgets import Budgets

            burn = Budgets(redis_client=state, namespace=settings.namespace).fleet_burn()
            signals["budget_burn"] = round(min(burn, 10.0), 4)
    return signals


class ModeReader:
    """A process's read-only view of the stored mode, read at most every ``interval_s`` (workers
    apply it to work queued before a transition). A Redis error keeps the last view."""

    def __init__(self, *, book: ModeBook, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.book = book
        self.interval_s = interval_s
        self.clock = clock
        self._mode = FleetMode.OPTIMAL
        self._at = float("-inf")
        self._lock = threading.Lock()

    def mode(self) -> FleetMode:
        with self._lock:  # one reader at a time: the others wait for its answer, not the stale one
            now = self.clock()
            if now - self._at >= self.interval_s:
                try:
                    self._mode = self.book.read().mode
                except redis.RedisError as exc:
                    log.debug("fleet mode unreadable (%s); keeping %s", exc, self._mode)
                self._at = now
            return self._mode


class FleetModeSource:
    """A process's view of the fleet mode: re-decided (measure, then the script) at most every
    ``mode_interval_s``, transitions written to ``mode_changes``. A Redis error is raised (the
    coordinator's submit turns it into ``BrokerUnavailable`` with nothing written)."""

    def __init__(self, *, settings: Settings, catalog: Catalog, book: ModeBook,
                 measure: Callable[[], dict[str, float]], engine: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.catalog = catalog
        self.book = book
        self.measure = measure
        self.engine = engine
        self.clock = clock
        self._lock = threading.Lock()
        self._view = ModeView(mode=FleetMode.OPTIMAL, seq=0, since_ms=0)
        self._at = float("-inf")

    @classmethod
    def for_settings(cls, *, settings: Settings, catalog: Catalog, engine: Any = None) -> FleetModeSource | None:
        url = settings.shared_redis_url
        if not url:
            return None
        from tars_tasks.redis_client import get_redis

        state = get_redis(url, settings=settings, timeout_s=settings.client_timeout_s)
        broker = (get_redis(settings.broker_redis_url, settings=settings, timeout_s=settings.client_timeout_s)
                  if settings.broker_redis_url else None)
        lim_url = settings.ratelimit_redis_url
        limiter = (get_redis(lim_url, settings=settings, timeout_s=settings.client_timeout_s)
                   if lim_url and lim_url != url else state)
        book = ModeBook(redis_client=state, namespace=settings.namespace, settings=settings)
        return cls(settings=settings, catalog=catalog, book=book, engine=engine,
                   measure=lambda: measure_signals(settings=settings, catalog=catalog, broker=broker, state=state,
                                                   limiter=limiter))

    def current(self) -> ModeView:
        now = self.clock()
        with self._lock:
            if now - self._at < self.settings.mode_interval_s:
                return self._view
            self._at = now
        # a Redis error propagates: the producer's submit is BrokerUnavailable (in bounded time),
        # as for any broker operation of a submit
        view, changed = self.book.decide(self.measure())
        with self._lock:
            self._view = view
        if changed:
            log.info("fleet mode is now %s (transition %d)", view.mode, view.seq)
            self.record_transitions()
        return view

    def record_transitions(self) -> int:
        """Write the Redis log's transitions as ``mode_changes`` rows (those already there are kept)."""
        if self.engine is None:
            return 0
        from tars_tasks.db.models import ModeChange
        from tars_tasks.db.upsert import insert_for

        try:
            rows = [{"namespace": self.settings.namespace, "seq": t.seq,
                     "at": datetime.fromtimestamp(t.at_ms / 1000, UTC), "from_mode": t.from_mode,
                     "to_mode": t.to_mode, "reason": t.reason, "signals": t.signals}
                    for t in self.book.transitions()]
            if not rows:
                return 0
            with self.engine.begin() as conn:
                stmt = insert_for(conn, ModeChange.__table__).on_conflict_do_nothing(
                    index_elements=["namespace", "seq", "at"])
                conn.execute(stmt, rows)
            return len(rows)
        except Exception as exc:  # the next transition writes the log again
            log.warning("mode_changes not written (%s); the next transition retries", exc)
            return 0
