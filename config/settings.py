"""Settings read from ``TARS_*`` environment variables (or a ``.env`` file).

With nothing set, TARS runs *embedded*: an in-memory broker, in-process workers and
a SQLite file, so ``tars loadgen run baseline`` works on a machine with no services.
Set ``TARS_BROKER_URL`` and ``TARS_DATABASE_URL`` to run a real fleet.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

EMBEDDED_BROKER_URL = "memory://"


def user_data_dir() -> Path:
    """Where TARS keeps a user's data (the embedded database): ``$XDG_DATA_HOME/tars``,
    by default ``~/.local/share/tars`` (the XDG base-directory convention)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tars"


def embedded_database_url() -> str:
    """The embedded default's SQLite file, in the user's data directory (not the current one)."""
    return f"sqlite:///{user_data_dir() / 'embedded.db'}"



class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TARS_", env_file=".env", extra="ignore")

    broker_url: str = EMBEDDED_BROKER_URL
    database_url: str = Field(default_factory=embedded_database_url)
    #: Redis used for fleet-shared state (notifications, limiter, breaker). Defaults to the broker.
    redis_url: str | None = None
    #: Prefix of every Redis key and pub/sub channel TARS owns (not Celery's queues).
    namespace: str = "tars"
    #: Path of a TOML model catalog replacing the packaged one.
    catalog_path: Path | None = None
    #: Path of a TOML file of tenants' weights and limits (config/tenants.py); none = weight 1, no limits.
    tenants_path: Path | None = None
    #: Path of a TOML file of job templates replacing the packaged config/jobs.toml (docs/JOBS.md).
    job_templates_path: Path | None = None

    # --- delivery (see docs/DELIVERY.md) -------------------------------------------------
    #: Seconds an unacked message may stay with a worker before Redis hands it to another.
    #: Must exceed the longest task, retries included, or tasks run twice while alive. Only a
    #: fallback: messages of a TARS worker are restored by lease (below) within seconds.
    visibility_timeout_s: float = 3600.0
    #: A worker process's lease lives this long unless renewed; when it expires, a live worker
    #: restores the messages the dead one held (docs/DELIVERY.md, "leases").
    lease_ttl_s: float = Field(default=5.0, gt=0)
    #: How often a worker renews its lease (well under ``lease_ttl_s``).
    lease_renew_interval_s: float = Field(default=1.0, gt=0)
    #: How often one worker of the fleet looks for messages held by dead workers.
    lease_sweep_interval_s: float = Field(default=1.0, gt=0)
    #: How often surviving workers sweep for messages of dead workers.
    unacked_restore_interval_s: float = 10.0
    #: A request still ``queued`` after this long, with no attempt in flight, whose message two
    #: sweeps found in no list and no ``unacked`` entry, was lost (a worker killed between the
    #: broker's pop and kombu's unacked record, a Redis restart; see workers/maintenance.py) and
    #: is published again.
    requeue_lost_after_s: float = Field(default=5.0, gt=0)
    #: How often one worker of the fleet looks for lost requests.
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    #: After ``max_deliveries - 1`` redeliveries a request runs alone in its worker process; if
    #: the process dies even then, it is failed as poison (a crash's bystanders are not).
    max_deliveries: int = Field(default=5, ge=2)
    #: 2, not 1: with the gevent pool Celery runs its "synloop", and when a worker holds as many
    #: messages as its concurrency kombu stops its BRPOP; the next one is fetched only when the
    #: loop wakes (up to 2 s later). A full gevent pool blocks the consumer in spawn() anyway, so
    #: in practice a worker holds about concurrency + 1 messages, not 2x.
    worker_prefetch_multiplier: int = Field(default=2, ge=1)
    #: Celery task events (what Flower shows). Costs two extra broker messages per task.
    task_events: bool = True
    #: Celery's two INFO lines per task ("Task ... received", "Task ... succeeded in ..."): 3.3-3.7% of
    #: a worker's CPU in a drain (docs/BENCHMARKS.md, issue 13's profile); the request rows, ``tars
    #: result`` and Flower hold the same. Off: those two loggers log warnings and errors only.
    task_log_lines: bool = False

    # --- dispatch: priority and fairness under a binding rate limit (docs/DISPATCH.md) -------
    #: A TARS producer *stages* its requests' messages (Redis lists per tier, priority and
    #: tenant) and the workers' dispatchers move them into the Celery queues when the fleet
    #: limits let their calls go out, in priority order, fair across tenants, with tenant limits.
    #: Off: producers publish straight to the Celery queues (the worker waits in the limiter).
    #: Workers always run their dispatcher (an idle one costs one Redis GET per tick), so a fleet
    #: may switch producers either way at any time; needs a Redis broker (embedded: off).
    dispatch_enabled: bool = True
    #: A dispatcher moves a message only if its first call's slot is due within this long; the
    #: worker that takes it commits its attempt row meanwhile and sends at the slot.
    dispatch_horizon_s: float = Field(default=0.5, gt=0, le=5)
    #: A worker's dispatcher steps at least this often (and at once when a task finishes).
    dispatch_tick_s: float = Field(default=0.02, gt=0, le=5)

    # --- worker ---------------------------------------------------------------------------
    worker_concurrency: int = Field(default=500, ge=1)
    worker_pool: str = "gevent"
    #: Large blocks (at least this many bytes) always come from their own mmap, returned when
    #: freed: glibc's dynamic threshold would move them into the heap, whose resident size then
    #: creeps up (workers/memory.py; it did not lower the soak's RSS slope). 0: the C library's default.
    worker_mmap_threshold_bytes: int = Field(default=128 * 1024, ge=0, le=32 * 1024 * 1024)
    #: At ready, what the worker started with is frozen out of the cyclic collector's full
    #: collections (``gc.freeze``, workers/memory.py): they walk only what requests allocated since.
    #: Not in the embedded fleet, whose worker runs inside its host's process.
    worker_gc_freeze: bool = True
    #: Group commit: at most this many tasks' rows per transaction ...
    writer_batch_max: int = Field(default=500, ge=1)
    #: ... and a batch waits at most this long for company before it is committed.
    writer_linger_ms: float = Field(default=2.0, ge=0)

    #: A group commit that keeps failing for this long (a database that cannot be written)
    #: makes the worker unhealthy (`tars fleet healthcheck worker`, `tars status`, metrics).
    writer_stall_unhealthy_s: float = Field(default=30.0, gt=0)
    #: Longest pause between two attempts of a group commit that failed transiently.
    writer_retry_max_s: float = Field(default=5.0, gt=0)

    # --- producers ------------------------------------------------------------------------------
    #: Bundling (issue 13, ``tars_tasks.bundles``): a ``submit_many`` puts up to this many requests
    #: of one (tier, priority) — staged (dispatch on): of one tenant too — in one broker message
    #: (``tars.run_bundle``), run concurrently by the worker that takes it, each with its own row,
    #: verdict and notice; a crash reruns only the members whose rows are not terminal; dispatch
    #: reserves every member its own rate-limit slot. 0 or 1: one message per request. On by
    #: default (16: a zero-latency drain then costs less CPU per request than bare Celery's per
    #: task, docs/BENCHMARKS.md); the same value on workers: a worker's dispatcher counts a bundle
    #: it holds as its members only when its own setting is > 1. Bounded so that a high-priority
    #: request waits at most one bundle's worth behind the low work a worker holds.
    bundle_max: int = Field(default=16, ge=0, le=64)
    #: A producer's bound on each broker operation of a submit (connect, publish, admission):
    #: past it, submit raises BrokerUnavailable instead of hanging.
    client_timeout_s: float = Field(default=5.0, gt=0)

    # --- nothing waits forever: connection bounds (docs/OPERATIONS.md, "Timeouts") ------------
    # Every Redis connection (broker, fleet state, completion pub/sub) and every Postgres
    # connection has a connect bound, a reply bound and TCP keepalives. A peer that stops
    # answering without closing (frozen, half-open) is dropped and replaced within these.
    #: Seconds to open a Redis connection (TCP connect + handshake).
    redis_socket_connect_timeout_s: float = Field(default=5.0, gt=0)
    #: Seconds any Redis reply may take. Every TARS command is short (BRPOP is sent with a
    #: 1 s server-side timeout), so a reply this late means the connection is dead.
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    #: A pooled Redis connection idle this long is PINGed before it is used again; pub/sub
    #: connections (completion notices, Celery's control and events) are PINGed this often and
    #: dropped after two unanswered PINGs; a worker's BRPOP connection whose reply is this much
    #: overdue is dropped (kombu). 0 would disable all of it, so it must be positive.
    redis_health_check_interval_s: float = Field(default=10.0, gt=0)
    #: Seconds to open a Postgres connection (libpq ``connect_timeout``; libpq's minimum is 2).
    db_connect_timeout_s: int = Field(default=5, ge=2)
    #: Server-side ``statement_timeout``: Postgres cancels a statement running longer (a clean
    #: error; the connection survives). 0 leaves the server's own setting.
    db_statement_timeout_s: float = Field(default=60.0, ge=0)
    #: Server-side ``idle_in_transaction_session_timeout``: Postgres ends a session of ours that
    #: sits inside a transaction, with no statement running, for this long. A client that froze
    #: or died between its INSERT and its COMMIT otherwise keeps its row locks for as long as the
    #: server believes the connection lives, and every retry of the same rows blocks behind them
    #: (measured: the group-commit writer's retries timed out on the unique index, forever).
    #: TARS never holds a transaction open while it waits on anything else. 0 leaves the server's.
    db_idle_in_transaction_timeout_s: float = Field(default=60.0, ge=0)
    #: After giving up on a frozen connection, end its server process from the next new connection
    #: (``pg_terminate_backend`` on a backend of our own role, matched by pid and start time; see
    #: tars_tasks/db/engine.py). Turn off behind a transaction-pooling proxy (PgBouncer), where one
    #: server process serves many clients.
    db_end_abandoned_sessions: bool = True
    #: Client-side bound on any one exchange with Postgres (a statement and its result, a
    #: COMMIT, a ping): no complete answer within this many seconds and the connection is
    #: closed and replaced. This is what catches a frozen server: on loopback, or behind a
    #: proxy that keeps the socket open, the kernel ACKs everything, so keepalives and
    #: ``tcp_user_timeout`` never fire. Must exceed ``db_statement_timeout_s``.
    db_io_timeout_s: float = Field(default=90.0, gt=0)
    #: TCP keepalive of every Redis and Postgres socket: first probe after this much idle time,
    #: then one probe every ``tcp_keepalive_interval_s``; ``tcp_keepalive_count`` unanswered
    #: probes close the connection (a peer host that vanished: power loss, network partition).
    tcp_keepalive_idle_s: int = Field(default=30, ge=1)
    tcp_keepalive_interval_s: int = Field(default=5, ge=1)
    tcp_keepalive_count: int = Field(default=3, ge=1)
    #: Linux ``TCP_USER_TIMEOUT``: data sent but not acknowledged by the peer's kernel for this
    #: long closes the connection. 0 leaves the kernel default (about 15 minutes).
    tcp_user_timeout_s: float = Field(default=30.0, ge=0)

    # --- input limits -----------------------------------------------------------------------
    max_prompt_chars: int = Field(default=200_000, ge=1)
    #: Requests one ``submit_many`` call may carry; more is refused (InvalidRequest) before any write.
    max_requests_per_call: int = Field(default=10_000, ge=1)

    # --- admission control and graceful degradation (tars_tasks/admission.py) ----------------
    #: Messages a tier's queue may hold; beyond it, submit raises Overloaded. 0 disables.
    max_queue_depth: int = Field(default=20_000, ge=0)
    #: Load (queued / max_queue_depth) at which a tier enters "high load": requests below high
    #: priority are routed to the tier's fallback (cheaper, faster) tier when that one has room.
    degrade_high_load_at: float = Field(default=0.60, gt=0, le=1)
    #: Load at which a tier is "critical": low-priority requests are refused as well.
    degrade_critical_at: float = Field(default=0.85, gt=0, le=1)
    #: Queue depths are sampled at most this often per producer process (for degradation; the
    #: bound itself is checked atomically in Redis on every submit).
    admission_sample_interval_ms: float = Field(default=250.0, ge=0)
    #: A producer's admission reservation expires after this long if it never publishes
    #: (a producer that died between reserving and publishing does not hold room forever).
    admission_reservation_ttl_s: float = Field(default=30.0, gt=0)

    # --- cost controls: response cache, fleet mode (tars_tasks/cache.py, tars_tasks/fleetmode.py) --
    #: Redis of the exact response cache. None: no cache. Give it an instance of its own with
    #: ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (docker-compose's ``redis-cache``): the
    #: broker's instance runs ``noeviction`` and must never be filled by cache entries. Whatever the
    #: instance, TARS bounds the cache itself (``cache_max_entries`` x ``cache_max_entry_bytes``).
    cache_url: str | None = None
    #: The explicit bound TARS enforces on the cache: at most this many entries (least recently
    #: used trimmed first, in the same Redis script that adds one) ...
    cache_max_entries: int = Field(default=100_000, ge=1)
    #: ... each at most this many bytes (a larger answer is not cached).
    cache_max_entry_bytes: int = Field(default=65_536, ge=256)
    #: Seconds a producer waits for the cache; a cache that does not answer is a miss, never an error.
    cache_timeout_s: float = Field(default=0.5, gt=0)
    #: The semantic cache (needs the ``semantic`` extra; tars_tasks/semantic.py): a cacheable miss
    #: of the exact cache is served another prompt's answer when their embeddings are within the
    #: tier's ``semantic_threshold``. Off by default; on without the extra: ConfigurationError.
    semantic_cache: bool = False
    #: Bound on one bucket (scope + model + context): the most recent answers kept, all of which a
    #: lookup compares against (brute-force cosine; the lookup's cost grows with it).
    semantic_max_candidates: int = Field(default=256, ge=1)
    #: Prompts longer than this are not semantically cached (the model reads 256 word pieces:
    #: beyond that two prompts would be compared on their beginnings only).
    semantic_max_prompt_chars: int = Field(default=1000, ge=1)
    #: Seconds a queued miss's embedding waits for its answer to be filled.
    semantic_pending_ttl_s: float = Field(default=86_400, gt=0)
    #: Threads torch may use for embeddings in a producer process (0: torch's default, every core).
    semantic_threads: int = Field(default=1, ge=0)
    #: The fleet mode is re-decided at most this often (by one process at a time, under a lock),
    #: and a producer re-reads it at most this often.
    mode_interval_s: float = Field(default=1.0, gt=0)
    #: Hysteresis: a mode is left downward only when load falls below its trigger minus this margin
    #: (60% -> leave high load below 50%; 85% -> leave critical below 75%) ...
    mode_leave_margin: float = Field(default=0.10, ge=0, lt=0.6)
    #: ... and only after the mode has lasted at least this long (upward moves are immediate).
    mode_min_dwell_s: float = Field(default=10.0, ge=0)
    #: Workers apply the fleet mode to work queued before it changed: in high load and critical,
    #: a queued sonnet/opus request below high priority runs on the cheaper tier.
    mode_apply_queued: bool = True
    #: Budgets (tars_tasks/budgets.py): at this share of a tenant's budget spent or reserved, its
    #: work moves from sonnet/opus to the cheaper tier; at 1.0 submits raise BudgetExceeded.
    budget_soft_fraction: float = Field(default=0.80, gt=0, le=1)
    #: Budgets on (needs the fleet-state Redis); a tenant with no limit set is not tracked.
    budgets_enabled: bool = True
    #: A budget reservation not settled within this long (its worker died) is charged at its worst
    #: case. Longer than any call with its retries (the tiers' retry budgets are 60-240 s).
    budget_reservation_lease_s: float = Field(default=600.0, gt=0)

    # --- the providers' batch lane (workers/batchlane/, docs/COST_CONTROLS.md) ----------------
    #: A provider batch is sent when this many batch-lane requests of one tier wait ...
    batch_max_requests: int = Field(default=1000, ge=1, le=50_000)
    #: ... or when the oldest of them has waited this long (seconds).
    batch_max_age_s: float = Field(default=60.0, ge=0)
    #: How often the batch runner looks for work and polls the batches in flight (seconds).
    batch_poll_interval_s: float = Field(default=30.0, gt=0)
    #: What happens to a request the batch did not answer (expired, canceled, a transient error):
    #: "interactive" sends it on to its tier's queue at the interactive price; "fail" fails it
    #: (``batch_expired``, or the error's reason). A permanent error (400) always fails it.
    batch_retry_policy: Literal["interactive", "fail"] = "interactive"
    #: Fault injection for tests: the batch runner SIGKILLs itself at this point (formed,
    #: before_submit, after_submit, polling, mid_results) the first time it gets there.
    batch_crash_at: str | None = None

    # --- simulated provider overrides (benchmarks, tests) -----------------------------------
    #: "uniform:LOW_MS:HIGH_MS" or "fixed:MS"; replaces every tier's latency profile.
    sim_latency: str | None = None
    sim_failure_rate: float | None = Field(default=None, ge=0, le=1)
    sim_seed: int | None = None
    #: Fault injection for tests: a prompt containing this text kills the worker mid-call.
    sim_crash_marker: str | None = None
    #: Fault injection for tests: a prompt containing this text gets an answer with a NUL
    #: character in it (which Postgres text columns refuse).
    sim_unstorable_marker: str | None = None

    # --- model calls: providers, fleet rate limiter, circuit breaker, retries ---------------
    #: Replaces every tier's ``provider`` ("simulated", "anthropic", "openai").
    provider_override: str | None = None
    #: Replaces every tier's ``base_url`` (e.g. the mock server: ``http://127.0.0.1:18080``).
    provider_base_url: str | None = None
    #: Fleet-wide RPM/TPM limiter on (needs Redis; embedded fleets have none).
    ratelimit_enabled: bool = True
    #: Length of the limiter's "minute": RPM and TPM are per this many seconds. Tests scale it down.
    ratelimit_window_s: float = Field(default=60.0, gt=0)
    #: Fraction of the catalog's RPM/TPM the fleet aims at; the rest absorbs network jitter,
    #: so the provider never counts more than the limit in any window.
    ratelimit_utilisation: float = Field(default=0.98, gt=0, le=1)
    #: A call reserves capacity at most this far ahead; further out it sleeps and asks again,
    #: so a reservation is never held for a caller that may have gone.
    ratelimit_max_wait_s: float = Field(default=30.0, gt=0)
    breaker_enabled: bool = True
    #: Consecutive failed calls (5xx, 529, timeouts, connection errors) that open a breaker.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    #: Seconds an open breaker refuses calls before it lets one probe through.
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    #: A worker that saw a breaker closed with no failures trusts that for this long before it
    #: asks Redis again: a breaker opened elsewhere reaches this worker within this time. The
    #: worker's own failures go to Redis at once. 0 asks Redis before every call.
    breaker_cache_s: float = Field(default=0.25, ge=0)
    #: While a tier's breaker is open: "fallback" to the tier's fallback tier (waiting only
    #: when it has none), or "wait" for the breaker to close within the retry budget.
    breaker_open_policy: Literal["fallback", "wait"] = "fallback"
    #: First step of the full-jitter exponential backoff, and its cap.
    retry_backoff_initial_s: float = Field(default=0.25, gt=0)
    retry_backoff_max_s: float = Field(default=20.0, gt=0)

    @field_validator("namespace")
    @classmethod
    def _namespace_is_simple(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("namespace must be non-empty and contain only letters, digits, '-', '_', '.'")
        return v

    @model_validator(mode="after")
    def _io_bound_exceeds_statement_timeout(self) -> Settings:
        if self.db_statement_timeout_s and self.db_io_timeout_s <= self.db_statement_timeout_s:
            raise ValueError(
                f"db_io_timeout_s ({self.db_io_timeout_s:g}) must exceed db_statement_timeout_s "
                f"({self.db_statement_timeout_s:g}): a slow statement should be cancelled by Postgres, "
                "not cut off by the client"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("memory://")

    @property
    def broker_redis_url(self) -> str | None:
        """The broker's URL when the broker is Redis (queue depths and kombu's unacked live there)."""
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return None

    @property
    def shared_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return None

    @property
    def ratelimit_redis_url(self) -> str | None:
        """Where the fleet rate limiter's state lives: with dispatch on a Redis broker, the broker's
        Redis (a dispatcher reserves a moved message's slot in the script that moves it, so the
        limiter's hashes must sit beside staging); otherwise the fleet state's Redis."""
        if self.dispatch_enabled and self.broker_redis_url is not None:
            return self.broker_redis_url
        return self.shared_redis_url


def describe_settings_error(exc: Exception) -> str:
    """One line naming the ``TARS_*`` setting that is wrong and why (never its value: it may be a secret)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    if not errors:
        return f"invalid settings: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc") or ())
    msg = str(first.get("msg") or "invalid").removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if loc:
        return f"invalid setting TARS_{loc.upper()}: {msg}{more}"
    return f"invalid settings: {msg}{more}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """This process's settings, read once from the environment.

    A bad ``TARS_*`` value is a one-line :class:`~tars_tasks.errors.ConfigurationError` naming
    the setting, raised here — where the settings are first needed — and not at import time.
    ``Settings(...)`` itself still raises pydantic's ``ValidationError``.
    """
    try:
        return Settings()
    except (ValidationError, SettingsError) as exc:
        from tars_tasks.errors import ConfigurationError  # the floor layer: imports nothing of TARS

        raise ConfigurationError(describe_settings_error(exc)) from None
