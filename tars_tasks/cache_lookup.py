"""The coordinator's side of the response cache (:mod:`tars_tasks.cache`): which planned requests
are cacheable, their digests, and the answers found for them — before anything is reserved,
recorded or queued. A hit is recorded ``succeeded`` by the coordinator and never touches a queue.

The cache is an optimisation: if its Redis is down or slow (``cache_timeout_s``), every request
is a miss and is queued as usual (a warning is logged, the producer is never refused for it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.catalog import Catalog
from tars_tasks.cache import CachedAnswer, ResponseCache, cacheable, request_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheVerdict:
    #: The digest the worker fills under (None: the request is not cacheable).
    digest: str | None
    #: The answer found at submit (None: a miss, or not cacheable).
    hit: CachedAnswer | None = None


class CacheLookup:
    def __init__(self, *, cache: ResponseCache | None, catalog: Catalog) -> None:
        self.cache = cache
        self.catalog = catalog

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
        return [CacheVerdict(digest=d, hit=hits.get(i)) for i, d in enumerate(digests)]
