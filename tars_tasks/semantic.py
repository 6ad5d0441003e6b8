"""The semantic response cache: another prompt's cached answer, when the two ask the same thing.

**What is compared.** Only the prompt: the request's last user turn (``prompt``, or the last
message when it is the user's). Everything else of the canonical request — system prompt,
earlier turns, ``max_tokens``, ``temperature``, ``stop``, ``response_format`` — and the scope
(tenant, or ``*`` for a shared tier) and the model must be *equal*: they make the **bucket**,
``<model>:<context digest>``. A prompt longer than ``semantic_max_prompt_chars`` is not
semantically cached (the model reads 256 word pieces; longer prompts would be compared on their
beginnings).

**When it serves.** A cacheable request (the exact cache's rules: ``cache=False`` never, sampled
only with ``cache=True``) that missed the exact cache, on a tier whose ``semantic_threshold`` is
above 0, is embedded (all-MiniLM-L6-v2, :mod:`tars_tasks.embedding`); the most similar entries of
its bucket at or above the threshold are checked by :func:`tars_tasks.semantic_guard.same_question`
(numbers, negations, antonyms, names, direction) and the first that passes answers it, read from
the exact cache (so the exact entry's TTL and LRU bound apply: an evicted answer is a miss).

**The index: brute force over a bounded bucket, in the cache's Redis.** Redis here is 7.0
without vector search. Each bucket is a hash ``digest -> 384 float32`` (1,536 bytes) holding at
most ``semantic_max_candidates`` (256) of its latest fills; a lookup reads the bucket (one
``HGETALL`` per bucket, pipelined for a batch) and takes one matrix-vector product in numpy. No
process holds state: every producer sees every fill at once, and a restart loses nothing. The
cost is linear in the bucket's size and measured (bench/bench_semantic.py, docs/BENCHMARKS.md);
the embedding dominates it. The bound per bucket, a global bound (``cache_max_entries`` over all
buckets, oldest fill first) and the bucket keys' TTL (the latest fill's ``cache_ttl_s``) bound
the memory.

**Fill.** The producer embeds a miss at submit anyway; it parks the vector and prompt under the
miss's exact digest (``semantic_pending_key``, ``semantic_pending_ttl_s``). The worker's exact
fill (``ResponseCache.put``) moves it into the bucket in the same script: an answer is indexed
exactly when it is cached, and workers never load the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.keys import (
    cache_stats_key,
    semantic_bucket_key,
    semantic_pending_index_key,
    semantic_pending_key,
    semantic_text_key,
)
from tars_tasks.cache import CANONICAL_FIELDS

#: ``requests.answered_by`` of a semantic hit.
ANSWERED_SEMANTIC = "semantic"
#: How many candidates over the threshold, best first, the guard may look at per bucket.
MAX_GUARDED = 5

#: KEYS: the pending keys, then the pending index, then the stats hash. ARGV: ttl ms, max parked,
#: misses, then (bucket, vector, prompt) per key. The index (scored by Redis's clock, ms) drops what
#: expired and then the oldest beyond the bound, so parked embeddings never outgrow the cache's bound
#: however many misses never get an answer.
PARK_LUA = """
local n = #KEYS - 2
local index, stats = KEYS[n + 1], KEYS[n + 2]
local ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, n do
  local a = 3 + (i - 1) * 3
  redis.call('HSET', KEYS[i], 'b', ARGV[a + 1], 'v', ARGV[a + 2], 't', ARGV[a + 3])
  redis.call('PEXPIRE', KEYS[i], ttl)
  redis.call('ZADD', index, now, KEYS[i])
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
local over = redis.call('ZCARD', index) - max
if over > 0 then
  local old = redis.call('ZPOPMIN', index, over)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
end
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', stats, 'semantic_misses', tonumber(ARGV[3])) end
return n
"""


def prompt_and_context(columns: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The prompt compared semantically and the rest of the canonical request; None if the last
    turn is not a user's text."""
    context = {f: columns.get(f) for f in CANONICAL_FIELDS}
    prompt = columns.get("prompt")
    if prompt is None:
        messages = list(columns.get("messages") or [])
        if not messages or messages[-1].get("role") != "user":
            return None
        content = messages[-1].get("content")
        prompt = content if isinstance(content, str) else "".join(
            b.get("text", "") for b in content or () if isinstance(b, Mapping))
        context["messages"] = messages[:-1]
    context["prompt"] = None
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return prompt, context


def context_digest(*, context: Mapping[str, Any], tenant: str, shared: bool) -> str:
    """SHA-256 (hex) of everything but the prompt, in its scope: equal for requests that may share."""
    blob = dict(context)
    blob["scope"] = "*" if shared else f"tenant:{tenant}"
    blob["kind"] = "semantic-v1"
    text = json.dumps(blob, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def bucket_of(*, model: str, context: str) -> str:
    return f"{model}:{context}"


@dataclass(frozen=True, slots=True)
class Candidate:
    digest: str
    similarity: float


class SemanticIndex:
    """The semantic side of the cache's Redis: read buckets, park a miss's embedding."""

    def __init__(self, *, redis_client: redis.Redis, namespace: str, pending_ttl_s: float,
                 max_pending: int = 100_000) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.pending_ttl_ms = max(1, int(pending_ttl_s * 1000))
        self.max_pending = max_pending
        self._park = redis_client.register_script(PARK_LUA) if redis_client is not None else None

    def buckets(self, names: Sequence[str]) -> list[tuple[list[str], Any]]:
        """Each bucket's digests and their vectors (an (n, 384) float32 array). Raises RedisError."""
        import numpy as np

        pipe = self.redis.pipeline(transaction=False)
        for b in names:
            pipe.hgetall(semantic_bucket_key(self.namespace, b))
        out = []
        for raw in pipe.execute():
            digests = [k.decode() if isinstance(k, bytes) else k for k in raw]
            vectors = [np.frombuffer(v, dtype=np.float32) for v in raw.values()]
            ok = [i for i, v in enumerate(vectors) if v.shape == (384,)]
            out.append(([digests[i] for i in ok],
                        np.stack([vectors[i] for i in ok]) if ok else np.zeros((0, 384), np.float32)))
        return out

    def texts(self, wanted: Sequence[tuple[str, Sequence[str]]]) -> list[list[str | None]]:
        """The prompts of ``(bucket, digests)`` (None: gone)."""
        pipe = self.redis.pipeline(transaction=False)
        for b, digests in wanted:
            pipe.hmget(semantic_text_key(self.namespace, b), list(digests))
        return [[None if t is None else t.decode("utf-8", "surrogatepass") if isinstance(t, bytes) else t
                 for t in row] for row in pipe.execute()]

    def park(self, items: Sequence[tuple[str, str, str, Any, str]], *, misses: int) -> None:
        """Park ``(model, digest, bucket, vector, prompt)`` for the worker's fill (at most
        ``max_pending`` parked in all, each for ``pending_ttl_s``); count ``misses``."""
        if not items and not misses:
            return
        assert self._park is not None
        keys = [semantic_pending_key(self.namespace, model, digest) for model, digest, _, _, _ in items]
        args: list[Any] = [self.pending_ttl_ms, self.max_pending, misses]
        for _, _, bucket, vector, prompt in items:
            args += [bucket, vector.astype("float32").tobytes(), prompt.encode("utf-8", "surrogatepass")]
        self._park(keys=[*keys, semantic_pending_index_key(self.namespace), cache_stats_key(self.namespace)],
                   args=args)


def best(digests: Sequence[str], matrix: Any, vector: Any, *, threshold: float) -> list[Candidate]:
    """The bucket's entries at or above ``threshold``, most similar first (at most MAX_GUARDED)."""
    if not digests:
        return []
    import numpy as np

    sims = matrix @ vector
    idx = np.flatnonzero(sims >= threshold)
    idx = idx[np.argsort(-sims[idx])][:MAX_GUARDED]
    return [Candidate(digest=digests[i], similarity=float(sims[i])) for i in idx]
