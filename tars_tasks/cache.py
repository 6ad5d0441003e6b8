"""The exact response cache: an answer a model gave to one canonical request, served again at submit.

**Key.** ``<ns>:cache:e:<model>:<digest>``, where ``digest`` is the SHA-256 of the canonical
request — system prompt, earlier turns, prompt, ``max_tokens``, ``temperature``, ``stop``,
``response_format`` (the role's defaults filled in: what the worker would send), JSON with sorted
keys — and its **scope**: the tenant, unless the tier's ``cache_shared`` is true (then every
tenant shares the tier's answers). ``metadata`` is the producer's labels and is not part of it.

**Who is served.** A request is cacheable unless it says ``cache=False``, its tier has
``cache_ttl_s = 0``, or it is sampled (``temperature`` > 0, or unset: the providers' default is
1) without ``cache=True``. A cacheable request is looked up at submit (:meth:`ResponseCache.get_many`);
a hit is recorded ``succeeded`` at once (``answered_by='exact'``, cost $0, ``saved_usd`` the cost
of the call that filled the entry) and never queued. A miss is queued with its digest on the row;
the worker that answers it fills the entry (``workers/callpath/cache_step.py``) for the tier's
``cache_ttl_s``. A cache that does not answer within ``cache_timeout_s`` is a miss, never an error.

**Where it lives, how it is bounded.** In the Redis of ``TARS_CACHE_URL`` (none: no cache). The
broker's Redis runs ``noeviction`` (queued work must never be evicted), so the cache belongs on an
instance of its own with ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (docker-compose's
``redis-cache``). Whatever the instance, TARS bounds the cache itself: every fill runs one script
that adds the entry to an index sorted by last use and deletes the least recently used entries
beyond ``cache_max_entries``; an answer larger than ``cache_max_entry_bytes`` is not cached. So
the cache holds at most ``cache_max_entries x cache_max_entry_bytes`` (plus Redis's per-key
overhead) even on a ``noeviction`` instance, where it could otherwise refuse the broker's writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis

from config.catalog import ModelSpec
from config.keys import (
    cache_entry_key,
    cache_index_key,
    cache_stats_key,
    semantic_bucket_key,
    semantic_index_key,
    semantic_order_key,
    semantic_pending_index_key,
    semantic_pending_key,
    semantic_text_key,
)

log = logging.getLogger(__name__)

#: ``requests.answered_by``: the response cache at submit, or a provider call.
ANSWERED_EXACT = "exact"
ANSWERED_MODEL = "model"
#: The request columns the canonical request is made of (what the provider is sent).
CANONICAL_FIELDS: tuple[str, ...] = ("system", "messages", "prompt", "max_tokens", "temperature", "stop",
                                     "response_format")

#: KEYS: the entry keys, then the index, then the stats hash; ARGV[1]: the counters' prefix ("" for
#: the exact lookup, "semantic_" for a semantic hit's read). The index's scores are a use counter
#: (``clock`` in the stats hash), strictly increasing: an entry found becomes the most recently used.
GET_LUA = """
local n = #KEYS - 2
local index, stats = KEYS[n + 1], KEYS[n + 2]
local out, hits = {}, 0
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v then
    hits = hits + 1
    redis.call('ZADD', index, redis.call('HINCRBY', stats, 'clock', 1), KEYS[i])
    out[i] = v
  else
    out[i] = false
  end
end
if hits > 0 then redis.call('HINCRBY', stats, ARGV[1] .. 'hits', hits) end
if n - hits > 0 then redis.call('HINCRBY', stats, ARGV[1] .. 'misses', n - hits) end
return out
"""

#: KEYS: entry, index, stats[, pending embedding, semantic index, pending index]. ARGV: value, ttl ms, unused, max
#: entries[, entry digest, bucket / text / order key prefixes, max entries per bucket]. Returns
#: entries evicted. With a pending embedding (tars_tasks/semantic.py: the producer parked it at
#: submit) the entry is indexed in its semantic bucket in the same script, under the same bounds.
PUT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
local clock = redis.call('HINCRBY', KEYS[3], 'clock', 1)
redis.call('ZADD', KEYS[2], clock, KEYS[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
local evicted = 0
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do
    redis.call('DEL', old[i])
    evicted = evicted + 1
  end
end
redis.call('HINCRBY', KEYS[3], 'fills', 1)
if evicted > 0 then redis.call('HINCRBY', KEYS[3], 'evictions', evicted) end
if #KEYS >= 5 then
  local p = redis.call('HMGET', KEYS[4], 'b', 'v', 't')
  if p[1] and p[2] then
    local b, d = p[1], ARGV[5]
    local h, tx, o = ARGV[6] .. b, ARGV[7] .. b, ARGV[8] .. b
    redis.call('HSET', h, d, p[2])
    redis.call('HSET', tx, d, p[3] or '')
    redis.call('ZADD', o, clock, d)
    redis.call('ZADD', KEYS[5], clock, b .. ' ' .. d)
    local drop = {}
    local bover = redis.call('ZCARD', o) - tonumber(ARGV[9])
    if bover > 0 then
      local old = redis.call('ZPOPMIN', o, bover)
      for i = 1, #old, 2 do table.insert(drop, b .. ' ' .. old[i]) end
    end
    local gover = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[4])
    if gover > 0 then
      local old = redis.call('ZPOPMIN', KEYS[5], gover)
      for i = 1, #old, 2 do table.insert(drop, old[i]) end
    end
    for _, m in ipairs(drop) do
      local at = string.find(m, ' ', 1, true)
      local bb, dd = string.sub(m, 1, at - 1), string.sub(m, at + 1)
      redis.call('HDEL', ARGV[6] .. bb, dd)
      redis.call('HDEL', ARGV[7] .. bb, dd)
      redis.call('ZREM', ARGV[8] .. bb, dd)
      redis.call('ZREM', KEYS[5], m)
    end
    for _, k in ipairs({h, tx, o}) do redis.call('PEXPIRE', k, tonumber(ARGV[2])) end
    redis.call('DEL', KEYS[4])
    redis.call('HINCRBY', KEYS[3], 'semantic_fills', 1)
  end
  if #KEYS >= 6 then redis.call('ZREM', KEYS[6], KEYS[4]) end
end
return evicted
"""


def sampled(temperature: float | None) -> bool:
    """Whether a request samples: a temperature above 0, or none (the providers' default is 1)."""
    return temperature is None or temperature > 0


def cacheable(*, temperature: float | None, opt: bool | None, spec: ModelSpec) -> bool:
    """Whether a request may be answered from (and fill) the cache: not opted out, its tier caches,
    and deterministic unless it opted in (``opt`` is the request's ``cache`` field)."""
    if opt is False or spec.cache_ttl_s <= 0:
        return False
    return opt is True or not sampled(temperature)


def request_digest(*, columns: Mapping[str, Any], tenant: str, shared: bool) -> str:
    """The SHA-256 (hex) of the canonical request in its scope (``columns``: ``request_columns``'s)."""
    canonical = {f: columns.get(f) for f in CANONICAL_FIELDS}
    canonical["scope"] = "*" if shared else f"tenant:{tenant}"
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    stop_reason: str | None
    model: str
    tier: str
    #: What the call that filled the entry cost: what a hit saves.
    cost_usd: Decimal
    #: The request whose answer this is.
    source_request_id: str

    def encode(self) -> str:
        return json.dumps({"text": self.text, "stop_reason": self.stop_reason, "model": self.model,
                           "tier": self.tier, "cost_usd": str(self.cost_usd), "source": self.source_request_id},
                          ensure_ascii=False)

    @classmethod
    def decode(cls, raw: bytes | str) -> CachedAnswer | None:
        try:
            d = json.loads(raw)
            return cls(text=str(d["text"]), stop_reason=d.get("stop_reason"), model=str(d["model"]),
                       tier=str(d["tier"]), cost_usd=Decimal(str(d["cost_usd"])),
                       source_request_id=str(d["source"]))
        except (ValueError, KeyError, TypeError, ArithmeticError):
            return None


class ResponseCache:
    """The cache's Redis side: many lookups in one script, one fill with the size bound in another."""

    def __init__(self, *, redis_client: redis.Redis, namespace: str, max_entries: int,
                 max_entry_bytes: int, semantic_max_candidates: int = 256) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self.semantic_max_candidates = semantic_max_candidates
        self._get = redis_client.register_script(GET_LUA)
        self._put = redis_client.register_script(PUT_LUA)

    @classmethod
    def for_settings(cls, settings: Any, *, timeout_s: float | None = None) -> ResponseCache | None:
        """The cache of ``settings`` (None without ``cache_url``)."""
        if not settings.cache_url:
            return None
        from tars_tasks.redis_client import get_redis

        client = get_redis(settings.cache_url, settings=settings, timeout_s=timeout_s or settings.cache_timeout_s)
        return cls(redis_client=client, namespace=settings.namespace, max_entries=settings.cache_max_entries,
                   max_entry_bytes=settings.cache_max_entry_bytes,
                   semantic_max_candidates=settings.semantic_max_candidates)

    def key(self, *, model: str, digest: str) -> str:
        return cache_entry_key(self.namespace, model, digest)

    def get_many(self, keys: Sequence[str], *, semantic: bool = False) -> list[CachedAnswer | None]:
        """The entries of ``keys`` (None: a miss). Raises ``redis.RedisError`` if the cache is down.
        ``semantic``: the reads of semantic candidates (counted as ``semantic_hits``/``_misses``)."""
        if not keys:
            return []
        raw = self._get(keys=[*keys, cache_index_key(self.namespace), cache_stats_key(self.namespace)],
                        args=["semantic_" if semantic else ""])
        return [None if r is None or r is False else CachedAnswer.decode(r) for r in raw]

    def put(self, *, key: str, answer: CachedAnswer, ttl_s: float, digest: str | None = None) -> bool:
        """Fill one entry for ``ttl_s``; False (nothing written) if the answer is over the size bound.
        ``digest`` (the entry's): also index the embedding the producer parked for it, if any."""
        value = answer.encode()
        if len(value.encode("utf-8", "surrogatepass")) > self.max_entry_bytes or ttl_s <= 0:
            return False
        keys = [key, cache_index_key(self.namespace), cache_stats_key(self.namespace)]
        args: list[Any] = [value, max(1, int(ttl_s * 1000)), 0, self.max_entries]
        if digest is not None:
            keys += [semantic_pending_key(self.namespace, answer.model, digest), semantic_index_key(self.namespace),
                     semantic_pending_index_key(self.namespace)]
            args += [digest, semantic_bucket_key(self.namespace, ""), semantic_text_key(self.namespace, ""),
                     semantic_order_key(self.namespace, ""), self.semantic_max_candidates]
        self._put(keys=keys, args=args)
        return True

    def stats(self) -> dict[str, int]:
        raw = self.redis.hgetall(cache_stats_key(self.namespace))
        out = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        out["entries"] = int(self.redis.zcard(cache_index_key(self.namespace)))
        return out
