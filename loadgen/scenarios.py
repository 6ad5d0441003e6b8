"""Named load scenarios: the seed report's, as presets, plus larger closed-loop levels.

A scenario says *what load* (driver, concurrency or rate, bound, warm-up, request mix) and
*what fleet* it wants (worker processes when loadgen starts a local fleet, catalog overrides).
``requires`` names capabilities the scenario is about; the report says which of them the
fleet under test did not have, instead of pretending they were exercised.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from tars_tasks.errors import LoadgenError

Kind = Literal["closed", "open", "sweep"]
SweepAxis = Literal["concurrency", "workers", "rate"]

#: The seed's mix: research/analysis/validation on haiku, engineering/writing on sonnet.
DEFAULT_ROLES: dict[str, float] = {"researcher": 0.3, "analyst": 0.2, "validator": 0.2, "engineer": 0.2,
                                   "writer": 0.1}
PROMPT_CHARS = 600


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    kind: Kind = "closed"
    concurrency: int = 1
    duration_s: float | None = 10.0
    count: int | None = None
    warmup_s: float = 2.0
    rate_per_s: float | None = None
    arrival: str = "constant"
    seed: int = 1
    #: sweep only: the levels and what they vary.
    levels: tuple[float, ...] = ()
    axis: SweepAxis = "concurrency"
    #: worker processes for a local fleet (ignored by the embedded and external fleets).
    workers: int = 1
    worker_concurrency: int = 200
    roles: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    #: TARS priority -> share of the requests (None: every request at normal priority, the default).
    priorities: Mapping[int, float] | None = None
    #: tenant -> share of the requests (None: every request from tenant ``loadgen``).
    tenants: Mapping[str, float] | None = None
    sample_interval_s: float = 0.5
    drain_timeout_s: float = 60.0
    max_in_flight: int = 20_000
    #: Per-tier catalog overrides for a local fleet, e.g. {"rpm": 600}.
    catalog_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: Fleet-wide settings for a local fleet (Settings field -> value), given to its workers and to
    #: the generator's producer alike (e.g. {"max_queue_depth": 100}: the admission bound every
    #: process must share); an external or embedded fleet keeps its own (stated in the report).
    fleet_settings: Mapping[str, Any] = field(default_factory=dict)
    #: The scenario means nothing without its overrides (a run on a fleet that did not apply
    #: them is invalid); otherwise not applying them is only stated.
    overrides_required: bool = False
    requires: tuple[str, ...] = ()
    description: str = ""
    #: Run jobs of this template (loadgen/jobs.py) instead of single requests: ``count`` jobs,
    #: ``concurrency`` in flight; ``reject_share`` of them get one rejection from their validator.
    job_template: str | None = None
    reject_share: float = 0.3
    #: Repeated prompts (the response cache): draw each request's prompt from this many distinct ones,
    #: Zipf-distributed with exponent ``zipf_s`` (None: every prompt is new).
    prompt_pool: int | None = None
    zipf_s: float = 1.1
    #: The requests' temperature (None: the role's default; 0 makes them cacheable).
    temperature: float | None = None
    #: A budget (USD per day) for the run's own tenant (``run-<run id>``), set before the run starts.
    budget_usd: float | None = None
    #: Send each request of the mix once per lane, interleaved (requests 2k and 2k+1: the same role,
    #: prompt and max_tokens, one ``interactive``, one ``batch``). Empty: every request interactive.
    lanes: tuple[str, ...] = ()
    #: The requests' ``cache`` option (None: the default; False keeps the response cache out of a comparison).
    cache: bool | None = None
    #: A local fleet starts ``tars mock-llm`` with these MockConfig fields on a free 127.0.0.1 port and
    #: points every tier at it (its Anthropic API, over HTTP); and a ``tars batch-runner`` if a lane is
    #: ``batch``. None: the simulated provider (no batch API). Only a local fleet can do either.
    mock_provider: Mapping[str, Any] | None = None

    def with_overrides(self, **kw: Any) -> Scenario:
        kw = {k: v for k, v in kw.items() if v is not None}
        if "levels" in kw:
            kw["levels"] = tuple(kw["levels"])
        if kw.get("rate_per_s") is not None and self.kind == "closed":
            kw.setdefault("kind", "open")
        return replace(self, **kw)

    def scaled(self, factor: float) -> Scenario:
        """Durations (not counts) multiplied by ``factor``; for quick runs and tests."""
        if factor == 1.0:
            return self
        return replace(self, duration_s=None if self.duration_s is None else self.duration_s * factor,
                       warmup_s=self.warmup_s * factor)

    def problems(self) -> list[str]:
        """What is wrong with the scenario's parameters (empty: it can run)."""
        out = []
        if self.kind not in ("closed", "open", "sweep"):
            out.append(f"kind must be closed, open or sweep, not {self.kind!r}")
        if self.job_template is not None and (self.count is None or self.kind != "closed"):
            out.append("a jobs scenario needs a count and a closed loop")
        if self.duration_s is None and self.count is None:
            out.append("needs a bound: a duration or a count")
        if self.duration_s is not None and not self.duration_s > 0:
            out.append(f"duration must be > 0 s, got {self.duration_s:g}")
        if self.count is not None and self.count < 1:
            out.append(f"count must be >= 1, got {self.count}")
        if not self.warmup_s >= 0:
            out.append(f"warm-up must be >= 0 s, got {self.warmup_s:g}")
        elif self.count is None and self.duration_s is not None and self.warmup_s >= self.duration_s:
            out.append(f"warm-up ({self.warmup_s:g} s) must be shorter than the duration ({self.duration_s:g} s): "
                       "no steady window would remain")
        if self.kind in ("closed", "sweep") and self.concurrency < 1:
            out.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.kind == "open" and not (self.rate_per_s or 0) > 0:
            out.append(f"an open loop needs a rate > 0 per second, got {self.rate_per_s}")
        if self.arrival not in ("constant", "poisson"):
            out.append(f"arrival must be constant or poisson, not {self.arrival!r}")
        if self.kind == "sweep":
            if not self.levels:
                out.append("a sweep needs levels")
            for lv in self.levels:
                if not lv > 0 or (self.axis != "rate" and lv != int(lv)):
                    out.append(f"sweep level {lv:g} must be {'> 0' if self.axis == 'rate' else 'a whole number >= 1'}")
        if self.workers < 1 or self.worker_concurrency < 1:
            out.append(f"workers and worker concurrency must be >= 1, got {self.workers} x {self.worker_concurrency}")
        if not self.sample_interval_s > 0:
            out.append(f"sample interval must be > 0 s, got {self.sample_interval_s:g}")
        if not self.drain_timeout_s >= 0 or self.max_in_flight < 1:
            out.append("drain timeout must be >= 0 s and max in flight >= 1")
        if self.prompt_pool is not None and (self.prompt_pool < 1 or not self.zipf_s > 0):
            out.append(f"a prompt pool needs >= 1 prompts and a Zipf exponent > 0, got {self.prompt_pool} and "
                       f"{self.zipf_s:g}")
        if self.budget_usd is not None and not self.budget_usd >= 0:
            out.append(f"budget must be >= 0 USD, got {self.budget_usd:g}")
        if any(lane not in ("interactive", "batch") for lane in self.lanes) or len(set(self.lanes)) != len(self.lanes):
            out.append(f"lanes must be distinct, of interactive and batch, got {list(self.lanes)}")
        if "batch" in self.lanes and self.mock_provider is None:
            out.append("a batch lane needs a provider with a batch API: give the scenario a mock_provider")
        if not self.roles or any(not w >= 0 for w in self.roles.values()) or sum(self.roles.values()) <= 0:
            out.append(f"bad role mix {dict(self.roles)!r}")
        return out

    def check(self) -> Scenario:
        """The scenario itself, or :class:`LoadgenError` naming every bad parameter."""
        bad = self.problems()
        if bad:
            raise LoadgenError(f"scenario {self.name}: " + "; ".join(bad))
        return self

    def config(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in ((f, getattr(self, f)) for f in self.__dataclass_fields__)}


class RequestMix:
    """Request *i* of a run: a role drawn (seeded) from the mix and a prompt of fixed size."""

    def __init__(self, *, roles: Mapping[str, float], seed: int, prompt_chars: int = PROMPT_CHARS,
                 tenant: str = "loadgen", prompt_pool: int | None = None, zipf_s: float = 1.1,
                 temperature: float | None = None, priorities: Mapping[int, float] | None = None,
                 tenants: Mapping[str, float] | None = None, lanes: tuple[str, ...] = (),
                 cache: bool | None = None) -> None:
        for what, mix in (("role", roles), ("priority", priorities or {5: 1.0}), ("tenant", tenants or {tenant: 1})):
            if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise LoadgenError(f"bad {what} mix {dict(mix)!r}")
        self.roles = list(roles)
        self.weights = [roles[r] for r in self.roles]
        self.seed = seed
        self.tenant = tenant
        self.priorities = dict(priorities) if priorities else None
        self.tenants = dict(tenants) if tenants else None
        body = "Summarise the findings, list the risks and propose the next three steps. "
        self._body = (body * (prompt_chars // len(body) + 1))[:prompt_chars]
        self.prompt_pool = prompt_pool
        self.temperature = temperature
        self.lanes = tuple(lanes)
        self.cache = cache
        if prompt_pool is not None:  # Zipf: prompt k (1-based) has weight 1 / k^s
            acc, self._cum = 0.0, []
            for k in range(1, prompt_pool + 1):
                acc += 1.0 / k ** zipf_s
                self._cum.append(acc)

    def __call__(self, i: int) -> dict[str, Any]:
        lane = None
        if self.lanes:  # request i is request i // len(lanes) of the mix, in lane i % len(lanes)
            lane, i = self.lanes[i % len(self.lanes)], i // len(self.lanes)
        out = self._request(i)
        if lane is not None:
            out["lane"] = lane
        if self.cache is not None:
            out["cache"] = self.cache
        return out

    def _request(self, i: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + i)
        role = rng.choices(self.roles, self.weights)[0]
        if self.prompt_pool is None:
            out: dict[str, Any] = {"role": role, "prompt": f"[{i}] {self._body}", "tenant": self.tenant}
        else:  # the same prompt is the same request only with the same role: draw both from the rank
            k = rng.choices(range(self.prompt_pool), cum_weights=self._cum)[0]
            role = random.Random(self.seed * 7_919 + k).choices(self.roles, self.weights)[0]
            out = {"role": role, "prompt": f"[s{self.seed}p{k}] {self._body}", "tenant": self.tenant}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.priorities:
            out["priority"] = rng.choices(list(self.priorities), list(self.priorities.values()))[0]
        if self.tenants:
            out["tenant"] = rng.choices(list(self.tenants), list(self.tenants.values()))[0]
        return out


#: Rate limits far above any load this machine can offer: the c1000/c2000 presets measure the
#: fleet, not the default catalog's limits (which would bind at ~90 req/s for the default mix).
UNLIMITED: dict[str, Any] = {"rpm": 10_000_000, "tpm": 10_000_000_000}

_P = Scenario
PRESETS: dict[str, Scenario] = {s.name: s for s in [
    _P("baseline", "Baseline — single request at a time", concurrency=1, duration_s=10, warmup_s=2,
       roles={"engineer": 1.0}, description="One request in flight (sonnet): the latency floor."),
    _P("concurrent-10", "Concurrent requests — 10", concurrency=10, duration_s=10),
    _P("concurrent-25", "Concurrent requests — 25", concurrency=25, duration_s=10),
    _P("concurrent-50", "Concurrent requests — 50", concurrency=50, duration_s=15),
    _P("concurrent-100", "Concurrent requests — 100", concurrency=100, duration_s=20, workers=5),
    _P("multi-agent", "Multi-agent jobs — research → write → validate over 5 worker processes", concurrency=50,
       duration_s=None, count=100, warmup_s=0, workers=5, job_template="research-write-validate",
       requires=("worker_processes",),
       description="100 jobs of research-write-validate (3 researchers in parallel, a writer, a validator that "
                   "sends 30% of drafts back once), 50 in flight, over 5 worker processes serving every tier: job "
                   "completion time, the critical path against the sum of step latencies, cost per job by tier, "
                   "and how evenly the workers shared the steps."),
    _P("memory-30s", "Memory profile — 30 seconds", concurrency=20, duration_s=30, warmup_s=5,
       sample_interval_s=0.1),
    _P("memory-5m", "Memory profile — 5 minutes", concurrency=30, duration_s=300, warmup_s=30,
       sample_interval_s=0.5),
    _P("degradation", "Response-time degradation curve", kind="sweep", axis="concurrency",
       levels=(1, 5, 10, 25, 50, 75, 100), duration_s=10, warmup_s=2,
       description="Closed loop stepped through concurrency levels; stops at over-saturation."),
    _P("rate-limit", "API rate limiting", concurrency=50, duration_s=30, warmup_s=3,
       catalog_overrides={"rpm": 600}, overrides_required=True, requires=("fleet_rate_limiter",),
       priorities={0: 0.8, 9: 0.2}, tenants={"loadgen-a": 0.5, "loadgen-b": 0.5},
       description="Offered load above a lowered fleet-wide limit (600 requests/min per model); 20% of the "
                   "requests at high priority (9), the rest low (0), from two tenants: the report shows "
                   "throughput and latency per priority and per tenant, and whether priority held."),
    _P("overload-150", "Overload at 150 concurrent", concurrency=150, duration_s=60, warmup_s=3,
       workers=1, worker_concurrency=20, priorities={3: 0.3, 5: 0.5, 9: 0.2},
       fleet_settings={"max_queue_depth": 100, "mode_min_dwell_s": 3.0},
       requires=("degradation_modes", "admission_control"),
       description="Beyond capacity: 150 clients on a local fleet of 20 slots whose queue bound is 100 (its workers "
                   "and the generator share it): the fleet goes to high load (sonnet work to haiku) and critical "
                   "(low priority refused unless cached); the phases table is rebuilt from mode_changes."),
    _P("cache", "Response cache — Zipf-repeated prompts", concurrency=20, duration_s=20, warmup_s=2,
       prompt_pool=1000, zipf_s=1.1, temperature=0.0, requires=("response_cache",),
       description="Prompts drawn from 1000 distinct ones with Zipf(1.1) popularity at temperature 0: the exact "
                   "response cache's hit rate, hit vs model latency and the dollars it saved (needs "
                   "TARS_CACHE_URL)."),
    _P("budget", "Budget — a tenant crosses its budget mid-run", concurrency=20, duration_s=20, warmup_s=2,
       budget_usd=0.05, requires=("budgets",),
       description="The run's own tenant gets a $0.05 daily budget: past 80% its sonnet work moves to haiku, spent "
                   "its queued work fails `budget` and new submits raise BudgetExceeded; spend against the limit."),
    _P("batch", "Batch lane — the same requests interactive and through the providers' batch APIs",
       concurrency=200, duration_s=None, count=200, warmup_s=0, workers=1, worker_concurrency=50,
       lanes=("interactive", "batch"), cache=False,
       mock_provider={"latency": "fixed:20", "output_tokens": [200, 200], "batch_delay_s": 2.0},
       fleet_settings={"batch_max_age_s": 1.0, "batch_poll_interval_s": 0.5}, requires=("batch_lane",),
       description="100 requests of the default mix, each sent twice (interleaved: once interactive, once with "
                   "lane=batch; same prompt, role and max_tokens; the response cache off), all in flight at once, "
                   "on a local fleet whose every tier points at a `tars mock-llm` it starts (Anthropic API over "
                   "HTTP, 200 output tokens per answer, batches ending 2 s after creation) and one `tars "
                   "batch-runner`: dollars per request per lane, the ratio, and the batch lane's latency. Needs "
                   "--fleet local."),
    _P("scaling", "Horizontal scaling — 1, 5, 10 worker processes", kind="sweep", axis="workers",
       levels=(1, 5, 10), concurrency=100, duration_s=15, warmup_s=3, worker_concurrency=50,
       requires=("worker_processes",),
       description="Same offered load (C=100) on 1, 5 and 10 worker processes of 50 slots each."),
    _P("c1000", "Closed loop — 1000 in flight", concurrency=1000, duration_s=20, warmup_s=5, workers=2,
       worker_concurrency=500, catalog_overrides=UNLIMITED,
       description="1000 requests in flight on a local fleet whose rate limits are lifted (rpm/tpm far above the "
                   "load), so the fleet, not the catalog's limits, is what is measured."),
    _P("c2000", "Closed loop — 2000 in flight", concurrency=2000, duration_s=30, warmup_s=8, workers=4,
       worker_concurrency=500, catalog_overrides=UNLIMITED,
       description="2000 requests in flight on a local fleet whose rate limits are lifted (rpm/tpm far above the "
                   "load), so the fleet, not the catalog's limits, is what is measured."),
    _P("open", "Open loop — constant arrivals", kind="open", rate_per_s=20, duration_s=15, warmup_s=3,
       description="Arrivals on a fixed schedule; latency from the intended send time."),
    _P("open-sweep", "Open loop — Poisson arrivals stepped up to saturation", kind="sweep", axis="rate",
       levels=(10, 20, 40, 80, 160), arrival="poisson", duration_s=10, warmup_s=2, max_in_flight=5000,
       description="Offered rate stepped up on seeded Poisson schedules; stops once the fleet falls behind."),
]}

#: ``tars loadgen run all``: the seed report's scenarios (the 5-minute and 1000+ runs are opt-in).
SEED_SCENARIOS = ("baseline", "concurrent-10", "concurrent-25", "concurrent-50", "concurrent-100",
                  "multi-agent", "memory-30s", "degradation", "rate-limit", "overload-150", "scaling")


def get_scenario(name: str) -> Scenario:
    try:
        return PRESETS[name]
    except KeyError:
        raise LoadgenError(f"unknown scenario {name!r}; presets: {', '.join(PRESETS)}") from None
