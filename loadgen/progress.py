"""Live progress while a run is going (rich): requests sent, done, in flight, failed, rate."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from loadgen.drivers import Progress

#: Width of output that goes to a pipe or file: wide enough that no table splits a figure.
PIPE_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    """A console that never wraps a line in the middle of a figure: text lines are not wrapped
    (``soft_wrap``), and off a terminal tables get :data:`PIPE_WIDTH` columns, not rich's 80."""
    console = Console(soft_wrap=True, stderr=stderr)
    if not console.is_terminal:
        console = Console(soft_wrap=True, stderr=stderr, width=PIPE_WIDTH)
    return console


class LiveProgress:
    """A one-line live display per run, and a result line when it ends."""

    def __init__(self, *, console: Console, live: bool) -> None:
        self.console = console
        self.live_enabled = live
        self._live: Live | None = None
        self._label = ""
        self._bound = ""

    def begin(self, *, label: str, bound: str) -> None:
        self._label, self._bound = label, bound
        if self.live_enabled:
            self._live = Live(Text(f"{label}: starting"), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        else:
            self.console.print(f"[bold]{label}[/bold]: running ({bound})")

    def update(self, p: Progress) -> None:
        if self._live is None:
            return
        r = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        self._live.update(Text.from_markup(
            f"[bold]{self._label}[/bold] [{p.phase}] {p.elapsed_s:5.1f}s ({self._bound}) · sent {p.sent} · "
            f"done {p.done} · in flight {p.in_flight} · failed [red]{p.failed}[/red] · {r:.1f} req/s"))

    def end(self, *, label: str, aggregates: dict[str, Any]) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        a = aggregates
        e = a["latency_ms"]["e2e"]
        c = a.get("ceilings") or {}
        fmt = lambda v: "—" if v is None else f"{v:,.0f} ms"  # noqa: E731
        mark = "[green]✓[/green]" if a["valid"] else "[red]✗[/red]"
        bound = (f" (bound by {c['binding']}: {c['efficiency']:.1%} of {c['binding_per_s']:,.2f} req/s)"
                 if c.get("binding") else "")
        self.console.print(
            f"{mark} {label}: {a['requests']['window']['total']} requests in the {a['population']['name']}, "
            f"{a['throughput']['completions_per_s']:.2f} req/s{bound}, p50 {fmt(e['p50'])}, p99 {fmt(e['p99'])}, "
            f"errors {a['requests']['window']['error_rate']:.2%}"
            + ("" if a["valid"] else " [red]INVALID[/red]: " + "; ".join(a["invalid_reasons"])))
