"""``tars loadgen``: run scenarios, list presets, compare runs. Registered by ``tars_tasks.cli``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from tars_tasks.errors import LoadgenError


def _levels(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        levels = tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"levels must be comma-separated numbers, got {value!r}") from None
    if not levels or any(not lv > 0 for lv in levels):
        raise click.BadParameter(f"levels must be numbers > 0, got {value!r}")
    return levels


@click.group()
def loadgen() -> None:
    """Drive the fleet with load and write a report whose every number is measured."""


@loadgen.command("list")
def list_scenarios() -> None:
    """The named scenario presets."""
    from rich.table import Table

    from loadgen.progress import make_console
    from loadgen.scenarios import PRESETS, SEED_SCENARIOS

    t = Table(title="loadgen scenarios ('all' runs those marked *)")
    for col in ("name", "driver", "load", "bound", "workers", "title"):
        t.add_column(col)
    for s in PRESETS.values():
        load = (", ".join(f"{x:g}" for x in s.levels) + f" ({s.axis})" if s.kind == "sweep"
                else f"{s.rate_per_s:g}/s" if s.kind == "open" else f"C={s.concurrency}")
        bound = f"{s.count} req" if s.count is not None else f"{s.duration_s:g} s"
        t.add_row(s.name + (" *" if s.name in SEED_SCENARIOS else ""), s.kind, load, bound, str(s.workers), s.title)
    make_console().print(t)


POSITIVE_INT = click.IntRange(min=1)
POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
#: Exit status when a run is invalid (``--fail-if`` matching is 1, a usage error 2).
EXIT_INVALID = 3


@loadgen.command("run")
@click.argument("scenarios", nargs=-1)
@click.option("--concurrency", "-c", type=POSITIVE_INT, default=None, help="Requests in flight (closed loop).")
@click.option("--rate", type=POSITIVE, default=None, help="Arrivals per second (makes it an open loop).")
@click.option("--arrival", type=click.Choice(["constant", "poisson"]), default=None)
@click.option("--seed", type=int, default=None, help="Seed of the Poisson schedule and the role mix.")
@click.option("--duration", type=POSITIVE, default=None, help="Seconds of load (after which the drain starts).")
@click.option("--count", type=POSITIVE_INT, default=None, help="Requests to issue instead of a duration.")
@click.option("--warmup", type=NON_NEGATIVE, default=None, help="Seconds excluded from the steady window.")
@click.option("--levels", default=None, help="Sweep levels, comma-separated.")
@click.option("--workers", type=POSITIVE_INT, default=None, help="Worker processes of a local fleet.")
@click.option("--worker-concurrency", type=POSITIVE_INT, default=None, help="Slots per local worker process.")
@click.option("--fleet", "mode", type=click.Choice(["auto", "embedded", "local", "external"]), default="auto",
              show_default=True, help="auto: embedded without TARS_BROKER_URL, else the existing (external) fleet.")
@click.option("--embedded-slots", type=POSITIVE_INT, default=200, show_default=True,
              help="Thread slots of the embedded fleet.")
@click.option("--time-scale", type=POSITIVE, default=1.0, show_default=True,
              help="Multiply every duration (quick runs).")
@click.option("--sample-interval", type=POSITIVE, default=None, help="Seconds between memory/CPU samples.")
@click.option("--budget-usd", type=NON_NEGATIVE, default=None,
              help="A budget for the run: its requests run as a tenant of their own (run-<run id>) with this "
                   "daily USD limit (degraded past 80%, refused BudgetExceeded when spent); the report holds "
                   "spend against it.")
@click.option("--max-send-lag-ms", type=NON_NEGATIVE, default=10.0, show_default=True,
              help="An open loop whose p99 send lag exceeds this is marked invalid.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report directory (default reports/<session-id>/).")
@click.option("--fail-if", "fail_if", default=None, help="e.g. 'p99>4s,error_rate>5%': exit 1 if any run matches.")
@click.option("--allow-invalid", is_flag=True,
              help=f"Exit 0 even when a run is INVALID (default: exit {EXIT_INVALID}).")
@click.option("--progress/--no-progress", default=None, help="Live display (default: when on a terminal).")
def run(scenarios: tuple[str, ...], concurrency, rate, arrival, seed, duration, count, warmup, levels, workers,
        worker_concurrency, mode, embedded_slots, time_scale, sample_interval, budget_usd, max_send_lag_ms, out_dir,
        fail_if, allow_invalid, progress) -> None:
    """Run SCENARIOS (default: baseline; 'all' = the seed report's scenarios) and write the report.

    Exit status: 0 when every run is valid and no --fail-if condition matched; 1 when a
    condition matched; 2 for bad parameters (refused before anything starts); 3 when a run is
    INVALID (no request completed, steady window too short, generator fell behind, or the
    mechanism the scenario exists for did not act) unless --allow-invalid.
    """
    import signal
    from dataclasses import replace

    from config.settings import get_settings
    from loadgen import thresholds
    from loadgen.progress import LiveProgress, make_console
    from loadgen.report import all_steps, write_report
    from loadgen.runner import Runner, check_budgets_enforceable, new_session_id
    from loadgen.scenarios import SEED_SCENARIOS, get_scenario

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the workers of a local fleet are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    conditions = thresholds.parse(fail_if) if fail_if else []
    names = list(scenarios) or ["baseline"]
    if names == ["all"]:
        names = list(SEED_SCENARIOS)
    overrides = {"concurrency": concurrency, "rate_per_s": rate, "arrival": arrival, "seed": seed,
                 "warmup_s": warmup, "levels": _levels(levels), "workers": workers,
                 "worker_concurrency": worker_concurrency, "sample_interval_s": sample_interval,
                 "budget_usd": budget_usd}
    scs = []
    for name in names:
        sc = get_scenario(name).with_overrides(**overrides)
        if count is not None or duration is not None:
            sc = replace(sc, count=count, duration_s=duration)
        sc.scaled(time_scale).check()  # every parameter checked before anything starts
        scs.append(sc)
    settings = get_settings()
    check_budgets_enforceable(scs, settings=settings)
    session_id = new_session_id()
    out = out_dir or Path("reports") / session_id
    console = make_console()
    live = console.is_terminal if progress is None else progress
    runner = Runner(settings=settings, out_dir=out, session_id=session_id, mode=mode, time_scale=time_scale,
                    progress=LiveProgress(console=console, live=live), embedded_slots=embedded_slots,
                    max_send_lag_p99_ms=max_send_lag_ms)
    console.print(f"loadgen session [bold]{session_id}[/bold] on the {runner.mode} fleet: {', '.join(names)}")
    if runner.mode == "embedded":
        console.print(f"embedded database: {runner.engine.url.database}")
    session = runner.run(scs)
    paths = write_report(session, command=shlex.join(["tars", *sys.argv[1:]]))
    console.print(f"report: {paths['markdown']}\njson:   {paths['json']}")
    for name, p in paths.items():
        if name.endswith(".png"):
            console.print(f"plot:   {p}")
    steps = all_steps(session)
    if conditions:
        for note in thresholds.unchecked(conditions, [(s.label, s.aggregates) for s in steps]):
            console.print(f"[yellow]fail-if:[/yellow] {note}")
        bad = thresholds.violations(conditions, [(s.label, s.aggregates) for s in steps])
        if bad:
            for b in bad:
                console.print(f"[red]fail-if:[/red] {b}")
            sys.exit(1)
        console.print(f"fail-if: no run matched {fail_if!r}")
    invalid = [s for s in steps if not s.aggregates["valid"]]
    if invalid:
        for s in invalid:
            console.print(f"[red]INVALID[/red] {s.label}: {'; '.join(s.aggregates['invalid_reasons'])}")
        if not allow_invalid:
            sys.exit(EXIT_INVALID)


def _fmt(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.4g}" + (f" {unit}" if unit else "")


@loadgen.command()
@click.argument("a")
@click.argument("b")
@click.option("--reports-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True)
def compare(a: str, b: str, reports_dir: Path) -> None:
    """Put runs A and B side by side (run ids, session ids or report.json paths)."""
    from rich.table import Table

    from config.settings import get_settings
    from loadgen.compare import ROWS, delta, load, pair_up
    from loadgen.progress import make_console
    from tars_tasks.db.engine import get_engine

    engine = None
    try:
        engine = get_engine(get_settings().database_url)
        from loadgen.store import ensure_schema

        ensure_schema(engine)
    except Exception:
        engine = None
    runs_a = load(a, engine=engine, reports_dir=reports_dir)
    runs_b = load(b, engine=engine, reports_dir=reports_dir)
    pairs = pair_up(runs_a, runs_b)
    if not pairs:
        raise LoadgenError(f"nothing to compare: {a!r} has {len(runs_a)} run(s), {b!r} has {len(runs_b)}")
    console = make_console()
    for (ida, la, aa), (idb, lb, ab) in pairs:
        t = Table(title=f"{la}  ({ida} → {idb})" if la == lb else f"{la} ({ida}) vs {lb} ({idb})")
        t.add_column("metric")
        t.add_column("A", justify="right")
        t.add_column("B", justify="right")
        t.add_column("Δ", justify="right")
        for name, unit, get in ROWS:
            try:
                va, vb = get(aa), get(ab)
            except (KeyError, TypeError):
                continue
            t.add_row(name, _fmt(va, unit), _fmt(vb, unit), delta(va, vb))
        console.print(t)
