"""Live progress while a run is going (rich): requests sent, done, in flight, failed, rate."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from loadgen.drivers import Progress


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
        li = a.get("little")
        fmt = lambda v: "—" if v is None else f"{v:,.0f} ms"  # noqa: E731
        self.console.print(
            f"[green]✓[/green] {label}: {a['requests']['run']['total']} requests, "
            f"{a['throughput']['completions_per_s']:.2f} req/s"
            + (f" ({li['ratio']:.1%} of Little's bound)" if li else "")
            + f", p50 {fmt(e['p50'])}, p99 {fmt(e['p99'])}, errors {a['requests']['window']['error_rate']:.2%}"
            + ("" if a["valid"] else " [red]INVALID[/red]"))
