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

from config.keys import semantic_bucket_key, semantic_pending_key, semantic_text_key
from tars_tasks.cache import CANONICAL_FIELDS

#: ``requests.answered_by`` of a semantic hit.
ANSWERED_SEMANTIC = "semantic"
#: How many candidates over the threshold, best first, the guard may look at per bucket.
MAX_GUARDED = 5


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

    def __init__(self, *, redis_client: redis.Redis, namespace: str, pending_ttl_s: float) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self.pending_ttl_ms = max(1, int(pending_ttl_s * 1000))

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
        """Park ``(model, digest, bucket, vector, prompt)`` for the worker's fill; count ``misses``."""
        from config.keys import cache_stats_key

        pipe = self.redis.pipeline(transaction=False)
        for model, digest, bucket, vector, prompt in items:
            key = semantic_pending_key(self.namespace, model, digest)
            pipe.hset(key, mapping={"b": bucket, "v": vector.astype("float32").tobytes(),
                                    "t": prompt.encode("utf-8", "surrogatepass")})
            pipe.pexpire(key, self.pending_ttl_ms)
        if misses:
            pipe.hincrby(cache_stats_key(self.namespace), "semantic_misses", misses)
        pipe.execute()


def best(digests: Sequence[str], matrix: Any, vector: Any, *, threshold: float) -> list[Candidate]:
    """The bucket's entries at or above ``threshold``, most similar first (at most MAX_GUARDED)."""
    if not digests:
        return []
    import numpy as np

    sims = matrix @ vector
    idx = np.flatnonzero(sims >= threshold)
    idx = idx[np.argsort(-sims[idx])][:MAX_GUARDED]
    return [Candidate(digest=digests[i], similarity=float(sims[i])) for i in idx]
