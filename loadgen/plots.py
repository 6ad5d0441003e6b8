"""PNG plots (matplotlib, Agg backend): throughput and p50/p95/p99 against concurrency, memory over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadgen.runner import StepResult

THROUGHPUT_PNG = "throughput_vs_concurrency.png"
LATENCY_PNG = "latency_vs_concurrency.png"
MEMORY_PNG = "memory_over_time.png"


def closed_loop_points(steps: Sequence[StepResult]) -> list[tuple[int, StepResult]]:
    """Closed-loop steps by concurrency (the latest step wins where two share a level)."""
    by_c: dict[int, StepResult] = {}
    for s in steps:
        c = s.drive.get("concurrency")
        if s.drive["kind"] == "closed" and c:
            by_c[int(c)] = s
    return sorted(by_c.items())


def plot_throughput(steps: Sequence[StepResult], path: Path) -> Path | None:
    pts = closed_loop_points(steps)
    if not pts:
        return None
    xs = [c for c, _ in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(xs, [s.aggregates["throughput"]["completions_per_s"] for _, s in pts], "o-", label="achieved")
    bounds = [(c, s.aggregates["little"]["bound_per_s"]) for c, s in pts if s.aggregates.get("little")]
    if bounds:
        ax.plot([c for c, _ in bounds], [b for _, b in bounds], "s--", alpha=0.7,
                label="Little's bound C / mean service")
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("throughput (completions/s, steady window)")
    ax.set_title("Throughput vs concurrency")
    return _save(fig, ax, path)


def plot_latency(steps: Sequence[StepResult], path: Path) -> Path | None:
    pts = closed_loop_points(steps)
    if not pts:
        return None
    xs = [c for c, _ in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for key in ("p50", "p95", "p99"):
        ax.plot(xs, [s.aggregates["latency_ms"]["e2e"][key] or 0 for _, s in pts], "o-", label=key)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency percentiles vs concurrency (HdrHistogram)")
    return _save(fig, ax, path)


def plot_memory(steps: Sequence[StepResult], path: Path) -> Path | None:
    series = [(s.label, s.aggregates["resources"]["series"]) for s in steps
              if s.aggregates.get("resources", {}).get("sampled") and s.aggregates["resources"]["series"]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, pts in series:
        t0 = pts[0][0]
        ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], label=label, linewidth=1)
    ax.set_xlabel("seconds since the run's start")
    ax.set_ylabel("RSS of the worker processes (MB)")
    ax.set_title("Memory over time")
    ax.grid(True, alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_plots(steps: Sequence[StepResult], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, fn in ((THROUGHPUT_PNG, plot_throughput), (LATENCY_PNG, plot_latency), (MEMORY_PNG, plot_memory)):
        if fn(steps, out_dir / name) is not None:
            made[name] = str(out_dir / name)
    return made


def _save(fig, ax, path: Path) -> Path:
    """Grid, legend, layout; write the PNG and free the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
