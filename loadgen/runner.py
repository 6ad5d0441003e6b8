"""Run scenarios end to end: fleet up, run row, drive, sample, read rows back, aggregate, store.

One invocation is a *session* (id ``YYYYmmdd-HHMMSS-xxxx``, the report directory's name);
each scenario step (a sweep has one per level) is a *run*: a ``runs`` row with id
``<session>-NN`` that its requests reference through ``requests.run_id``.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil

from config.settings import Settings
from loadgen import capabilities, costcontrols, metrics, samplers, store
from loadgen.clock import RunClock
from loadgen.drivers import ClosedLoop, DriveResult, OpenLoop, Progress
from loadgen.fleet import EmbeddedFleetHandle, ExternalFleet, Fleet, FleetMode, LocalFleet, probe_workers
from loadgen.records import RequestRecord, join
from loadgen.scenarios import RequestMix, Scenario
from loadgen.schedule import make_schedule
from loadgen.sweep import KneePolicy, find_knee, level_of, oversaturated_because
from tars_tasks.db.engine import get_engine
from tars_tasks.errors import LoadgenError

EMBEDDED_SLOTS = 200


class ProgressSink(Protocol):
    def begin(self, *, label: str, bound: str) -> None: ...

    def update(self, p: Progress) -> None: ...

    def end(self, *, label: str, aggregates: dict[str, Any]) -> None: ...


@dataclass
class StepResult:
    run_id: str
    scenario: str
    label: str
    level: float | None
    config: dict[str, Any]
    drive: dict[str, Any]
    aggregates: dict[str, Any]
    records: list[RequestRecord] = field(repr=False, default_factory=list)


@dataclass
class ScenarioResult:
    scenario: Scenario
    steps: list[StepResult]
    sweep: dict[str, Any] | None = None
    not_exercised: list[str] = field(default_factory=list)


@dataclass
class Session:
    id: str
    started_at: str
    finished_at: str | None
    environment: dict[str, Any]
    scenarios: list[ScenarioResult]
    out_dir: Path


def new_session_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def drive_info(d: DriveResult) -> dict[str, Any]:
    return {"kind": d.kind, "started_at": d.started_at, "window": list(d.window), "load_end": d.load_end,
            "ended_at": d.ended_at, "concurrency": d.concurrency, "rate_per_s": d.rate_per_s, "arrival": d.arrival,
            "stopped_early": d.stopped_early, "unfinished": d.unfinished, "latency_origin": d.latency_origin,
            "count_bounded": d.count_bounded, **d.extra}


def aggregate(records: Sequence[RequestRecord], drive: Mapping[str, Any], *,
              max_send_lag_p99_ms: float = metrics.DEFAULT_MAX_SEND_LAG_P99_MS, slots: int | None = None,
              limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aggregates from records and the stored drive info — used for a run and for re-checking one."""
    agg = metrics.compute(records, kind=drive["kind"], window=(drive["window"][0], drive["window"][1]),
                          started_at=drive["started_at"], load_end=drive["load_end"], ended_at=drive["ended_at"],
                          concurrency=drive.get("concurrency"), rate_per_s=drive.get("rate_per_s"),
                          max_send_lag_p99_ms=max_send_lag_p99_ms, count_bounded=bool(drive.get("count_bounded")),
                          slots=slots, limits=limits)
    if drive.get("stopped_early"):
        agg["valid"] = False
        agg["invalid_reasons"].append(f"stopped early: {drive['stopped_early']}")
    return agg


def rate_limits_in_force(*, settings: Settings, fleet_kind: str, catalog_path: Path | None) -> dict[str, Any]:
    """The fleet-wide RPM/TPM limits the fleet under test enforced (or why there were none)."""
    if fleet_kind == "embedded":
        return {"enforced": False, "why": "the embedded fleet has no Redis, so no fleet-wide rate limiter"}
    if not settings.ratelimit_enabled:
        return {"enforced": False, "why": "TARS_RATELIMIT_ENABLED is off"}
    from config.catalog import load_catalog

    catalog = load_catalog(catalog_path or settings.catalog_path)
    source = ("the catalog of the local fleet loadgen started" if fleet_kind == "local" else
              "this process's catalog, assumed to be the external fleet's")
    return {"enforced": True, "source": source, "window_s": settings.ratelimit_window_s,
            "utilisation": settings.ratelimit_utilisation,
            "tiers": {t: {"rpm": spec.rpm, "tpm": spec.tpm} for t, spec in catalog.tiers.items()}}


def fleet_settings_env(fleet_settings: Mapping[str, Any]) -> dict[str, str]:
    """A scenario's fleet settings as the ``TARS_*`` environment of the workers loadgen starts."""
    return {f"TARS_{k.upper()}": (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fleet_settings.items()}


def check_budgets_enforceable(scenarios: Sequence[Scenario], *, settings: Settings) -> None:
    """A run budget (``budget_usd``) needs the fleet's budgets, which live in its Redis: refuse it where
    nothing would enforce it (the embedded fleet) — a budget nobody enforces is not a budget."""
    budgeted = [sc.name for sc in scenarios if sc.budget_usd is not None]
    if budgeted and settings.shared_redis_url is None:
        raise LoadgenError(f"{', '.join(budgeted)}: a run budget needs the fleet's budgets, which live in its "
                           "Redis; the embedded fleet has none: set TARS_BROKER_URL and run with --fleet local")


class Runner:
    def __init__(self, *, settings: Settings, out_dir: Path, session_id: str | None = None,
                 mode: FleetMode = "auto", worker_env: Mapping[str, str] | None = None, time_scale: float = 1.0,
                 progress: ProgressSink | None = None, embedded_slots: int = EMBEDDED_SLOTS,
                 max_send_lag_p99_ms: float = metrics.DEFAULT_MAX_SEND_LAG_P99_MS,
                 knee_policy: KneePolicy | None = None) -> None:
        self.settings = settings
        self.session_id = session_id or new_session_id()
        self.out_dir = out_dir
        if mode == "auto":
            mode = "embedded" if settings.embedded else "external"
        if mode == "embedded" and not settings.embedded:
            raise LoadgenError("--fleet embedded needs the memory:// broker: unset TARS_BROKER_URL")
        if mode in ("local", "external") and settings.embedded:
            raise LoadgenError(f"--fleet {mode} needs a real broker: set TARS_BROKER_URL and TARS_DATABASE_URL")
        if not time_scale > 0:
            raise LoadgenError(f"time scale must be > 0, got {time_scale:g}")
        self.mode = mode
        self.worker_env = dict(worker_env) if worker_env is not None else {
            k: v for k, v in os.environ.items() if k.startswith("TARS_")}
        self.time_scale = time_scale
        self.progress = progress
        self.embedded_slots = embedded_slots
        self.max_send_lag_p99_ms = max_send_lag_p99_ms
        self.knee_policy = knee_policy or KneePolicy()
        self.present = capabilities.probe()
        self._fleet: Fleet | None = None
        self._fleet_key: tuple[Any, ...] | None = None
        self._index = 0
        self.engine = get_engine(settings.database_url)
        if self.mode != "embedded":
            self.preflight()

    def preflight(self) -> None:
        """Before anything starts: the broker answers and the database has this code's schema
        (otherwise workers would wait for Redis forever, and a run would fail at its first row)."""
        from tars_tasks.embedded import ensure_schema

        url = self.settings.broker_url
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            try:
                client.ping()
            except redis.RedisError as exc:
                raise LoadgenError(f"broker {url.split('@')[-1]} unavailable: {exc}") from None
            finally:
                client.close()
        ensure_schema(self.settings)

    # --- fleet ---------------------------------------------------------------------------------

    def _fleet_for(self, sc: Scenario) -> Fleet:
        if self.mode == "embedded":
            if self._fleet is None:
                self._fleet = EmbeddedFleetHandle(concurrency=self.embedded_slots)
            return self._fleet
        if self.mode == "external":
            if self._fleet is None:
                from tars_tasks.celery_app import make_app

                if probe_workers(make_app(self.settings)) == 0:
                    raise LoadgenError("no worker answered on the broker; start workers (tars worker ...) "
                                       "or let loadgen start them with --fleet local")
                self._fleet = ExternalFleet(broker_url=self.settings.broker_url)
            return self._fleet
        key = (sc.workers, sc.worker_concurrency, tuple(sorted(sc.catalog_overrides.items())),
               tuple(sorted(sc.fleet_settings.items())), json.dumps(sc.mock_provider, sort_keys=True),
               "batch" in sc.lanes)
        if self._fleet is None or self._fleet_key != key:
            self.stop_fleet()
            env = {**self.worker_env, **fleet_settings_env(sc.fleet_settings)}
            self._fleet = LocalFleet(count=sc.workers, concurrency=sc.worker_concurrency, env=env,
                                     log_dir=self.out_dir / "workers" / f"{self._index:02d}",
                                     name_prefix=f"lg{self.session_id[-4:]}w",
                                     catalog_overrides=dict(sc.catalog_overrides),
                                     mock_provider=None if sc.mock_provider is None else dict(sc.mock_provider),
                                     batch_runner="batch" in sc.lanes).start()
            self._fleet_key = key
        return self._fleet

    def stop_fleet(self) -> None:
        if self._fleet is not None:
            self._fleet.stop()
        self._fleet, self._fleet_key = None, None

    def _client(self, sc: Scenario | None = None, fleet: Fleet | None = None):
        """The generator's producer. On a local fleet it shares the workers' fleet settings and
        catalog (a batch-lane submit is checked against the catalog's provider)."""
        from tars_tasks.client import TarsClient

        if self.mode == "embedded":
            return TarsClient()
        if self.mode == "local":
            update: dict[str, Any] = dict(sc.fleet_settings) if sc is not None else {}
            catalog = getattr(fleet, "catalog_file", None)
            if catalog is not None:
                update["catalog_path"] = catalog
            if update:
                return TarsClient(settings=self.settings.model_copy(update=update))
        return TarsClient(settings=self.settings)

    def refusal(self, sc: Scenario) -> str | None:
        """Why this fleet cannot run ``sc`` at all (None: it can), in one line."""
        if sc.mock_provider is not None and self.mode != "local":
            what = ("the mock provider with its batch APIs and a batch runner" if "batch" in sc.lanes
                    else "the mock provider")
            return (f"scenario {sc.name} needs --fleet local: loadgen starts {what} only for a local fleet "
                    f"(set TARS_BROKER_URL and TARS_DATABASE_URL); the {self.mode} fleet "
                    + ("has neither" if self.mode == "embedded" else "is not loadgen's to reconfigure"))
        return None

    # --- steps ---------------------------------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        return {"host": platform.node(), "python": platform.python_version(), "platform": platform.platform(),
                "cpus": psutil.cpu_count(), "memory_gb": round(vm.total / 2**30, 1), "fleet_mode": self.mode,
                "broker": self.settings.broker_url.split("@")[-1], "database": self.engine.url.render_as_string(
                    hide_password=True), "sim_latency": self.settings.sim_latency,
                "sim_failure_rate": self.settings.sim_failure_rate, "capabilities_present": self.present}

    def run_step(self, sc: Scenario, *, label: str, level: float | None = None) -> StepResult:
        fleet = self._fleet_for(sc)
        if self.mode != "embedded":
            store.ensure_schema(self.engine)
        run_id = f"{self.session_id}-{self._index:02d}"
        self._index += 1
        config = {**sc.config(), "label": label, "level": level, "session": self.session_id,
                  "fleet": fleet.describe(), "fleet_kind": fleet.kind, "fleet_processes": fleet.processes,
                  "fleet_slots": fleet.slots,
                  "rate_limits": rate_limits_in_force(settings=self.settings, fleet_kind=fleet.kind,
                                                      catalog_path=getattr(fleet, "catalog_file", None)),
                  "prices": costcontrols.prices_in_force(getattr(fleet, "catalog_file", None)
                                                         or self.settings.catalog_path),
                  "prices_source": ("the catalog of the local fleet loadgen started" if fleet.kind == "local" else
                                    "this process's catalog" + (", assumed to be the external fleet's"
                                                                if fleet.kind == "external" else ""))}
        store.create_run(self.engine, run_id=run_id, name=label, scenario=sc.name, config=config)
        client = self._client(sc, fleet)
        sampler = samplers.ResourceSampler(pids=fleet.pids, interval_s=sc.sample_interval_s).start()
        bound = f"{sc.count} requests" if sc.count is not None else f"{sc.duration_s:g} s"
        if self.progress is not None:
            self.progress.begin(label=label, bound=bound)
        views = None
        try:
            if sc.job_template is not None:
                drive, views = self._drive_jobs(sc, client=client, run_id=run_id)
            else:
                drive = self._drive(sc, client=client, run_id=run_id)
        finally:
            samples = sampler.stop()
            client.close()
        info = drive_info(drive)
        rows = store.fetch_rows(self.engine, run_id=run_id)
        records = join(samples=drive.samples, rows=rows, origin=drive.latency_origin, ended_at=drive.ended_at)
        agg = aggregate(records, info, max_send_lag_p99_ms=self.max_send_lag_p99_ms, slots=fleet.slots,
                        limits=config["rate_limits"])
        agg["retries"]["outcomes"] = store.call_outcomes(self.engine, run_id=run_id)
        what = ("this process: the embedded fleet's workers are threads of the generator's process, so this "
                "includes the generator" if fleet.kind == "embedded" else
                f"the {len(fleet.pids())} worker process(es) of the fleet (and their children), not the generator"
                if fleet.pids() else "none reachable from this host")
        agg["resources"] = samplers.summarise(samples, after=drive.window[0], processes=what)
        changes = store.mode_changes(self.engine, namespace=self.settings.namespace, until=drive.ended_at)
        agg["cost_controls"] = costcontrols.figures(records, mode_changes=changes, start=drive.started_at,
                                                    end=drive.ended_at, budget_usd=sc.budget_usd,
                                                    tenant=self._tenant(sc, run_id), prices=config["prices"],
                                                    batch_timing=self._batch_timing(sc))
        agg["cost_controls"]["file"] = costcontrols.write_mode_changes(self.out_dir, run_id, changes)
        missing = capabilities.not_exercised(sc.requires, agg, fleet_processes=fleet.processes, present=self.present)
        agg["not_exercised"] = list(missing)
        agg["invalid_reasons"].extend(f"the mechanism under test did not act — {m}" for m in missing)
        if sc.fleet_settings and fleet.kind != "local":
            agg["not_exercised"].append(
                f"fleet settings {dict(sc.fleet_settings)} not applied: loadgen sets them only on a local fleet it "
                f"starts; this {fleet.kind} fleet ran with its own")
        if sc.catalog_overrides and fleet.kind != "local":
            agg["not_exercised"].append(
                f"catalog overrides {dict(sc.catalog_overrides)} not applied: loadgen sets them only on a local fleet "
                f"it starts; this {fleet.kind} fleet ran with its own catalog")
            if sc.overrides_required:
                agg["invalid_reasons"].append(f"the scenario exists to run with {dict(sc.catalog_overrides)}, which "
                                              f"this {fleet.kind} fleet did not apply")
        if views is not None:
            from loadgen import jobs as jobs_mod

            agg["jobs"] = jobs_mod.job_figures(views, run_start=drive.started_at, run_end=drive.ended_at,
                                               workers=fleet.processes)
            agg["jobs"]["file"] = jobs_mod.write_jobs_file(self.out_dir, run_id, views)
            agg["invalid_reasons"].extend(jobs_mod.check_figures(agg["jobs"]))
        agg["valid"] = not agg["invalid_reasons"]
        store.finish_run(self.engine, run_id=run_id, aggregates=agg, samples=drive.samples, drive=info)
        self._write_records(run_id, records, samples)
        if self.progress is not None:
            self.progress.end(label=label, aggregates=agg)
        return StepResult(run_id=run_id, scenario=sc.name, label=label, level=level, config=config, drive=info,
                          aggregates=agg, records=records)

    def _batch_timing(self, sc: Scenario) -> dict[str, Any] | None:
        """What a batch-lane request of ``sc`` waits for (the report states it beside its latency)."""
        if "batch" not in sc.lanes:
            return None
        s = self.settings.model_copy(update=dict(sc.fleet_settings))
        delay = (sc.mock_provider or {}).get("batch_delay_s")
        return {"batch_max_age_s": s.batch_max_age_s, "batch_poll_interval_s": s.batch_poll_interval_s,
                "batch_delay_s": delay,
                "provider": f"the mock ends each batch {delay:g} s after it was created, `batch_delay_s`"
                if delay is not None else "the provider's own time"}

    @staticmethod
    def _tenant(sc: Scenario, run_id: str) -> str:
        """A budget scenario runs as a tenant of its own (the budget is per loadgen run)."""
        return f"run-{run_id}" if sc.budget_usd is not None else "loadgen"

    def _set_budget(self, sc: Scenario, run_id: str) -> None:
        if sc.budget_usd is None:
            return
        from decimal import Decimal

        from tars_tasks.budgets import Budgets

        budgets = Budgets.for_settings(self.settings)
        if budgets is not None:
            budgets.set_limit(tenant=self._tenant(sc, run_id), period="day", usd=Decimal(str(sc.budget_usd)))

    def _drive(self, sc: Scenario, *, client, run_id: str) -> DriveResult:
        self._set_budget(sc, run_id)
        factory = RequestMix(roles=sc.roles, seed=sc.seed, tenant=self._tenant(sc, run_id),
                             prompt_pool=sc.prompt_pool, zipf_s=sc.zipf_s, temperature=sc.temperature,
                             priorities=sc.priorities, tenants=sc.tenants, lanes=sc.lanes, cache=sc.cache)
        common = {"producer": client, "factory": factory, "warmup_s": sc.warmup_s, "run_id": run_id,
                  "drain_timeout_s": sc.drain_timeout_s, "clock": RunClock(),
                  "on_progress": self.progress.update if self.progress is not None else None}
        if sc.kind == "open":
            if not sc.rate_per_s:
                raise LoadgenError(f"scenario {sc.name}: an open loop needs rate_per_s")
            schedule = make_schedule(rate_per_s=sc.rate_per_s, arrival=sc.arrival, duration_s=sc.duration_s,  # type: ignore[arg-type]
                                     count=sc.count if sc.duration_s is None else None, seed=sc.seed)
            return OpenLoop(schedule=schedule, rate_per_s=sc.rate_per_s, arrival=sc.arrival,
                            max_in_flight=sc.max_in_flight, count_bounded=sc.duration_s is None, **common).run()
        return ClosedLoop(concurrency=sc.concurrency, duration_s=sc.duration_s, count=sc.count, **common).run()

    def _drive_jobs(self, sc: Scenario, *, client, run_id: str):
        """Jobs in a closed loop; the drive's samples are their step requests (loadgen/jobs.py)."""
        from loadgen import jobs as jobs_mod


        def progress(sent: int, done: int) -> None:
            if self.progress is not None:
                self.progress.update(Progress(elapsed_s=time.time() - t0, sent=sent, done=done, in_flight=sent - done,
                                              failed=0, phase="jobs"))

        t0 = time.time()
        ids, start, end, unfinished = jobs_mod.drive_jobs(
            client=client, template=sc.job_template, count=sc.count, concurrency=sc.concurrency, run_id=run_id,
            seed=sc.seed, reject_share=sc.reject_share, timeout_s=sc.drain_timeout_s * 10, on_progress=progress)
        rows = store.fetch_rows(self.engine, run_id=run_id)
        drive = jobs_mod.drive_result(rows=rows, start=start, end=end, concurrency=sc.concurrency,
                                      unfinished=unfinished)
        return drive, client.jobs.get_many(ids)

    def _write_records(self, run_id: str, records: Sequence[RequestRecord],
                       samples: Sequence[samplers.Sample] = ()) -> None:
        """The raw rows every figure is recomputed from: one line per request (with its
        api_calls), one line per memory/CPU sample."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"requests-{run_id}.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(r.as_json(), separators=(",", ":")) + "\n")
        with (self.out_dir / f"samples-{run_id}.jsonl").open("w") as fh:
            for sm in samples:
                fh.write(json.dumps({"t": sm.t, "pid": sm.pid, "rss": sm.rss, "cpu_percent": sm.cpu_percent},
                                    separators=(",", ":")) + "\n")

    # --- scenarios -----------------------------------------------------------------------------

    def run_scenario(self, sc: Scenario) -> ScenarioResult:
        sc = sc.scaled(self.time_scale).check()
        why = self.refusal(sc)
        if why:
            raise LoadgenError(why)
        if sc.kind != "sweep":
            step = self.run_step(sc, label=sc.name)
            return ScenarioResult(scenario=sc, steps=[step], not_exercised=list(step.aggregates["not_exercised"]))
        return self._sweep(sc)

    def _sweep(self, sc: Scenario) -> ScenarioResult:
        notes: list[str] = []
        levels = list(sc.levels)
        if sc.axis == "workers" and self.mode != "local":
            notes.append(f"worker-process scaling over {', '.join(f'{x:g}' for x in levels)}: not exercised — the "
                         f"fleet is {self.mode}; loadgen varies worker processes only for a local fleet "
                         "(--fleet local with TARS_BROKER_URL/TARS_DATABASE_URL set). One step ran on the fleet as is.")
            levels = levels[:1]
        steps: list[StepResult] = []
        done = []
        stopped = None
        for i, lv in enumerate(levels):
            if sc.axis == "concurrency":
                step_sc = replace(sc, kind="closed", concurrency=int(lv))
            elif sc.axis == "workers":
                step_sc = replace(sc, kind="closed", workers=int(lv))
            else:
                step_sc = replace(sc, kind="open", rate_per_s=float(lv))
            step = self.run_step(step_sc, label=f"{sc.name} @ {sc.axis}={lv:g}", level=float(lv))
            steps.append(step)
            done.append(level_of(float(lv), step.aggregates))
            why = oversaturated_because(done, self.knee_policy)
            if why and i < len(levels) - 1:
                stopped = {"why": why, "not_run": levels[i + 1 :]}
                break
        knee = find_knee(done, self.knee_policy)
        for s in steps:
            notes.extend(n for n in s.aggregates["not_exercised"] if n not in notes)
        return ScenarioResult(scenario=sc, steps=steps, not_exercised=notes,
                              sweep={"axis": sc.axis, "levels": [d.level for d in done], **knee, "stopped": stopped,
                                     "policy": vars(self.knee_policy) if hasattr(self.knee_policy, "__dict__") else {
                                         f: getattr(self.knee_policy, f) for f in self.knee_policy.__slots__}})

    def run(self, scenarios: Sequence[Scenario]) -> Session:
        for sc in scenarios:  # every parameter checked before any fleet starts
            sc.scaled(self.time_scale).check()
            why = self.refusal(sc)
            if why:
                raise LoadgenError(why)
        check_budgets_enforceable(scenarios, settings=self.settings)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        results = []
        t0 = time.monotonic()
        try:
            for sc in scenarios:
                results.append(self.run_scenario(sc))
        finally:
            self.stop_fleet()
        env = self.environment()
        env["wall_time_s"] = round(time.monotonic() - t0, 1)
        return Session(id=self.session_id, started_at=started, finished_at=datetime.now(UTC).isoformat(
            timespec="seconds"), environment=env, scenarios=results, out_dir=self.out_dir)
