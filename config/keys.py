"""Every queue name, Redis key and priority mapping TARS uses, in one place."""

from __future__ import annotations

TIERS: tuple[str, ...] = ("haiku", "sonnet", "opus")
QUEUE_PREFIX = "tars."
TASK_RUN_REQUEST = "tars.run_request"
#: One broker message carrying several requests of one tier and priority (``tars_tasks.bundles``).
TASK_RUN_BUNDLE = "tars.run_bundle"

# --- priorities ------------------------------------------------------------------------------
#
# TARS priorities run 0 (lowest) .. 9 (highest, served first). Kombu's Redis transport keeps one
# list per queue and priority *step* and serves the steps in the order of ``priority_steps``;
# a message with no priority (any plain-Celery producer's default) lands in step 0, the bare
# queue name. So step 0 must mean *normal*, not high: TARS 5 -> step 0, the higher priorities
# take steps 1..4 (served before step 0) and the lower ones steps 5..9 (served after it).

PRIORITY_MIN, PRIORITY_NORMAL, PRIORITY_MAX = 0, 5, 9
#: kombu's default separator between a queue name and its priority step; TARS uses it too, so
#: a plain-Celery producer with default transport options writes to the lists TARS workers read.
KOMBU_PRIORITY_SEP = "\x06\x16"
_STEP_FOR_PRIORITY: dict[int, int] = {9: 1, 8: 2, 7: 3, 6: 4, 5: 0, 4: 5, 3: 6, 2: 7, 1: 8, 0: 9}
_PRIORITY_FOR_STEP: dict[int, int] = {s: p for p, s in _STEP_FOR_PRIORITY.items()}
#: The order in which workers poll a queue's steps: TARS priority 9 first, 0 last.
PRIORITY_POLL_ORDER: tuple[int, ...] = tuple(_STEP_FOR_PRIORITY[p] for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1))


def kombu_priority(priority: int) -> int:
    """The kombu priority step a TARS priority is published with."""
    return _STEP_FOR_PRIORITY[priority]


def tars_priority(step: int | None) -> int:
    """The TARS priority of a message published with kombu priority ``step`` (None: normal)."""
    if step is None:
        return PRIORITY_NORMAL
    return _PRIORITY_FOR_STEP[min(max(int(step), 0), 9)]


def priority_list(queue: str, priority: int) -> str:
    """The Redis list holding ``queue``'s messages of a TARS priority."""
    step = kombu_priority(priority)
    return queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}"


def queue_for_tier(tier: str) -> str:
    return f"{QUEUE_PREFIX}{tier}"


# --- kombu's own keys (broker Redis; not namespaced, kombu's defaults) ------------------------

#: delivery tag -> [message, exchange, routing key] of every message a worker holds unacked.
UNACKED_KEY = "unacked"
#: delivery tag -> when it was taken (kombu restores entries older than the visibility timeout).
UNACKED_INDEX_KEY = "unacked_index"
#: delivery tag -> lease owner of the worker process that holds it (TARS, next to kombu's two).
UNACKED_OWNER_KEY = "unacked_owner"


# --- TARS keys (``namespace`` prefixes them all) ----------------------------------------------


def lease_key(namespace: str, owner: str) -> str:
    """Present (with a TTL the owner keeps renewing) while a worker process is alive."""
    return f"{namespace}:lease:{owner}"


def lease_prefix(namespace: str) -> str:
    return f"{namespace}:lease:"


def lease_sweep_lock_key(namespace: str) -> str:
    """Held by the one worker that restores dead workers' messages in a given interval."""
    return f"{namespace}:lease-sweep:lock"


def admission_key(namespace: str, tier: str) -> str:
    """Sorted set of admission reservations (member: reservation id, score: expiry ms)."""
    return f"{namespace}:admission:{tier}"


def done_channel(namespace: str, producer_id: str) -> str:
    """Pub/sub channel on which workers announce finished requests to one producer."""
    return f"{namespace}:done:{producer_id}"


def deliveries_key(namespace: str, request_id: str) -> str:
    """Counter of redeliveries of one request (poison-message cap)."""
    return f"{namespace}:deliveries:{request_id}"


def quarantine_key(namespace: str, request_id: str) -> str:
    """Set while a suspect request runs alone in its process (see ``workers.quarantine``)."""
    return f"{namespace}:quarantine:{request_id}"


def ratelimit_key(namespace: str, provider: str, model: str) -> str:
    return f"{namespace}:ratelimit:{provider}:{model}"


def breaker_key(namespace: str, provider: str, model: str) -> str:
    return f"{namespace}:breaker:{provider}:{model}"


def reconcile_lock_key(namespace: str) -> str:
    """Held by the one worker that looks for lost requests in a given interval."""
    return f"{namespace}:reconcile:lock"


def reconcile_absent_key(namespace: str) -> str:
    """Hash: request id -> when a reconciler sweep first saw it in no list and no ``unacked``."""
    return f"{namespace}:reconcile:absent"


# --- dispatch staging (workers/dispatch.py, docs/DISPATCH.md) ---------------------------------


def stage_prefix(namespace: str, tier: str) -> str:
    """Prefix of one tier's staging keys. Under it, built by the Lua scripts:
    ``:q:{priority}:{tenant}`` (list of entries), ``:ring:{priority}`` (list of tenants with
    work, the round-robin order), ``:parked`` (sorted set of ``{priority}:{tenant}`` with work
    whose tenant is at its own limit, scored by the µs its next slot is due), ``:deficit:{priority}``
    (hash tenant -> DRR deficit) and ``:count`` (entries staged in the tier)."""
    return f"{namespace}:stage:{tier}"


def stage_wake_channel(namespace: str) -> str:
    """Pub/sub channel a producer publishes a tier's name on after staging in it: the dispatchers
    of that tier step at once instead of at their next tick (their tick remains the fallback)."""
    return f"{namespace}:stage-wake"


def stage_slots_key(namespace: str, tier: str) -> str:
    """Hash entry id -> the µs (Redis clock) of the slot its dispatcher reserved: the worker that
    takes the message reads (and deletes) it, and gives a slot it would miss up (docs/DISPATCH.md)."""
    return f"{stage_prefix(namespace, tier)}:slots"


def stage_count_key(namespace: str, tier: str) -> str:
    """Entries staged in a tier, all priorities and tenants (the admission bound reads it)."""
    return f"{stage_prefix(namespace, tier)}:count"


def stage_queue_key(namespace: str, tier: str, priority: int, tenant: str) -> str:
    return f"{stage_prefix(namespace, tier)}:q:{priority}:{tenant}"


def stage_ring_key(namespace: str, tier: str, priority: int) -> str:
    return f"{stage_prefix(namespace, tier)}:ring:{priority}"


def stage_parked_key(namespace: str, tier: str) -> str:
    return f"{stage_prefix(namespace, tier)}:parked"


def stage_deficit_key(namespace: str, tier: str, priority: int) -> str:
    return f"{stage_prefix(namespace, tier)}:deficit:{priority}"


def tenant_config_key(namespace: str) -> str:
    """Hash of every configured tenant's weight and limits, as the dispatch script reads them."""
    return f"{namespace}:tenants"


def tenant_limit_prefix(namespace: str) -> str:
    return f"{namespace}:tlimit:"


def tenant_ratelimit_key(namespace: str, tenant: str, tier: str | None = None) -> str:
    """GCRA state (same fields as :func:`ratelimit_key`) of a tenant's limit, or of its limit on one tier."""
    return f"{tenant_limit_prefix(namespace)}{tenant}" + (f":{tier}" if tier else "")


# --- cost controls (issue 11): response cache, fleet mode, budgets -----------------------------


def cache_entry_key(namespace: str, model: str, digest: str) -> str:
    """One cached answer: ``model`` answered the canonical request ``digest`` (its scope inside)."""
    return f"{namespace}:cache:e:{model}:{digest}"


def cache_index_key(namespace: str) -> str:
    """Sorted set of every cache entry key by last use (the explicit size bound trims its oldest)."""
    return f"{namespace}:cache:index"


def cache_stats_key(namespace: str) -> str:
    """Hash of cache counters: hits, misses, fills, evictions."""
    return f"{namespace}:cache:stats"


def semantic_bucket_key(namespace: str, bucket: str) -> str:
    """Hash of one semantic bucket (``<model>:<context digest>``): entry digest -> normalised float32
    embedding of the prompt it answered (tars_tasks/semantic.py)."""
    return f"{namespace}:cache:s:{bucket}"


def semantic_text_key(namespace: str, bucket: str) -> str:
    """Hash of the bucket's prompts (entry digest -> prompt), read only for candidates over the threshold."""
    return f"{namespace}:cache:st:{bucket}"


def semantic_order_key(namespace: str, bucket: str) -> str:
    """Sorted set of the bucket's entry digests by fill (its per-bucket bound trims the oldest)."""
    return f"{namespace}:cache:so:{bucket}"


def semantic_index_key(namespace: str) -> str:
    """Sorted set of every ``<bucket> <digest>`` by fill: the semantic side's global bound."""
    return f"{namespace}:cache:sindex"


def semantic_pending_key(namespace: str, model: str, digest: str) -> str:
    """A queued miss's bucket, embedding and prompt, waiting for the worker's fill to index them."""
    return f"{namespace}:cache:sp:{model}:{digest}"


def semantic_pending_index_key(namespace: str) -> str:
    """Sorted set of the parked embeddings' keys by time parked: their bound (``cache_max_entries``)."""
    return f"{namespace}:cache:spindex"


def fleet_mode_key(namespace: str) -> str:
    """Hash: the fleet's degradation mode, since when, its transition number, the last signals."""
    return f"{namespace}:fleetmode"


def fleet_mode_lock_key(namespace: str) -> str:
    """Held by the one process re-deciding the mode (others read the hash)."""
    return f"{namespace}:fleetmode:lock"


def budget_key(namespace: str, tenant: str, period: str) -> str:
    """Hash of one tenant's budget in one period (``day:2026-12-02``, ``month:2026-12``)."""
    return f"{namespace}:budget:{tenant}:{period}"


def budget_limits_key(namespace: str) -> str:
    """Hash: ``TENANT:day`` / ``TENANT:month`` -> limit in micro-dollars."""
    return f"{namespace}:budget:limits"


def batch_runner_heartbeat_key(namespace: str, host: str) -> str:
    """String with a TTL: a batch runner on ``host`` looped within its lifetime (its healthcheck reads it)."""
    return f"{namespace}:batch-runner:alive:{host}"
