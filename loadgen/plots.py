"""PNG plots (matplotlib, Agg backend): throughput and p50/p95/p99 against concurrency, memory over time.

Plots a person reads correctly: every y axis starts at zero, concurrency ticks are whole
numbers, each series has its own marker and line style (p95 is not hidden under p99), the
warm-up is shaded, memory is in MiB, and the memory plot says whose memory it shows.
The throughput plot shows each level's binding ceiling (the others are in the report's
tables; drawn together they would squash the achieved curve). The ``*_figure`` functions
return the figure (tests inspect it); :func:`write_plots` saves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loadgen.runner import StepResult

THROUGHPUT_PNG = "throughput_vs_concurrency.png"
LATENCY_PNG = "latency_vs_concurrency.png"
MEMORY_PNG = "memory_over_time.png"
#: (marker, line style) per series, so overlapping lines stay distinguishable.
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-.")]


def closed_loop_points(steps: Sequence[StepResult]) -> list[tuple[int, StepResult]]:
    """Closed-loop steps by concurrency (the latest step wins where two share a level)."""
    by_c: dict[int, StepResult] = {}
    for s in steps:
        c = s.drive.get("concurrency")
        if s.drive["kind"] == "closed" and c:
            by_c[int(c)] = s
    return sorted(by_c.items())


def _concurrency_axes(ax, xs: list[int]) -> None:
    ax.set_xlabel("concurrency (requests in flight)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(xs) <= 8:
        ax.set_xticks(xs)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def throughput_figure(steps: Sequence[StepResult]) -> Figure | None:
    pts = closed_loop_points(steps)
    if len(pts) < 2:  # one level is a number in the table, not a curve
        return None
    xs = [c for c, _ in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(xs, [s.aggregates["throughput"]["completions_per_s"] for _, s in pts], marker="o", linestyle="-",
            label="achieved (steady-window population)")
    bind = [(c, s.aggregates["ceilings"]["binding_per_s"], s.aggregates["ceilings"]["binding"]) for c, s in pts
            if (s.aggregates.get("ceilings") or {}).get("binding_per_s")]
    if bind:
        names = ", ".join(dict.fromkeys(b for _, _, b in bind))
        ax.plot([c for c, _, _ in bind], [v for _, v, _ in bind], marker="s", linestyle="--", alpha=0.8,
                label=f"binding ceiling ({names})")
    ax.set_ylabel("throughput (completions/s)")
    ax.set_title("Throughput vs concurrency, and the ceiling that bound each level", fontsize=10)
    _concurrency_axes(ax, xs)
    fig.tight_layout()
    return fig


def latency_figure(steps: Sequence[StepResult]) -> Figure | None:
    pts = closed_loop_points(steps)
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for (marker, style), key in zip(STYLES, ("p50", "p95", "p99", "max"), strict=False):
        xy = [(c, s.aggregates["latency_ms"]["e2e"][key]) for c, s in pts
              if s.aggregates["latency_ms"]["e2e"][key] is not None]
        if xy:
            ax.plot([c for c, _ in xy], [v for _, v in xy], marker=marker, linestyle=style, label=key)
    ax.set_ylabel("response time (ms)")
    ax.set_title("Response-time percentiles vs concurrency\n(a percentile is left out at levels with too few "
                 "samples for it)", fontsize=10)
    _concurrency_axes(ax, [c for c, _ in pts])
    fig.tight_layout()
    return fig


def _whose_memory(steps: Sequence[StepResult]) -> str:
    kinds = {s.config.get("fleet_kind") for s in steps}
    if kinds == {"embedded"}:
        return "this process (embedded fleet: workers and generator)"
    if kinds <= {"local", "external"}:
        return "the fleet's worker processes (not the generator)"
    return "sampled processes (see each run's Resources)"


def memory_figure(steps: Sequence[StepResult]) -> Figure | None:
    """RSS over the session's timeline (runs one after another), each run's warm-up shaded."""
    series = [s for s in steps if (s.aggregates.get("resources") or {}).get("sampled")
              and s.aggregates["resources"]["series"]]
    if not series:
        return None
    t0 = min(s.drive["started_at"] for s in series)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for i, s in enumerate(series):
        pts = s.aggregates["resources"]["series"]
        marker, style = STYLES[i % len(STYLES)]
        ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], label=s.label, linewidth=1, linestyle=style,
                marker=marker, markevery=max(1, len(pts) // 12), markersize=4)
        start, warm = s.drive["started_at"] - t0, s.drive["window"][0] - t0
        if warm > start:
            ax.axvspan(start, warm, color="0.5", alpha=0.15, label="warm-up" if i == 0 else None)
    ax.set_xlabel("seconds since the first run's start")
    ax.set_ylabel("RSS (MiB)")
    top = max(p[1] for s in series for p in s.aggregates["resources"]["series"])
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_title(f"Memory over time — {_whose_memory(series)}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write_plots(steps: Sequence[StepResult], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, build in ((THROUGHPUT_PNG, throughput_figure), (LATENCY_PNG, latency_figure),
                        (MEMORY_PNG, memory_figure)):
        fig = build(steps)
        if fig is not None:
            fig.savefig(out_dir / name, format="png")
            plt.close(fig)
            made[name] = str(out_dir / name)
    return made
