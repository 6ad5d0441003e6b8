"""Fill the exact response cache (tars_tasks/cache.py) with a request's answer when its call succeeds.

The coordinator decided at submit whether the request is cacheable and stored its digest on the
row; the sub-agent passes it as the hint ``cache_digest``. Only an answer of the tier the request
was queued for is filled (a fallback tier's answer is another model's, under another key's
policy), and never one Postgres could not store (a NUL: the request itself fails ``unwritable``).
A cache that cannot be reached is skipped with a warning: the answer is still the request's.
The same script indexes the prompt's embedding in the semantic cache if the producer parked one
(tars_tasks/semantic.py): workers never load the embedding model.
"""

from __future__ import annotations

import logging

import redis

from tars_tasks.cache import CachedAnswer, ResponseCache
from tars_tasks.codes import AttemptOutcome, RequestStatus
from workers.callpath.context import Call, CallOutcome
from workers.callpath.path import CallStep

log = logging.getLogger(__name__)

#: The hint the sub-agent sets from ``requests.cache_digest``.
HINT_CACHE_DIGEST = "cache_digest"


class CacheFillStep(CallStep):
    def __init__(self, *, cache: ResponseCache) -> None:
        self.cache = cache

    def after_call(self, call: Call, outcome: CallOutcome | None) -> None:
        digest = call.hints.get(HINT_CACHE_DIGEST)
        if (digest is None or outcome is None or outcome.status != RequestStatus.SUCCEEDED or outcome.text is None
                or outcome.model != call.requested.model or "\x00" in outcome.text):
            return
        ok = [r for r in outcome.api_rows if r.outcome == AttemptOutcome.OK]
        answer = CachedAnswer(text=outcome.text, stop_reason=outcome.stop_reason, model=outcome.model,
                              tier=outcome.tier_used, cost_usd=ok[-1].cost_usd if ok else 0,
                              source_request_id=call.request_id)
        try:
            self.cache.put(key=self.cache.key(model=outcome.model, digest=digest), answer=answer,
                           ttl_s=call.requested.cache_ttl_s, digest=digest)
        except (redis.RedisError, UnicodeError) as exc:
            log.warning("request %s: response cache not filled (%s)", call.request_id, exc)
