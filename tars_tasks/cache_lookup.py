"""The coordinator's side of the response cache (:mod:`tars_tasks.cache`): which planned requests
are cacheable, their digests, and the answers found for them — before anything is reserved,
recorded or queued. A hit is recorded ``succeeded`` by the coordinator and never touches a queue.

Order: the exact cache first, then (``semantic_cache``, the ``semantic`` extra) the semantic cache
for the exact misses (:mod:`tars_tasks.semantic`); a semantic miss parks its embedding for the
worker's fill.

The cache is an optimisation: if its Redis is down or slow (``cache_timeout_s``), or the
embedder fails, every request is a miss and is queued as usual (a warning is logged, the
producer is never refused for it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.catalog import Catalog
from tars_tasks.cache import ANSWERED_EXACT, CachedAnswer, ResponseCache, cacheable, request_digest
from tars_tasks.semantic import (
    ANSWERED_SEMANTIC,
    SemanticIndex,
    best,
    bucket_of,
    context_digest,
    prompt_and_context,
)
from tars_tasks.semantic_guard import same_question

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheVerdict:
    #: The digest the worker fills under (None: the request is not cacheable).
    digest: str | None
    #: The answer found at submit (None: a miss, or not cacheable).
    hit: CachedAnswer | None = None
    #: How the hit was found: ``exact`` or ``semantic`` (``requests.answered_by``).
    how: str = ANSWERED_EXACT
    #: A semantic hit's cosine similarity to the prompt whose answer it is.
    similarity: float | None = None


@dataclass(frozen=True, slots=True)
class SemanticOptions:
    max_prompt_chars: int = 1000
    pending_ttl_s: float = 86_400
    threads: int = 1


class CacheLookup:
    def __init__(self, *, cache: ResponseCache | None, catalog: Catalog,
                 semantic: SemanticOptions | None = None) -> None:
        """``semantic``: look up the semantic cache too (raises ConfigurationError without the extra)."""
        self.cache = cache
        self.catalog = catalog
        self.semantic = semantic if cache is not None else None
        self.index: SemanticIndex | None = None
        if self.semantic is not None and cache is not None:
            from tars_tasks.embedding import require_extra

            require_extra()
            self.index = SemanticIndex(redis_client=cache.redis, namespace=cache.namespace,
                                       pending_ttl_s=self.semantic.pending_ttl_s, max_pending=cache.max_entries)

    def digest_for(self, *, tier: str, tenant: str, columns: Mapping[str, Any], opt: bool | None) -> str | None:
        spec = self.catalog.spec(tier)
        if self.cache is None or not cacheable(temperature=columns.get("temperature"), opt=opt, spec=spec):
            return None
        return request_digest(columns=columns, tenant=tenant, shared=spec.cache_shared)

    def look_up(self, items: Sequence[tuple[str, str, Mapping[str, Any], bool | None]],
                *, also_tiers: Sequence[Sequence[str]] | None = None) -> list[CacheVerdict]:
        """One verdict per ``(tier, tenant, columns, opt)``. ``also_tiers[i]``: other tiers whose
        cached answer request ``i`` may take too (critical mode: a cheaper tier's answer)."""
        digests = [self.digest_for(tier=t, tenant=ten, columns=c, opt=o) for t, ten, c, o in items]
        if self.cache is None or not any(digests):
            return [CacheVerdict(digest=d) for d in digests]
        wanted: list[tuple[int, str]] = []
        for i, ((tier, tenant, columns, opt), d) in enumerate(zip(items, digests, strict=True)):
            if d is None:
                continue
            wanted.append((i, self.cache.key(model=self.catalog.spec(tier).model, digest=d)))
            for other in (also_tiers[i] if also_tiers else ()):
                od = self.digest_for(tier=other, tenant=tenant, columns=columns, opt=opt)
                if od is not None:
                    wanted.append((i, self.cache.key(model=self.catalog.spec(other).model, digest=od)))
        try:
            found = self.cache.get_many([k for _, k in wanted])
        except redis.RedisError as exc:
            log.warning("response cache unavailable (%s); %d request(s) treated as misses", exc, len(wanted))
            return [CacheVerdict(digest=d) for d in digests]
        hits: dict[int, CachedAnswer] = {}
        for (i, _), answer in zip(wanted, found, strict=True):
            if answer is not None and i not in hits:  # the first key asked for (the request's own tier) wins
                hits[i] = answer
        verdicts = [CacheVerdict(digest=d, hit=hits.get(i)) for i, d in enumerate(digests)]
        if self.index is not None:
            verdicts = self._semantic(items, verdicts, also_tiers=also_tiers)
        return verdicts

    # --- the semantic cache (tars_tasks/semantic.py) ---------------------------------------------

    def _semantic(self, items: Sequence[tuple[str, str, Mapping[str, Any], bool | None]],
                  verdicts: list[CacheVerdict], *, also_tiers: Sequence[Sequence[str]] | None) -> list[CacheVerdict]:
        """The exact misses, looked up semantically; a miss parks its embedding for the fill."""
        assert self.index is not None and self.semantic is not None and self.cache is not None
        todo: list[tuple[int, str, list[tuple[str, str, float]]]] = []  # (i, prompt, [(tier, bucket, threshold)])
        for i, ((tier, tenant, columns, opt), v) in enumerate(zip(items, verdicts, strict=True)):
            if v.digest is None or v.hit is not None:
                continue
            pc = prompt_and_context(columns)
            if pc is None or len(pc[0]) > self.semantic.max_prompt_chars:
                continue
            prompt, context = pc
            tiers = [tier, *(also_tiers[i] if also_tiers else ())]
            places = []
            for t in tiers:
                spec = self.catalog.spec(t)
                if t != tier and not cacheable(temperature=columns.get("temperature"), opt=opt, spec=spec):
                    continue
                if spec.semantic_threshold > 0:
                    ctx = context_digest(context=context, tenant=tenant, shared=spec.cache_shared)
                    places.append((t, bucket_of(model=spec.model, context=ctx), spec.semantic_threshold))
            if places:
                todo.append((i, prompt, places))
        if not todo:
            return verdicts
        try:
            from tars_tasks.embedding import embed

            vectors = embed([p for _, p, _ in todo], threads=self.semantic.threads)
            names = sorted({b for _, _, places in todo for _, b, _ in places})
            read = dict(zip(names, self.index.buckets(names), strict=True))
            out = list(verdicts)
            chosen = self._choose(todo, vectors, read)
            keys = [(i, self.cache.key(model=self.catalog.spec(t).model, digest=d), sim)
                    for i, (t, d, sim) in chosen.items()]
            found = self.cache.get_many([k for _, k, _ in keys], semantic=True) if keys else []
            for (i, _, sim), answer in zip(keys, found, strict=True):
                if answer is not None:
                    out[i] = CacheVerdict(digest=verdicts[i].digest, hit=answer, how=ANSWERED_SEMANTIC,
                                          similarity=round(sim, 4))
            park = []
            for (i, prompt, places), vec in zip(todo, vectors, strict=True):
                if out[i].hit is None and places[0][0] == items[i][0]:  # the request's own tier fills
                    park.append((self.catalog.spec(items[i][0]).model, verdicts[i].digest, places[0][1], vec, prompt))
            self.index.park(park, misses=sum(1 for i, _, _ in todo if out[i].hit is None))
            return out
        except redis.RedisError as exc:
            log.warning("semantic cache unavailable (%s); %d request(s) treated as misses", exc, len(todo))
        except Exception as exc:  # the embedder: an optimisation never fails a submit
            log.warning("semantic cache failed (%s: %s); %d request(s) treated as misses",
                        type(exc).__name__, exc, len(todo))
        return verdicts

    def _choose(self, todo: Sequence[tuple[int, str, list[tuple[str, str, float]]]], vectors: Any,
                read: Mapping[str, tuple[list[str], Any]]) -> dict[int, tuple[str, str, float]]:
        """Per request, the first (own tier first) most similar candidate the lexical guard accepts."""
        assert self.index is not None
        ranked = []  # (i, tier, bucket, candidates)
        for (i, _, places), vec in zip(todo, vectors, strict=True):
            for tier, bucket, threshold in places:
                digests, matrix = read[bucket]
                cands = best(digests, matrix, vec, threshold=threshold)
                if cands:
                    ranked.append((i, tier, bucket, cands))
        if not ranked:
            return {}
        texts = self.index.texts([(b, [c.digest for c in cands]) for _, _, b, cands in ranked])
        prompts = {i: p for i, p, _ in todo}
        chosen: dict[int, tuple[str, str, float]] = {}
        for (i, tier, _, cands), row in zip(ranked, texts, strict=True):
            if i in chosen:
                continue
            for c, text in zip(cands, row, strict=True):
                if text is not None and same_question(prompts[i], text):
                    chosen[i] = (tier, c.digest, c.similarity)
                    break
        return chosen
