"""Staging: where a TARS producer puts a request's Celery message instead of its Celery queue.

The producer's half of dispatch (issue 9, ``docs/DISPATCH.md``): a staged message waits in Redis
lists per (tier, TARS priority, tenant), in front of the Celery queue lists, until a worker's
dispatcher (``workers/dispatch.py``) moves it into its Celery list — in strict priority order,
fair across tenants, and only when the fleet-wide limits let its call go out within about one
dispatcher tick. The message is byte for byte what kombu would have pushed (``tars_tasks.render``),
with one header more, :data:`STAGED_HEADER`: the tokens its first attempt reserves at dispatch.

Core, not producer side: the producer stages (``tars_tasks.publish.stage_requests``), the
reconciler re-stages, admission control, ``tars status`` and the metrics count what is staged.

Delivery: staging lives in the broker's Redis next to the Celery lists; an entry is in exactly one
of its staging list and a Celery list (one script moves it). Staging is no weaker and no stronger
than a Celery queue list: with AOF it survives a Redis restart like them; without, both are lost
and the lost-request reconciler re-stages the requests from their rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from config.catalog import ModelSpec
from config.keys import (
    TIERS,
    stage_count_key,
    stage_parked_key,
    stage_prefix,
    stage_queue_key,
    stage_ring_key,
    stage_wake_channel,
)
from tars_tasks.errors import InvalidRequest
from tars_tasks.redis_client import queue_script

PRIORITIES: tuple[int, ...] = tuple(range(10))  # TARS priorities, 9 served first

#: Entries a single stage call sends in one script (larger batches are split).
STAGE_BATCH_MAX = 500
#: The message header of a staged message: the tokens its first attempt's slot reserves at
#: dispatch (the worker then does not acquire the limiter for that attempt, unless redelivered).
STAGED_HEADER = "tars_staged"


def estimate_text_tokens(text: str) -> int:
    """About four characters per token (the providers' rule of thumb, as the worker estimates)."""
    return max(1, math.ceil(len(text) / 4))


def staged_tokens(*, spec: ModelSpec, prompt: str | None, system: str | None = None,
                  messages: Sequence[Mapping[str, Any]] | None = None, max_tokens: int | None = None) -> int:
    """Tokens a staged request's first attempt reserves: its whole input (system prompt and every
    turn), estimated, plus the output it may produce (its ``max_tokens`` within the tier's bound).
    The worker corrects the reservation to the real usage after the call."""
    parts = [system or ""]
    for m in messages or ():
        c = m.get("content", "")
        parts.append(c if isinstance(c, str) else "".join(b.get("text", "") for b in c if isinstance(b, Mapping)))
    parts.append(prompt or "")
    out_hi = spec.output_tokens[1]
    out = max(1, min(max_tokens or out_hi, spec.max_output_tokens, out_hi))
    return estimate_text_tokens("\n".join(p for p in parts if p)) + out


#: KEYS[1] = the tier's staged count. ARGV[1] = the tier's staging prefix, then 5 per entry:
#: TARS priority, tenant, estimated tokens (a bundle's: its members', comma-separated), id,
#: message. Entries are appended (FIFO per list); a tenant joins the tail of its priority's ring
#: when its list was empty. The staged count counts requests (a bundle's members each).
#: Returns the tier's staged count after the call.
STAGE_LUA = """
local prefix = ARGV[1]
local n = 0
for i = 2, #ARGV, 5 do
  local prio, tenant = ARGV[i], ARGV[i + 1]
  local entry = ARGV[i + 2] .. '|' .. ARGV[i + 3] .. '|' .. ARGV[i + 4]
  if redis.call('RPUSH', prefix .. ':q:' .. prio .. ':' .. tenant, entry) == 1 then
    redis.call('RPUSH', prefix .. ':ring:' .. prio, tenant)
  end
  local _, commas = string.gsub(ARGV[i + 2], ',', '')
  n = n + 1 + commas
end
return redis.call('INCRBY', KEYS[1], n)
"""


@dataclass(frozen=True, slots=True)
class StagedMessage:
    """One ready-to-run Celery message waiting for dispatch.

    ``body`` is the exact string kombu's Redis transport would LPUSH into the Celery queue list
    (opaque here); ``id`` names the entry in dispatch results (the request/task id);
    ``tokens`` is the first attempt's estimate (:func:`staged_tokens`). A bundle
    (``tars_tasks.bundles``) has ``member_tokens``, each member's estimate in the bundle's order
    (``tokens`` is then their sum): dispatch reserves one slot per member.
    """

    id: str
    tier: str
    priority: int
    tenant: str
    tokens: int
    body: str
    member_tokens: tuple[int, ...] = ()

    @property
    def requests(self) -> int:
        """Requests the entry carries (a bundle's members; a single message's one)."""
        return len(self.member_tokens) or 1

    def tokens_field(self) -> str:
        """The entry's tokens as the scripts read them (a bundle's: comma-separated)."""
        return ",".join(map(str, self.member_tokens)) if self.member_tokens else str(self.tokens)

    def check(self) -> None:
        if self.tier not in TIERS:
            raise InvalidRequest(f"unknown tier {self.tier!r}", field="tier")
        if self.priority not in PRIORITIES:
            raise InvalidRequest(f"priority {self.priority!r} is out of range 0..9", field="priority")
        if not self.tenant or any(not (c.isalnum() or c in "._-") for c in self.tenant):
            raise InvalidRequest(f"tenant {self.tenant!r}: letters, digits, '.', '_', '-' only", field="tenant")
        if "|" in self.id or not self.id:
            raise InvalidRequest(f"entry id {self.id!r} must be non-empty and contain no '|'", field="id")
        if not isinstance(self.tokens, int) or self.tokens < 0:
            raise InvalidRequest(f"tokens {self.tokens!r} must be a non-negative integer", field="tokens")
        if self.member_tokens and (any(not isinstance(t, int) or t < 0 for t in self.member_tokens)
                                   or sum(self.member_tokens) != self.tokens):
            raise InvalidRequest(f"member tokens {self.member_tokens!r} must be non-negative integers summing to "
                                 f"tokens {self.tokens}", field="member_tokens")


class Staging:
    """The producer's side: put ready messages in staging (instead of LPUSHing them to Celery)."""

    def __init__(self, *, redis_client: redis.Redis, namespace: str) -> None:
        self.redis = redis_client
        self.namespace = namespace
        self._script = redis_client.register_script(STAGE_LUA)

    def stage(self, messages: Iterable[StagedMessage], *, pipeline: redis.client.Pipeline | None = None) -> None:
        """Append ``messages`` to staging, atomically per tier and per ``STAGE_BATCH_MAX`` entries.

        Each tier staged in is then named on :func:`config.keys.stage_wake_channel` (one PUBLISH in
        the same pipeline), so its dispatchers move the entries without waiting for their tick.

        Validates every entry first (one bad entry stages nothing). With ``pipeline`` the script
        calls are queued on it (the caller executes it, e.g. with its other writes); otherwise
        they run at once, in one pipeline. Raises redis errors as they are: the caller decides
        what a failed staging means for its requests (today: "enqueue failed").
        """
        by_tier: dict[str, list[StagedMessage]] = {}
        for m in messages:
            m.check()
            by_tier.setdefault(m.tier, []).append(m)
        if not by_tier:
            return
        pipe = pipeline if pipeline is not None else self.redis.pipeline(transaction=False)
        for tier, entries in by_tier.items():
            prefix = stage_prefix(self.namespace, tier)
            for i in range(0, len(entries), STAGE_BATCH_MAX):
                args: list[str | int] = [prefix]
                for m in entries[i : i + STAGE_BATCH_MAX]:
                    args += [m.priority, m.tenant, m.tokens_field(), m.id, m.body]
                queue_script(pipe, self._script, keys=[stage_count_key(self.namespace, tier)], args=args)
            pipe.publish(stage_wake_channel(self.namespace), tier)  # its dispatchers step now, not at their tick
        if pipeline is None:
            pipe.execute()

    def staged_count(self, *, tier: str) -> int:
        """Entries staged in ``tier`` (all priorities, all tenants): the fleet-wide admission bound's input."""
        return int(self.redis.get(stage_count_key(self.namespace, tier)) or 0)

    def staged_by_priority(self, *, tier: str) -> dict[int, dict[str, int]]:
        """TARS priority -> tenant -> entries staged (for ``tars status`` and metrics)."""
        pipe = self.redis.pipeline(transaction=False)
        for p in PRIORITIES:
            pipe.lrange(stage_ring_key(self.namespace, tier, p), 0, -1)
        pipe.zrange(stage_parked_key(self.namespace, tier), 0, -1)
        *rings, parked = pipe.execute()
        by_prio = {p: {t.decode() for t in ring} for p, ring in zip(PRIORITIES, rings, strict=True)}
        for member in parked:
            p, _, t = member.decode().partition(":")
            by_prio[int(p)].add(t)
        tenants = [sorted(by_prio[p]) for p in PRIORITIES]
        for p, ts in zip(PRIORITIES, tenants, strict=True):
            for t in ts:
                pipe.llen(stage_queue_key(self.namespace, tier, p, t))
        lens = iter(pipe.execute())
        return {p: {t: int(next(lens)) for t in ts} for p, ts in zip(PRIORITIES, tenants, strict=True) if ts}


