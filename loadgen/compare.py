"""``tars loadgen compare A B``: two runs (or sessions) side by side, from the database or report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from loadgen import store
from tars_tasks.errors import LoadgenError

ROWS: list[tuple[str, str, Any]] = [
    ("requests", "n", lambda a: a["requests"]["run"]["total"]),
    ("throughput", "req/s", lambda a: a["throughput"]["completions_per_s"]),
    ("efficiency", "", lambda a: (a.get("ceilings") or {}).get("efficiency")),
    ("avg", "ms", lambda a: a["latency_ms"]["e2e"]["avg"]),
    ("p50", "ms", lambda a: a["latency_ms"]["e2e"]["p50"]),
    ("p95", "ms", lambda a: a["latency_ms"]["e2e"]["p95"]),
    ("p99", "ms", lambda a: a["latency_ms"]["e2e"]["p99"]),
    ("queue wait avg", "ms", lambda a: a["latency_ms"]["queue_wait"]["avg"]),
    ("rate-limit wait avg", "ms", lambda a: a["latency_ms"]["ratelimit_wait"]["avg"]),
    ("service avg", "ms", lambda a: a["latency_ms"]["service"]["avg"]),
    ("error rate", "", lambda a: a["requests"]["window"]["error_rate"]),
    ("cost/request", "usd", lambda a: a["cost"]["per_request_usd"]),
    ("peak RSS", "MiB", lambda a: (a.get("resources") or {}).get("rss_peak_mib")),
]


def load(ref: str, *, engine: Engine | None, reports_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(run id, label, aggregates) for a run id, a session id, or a path to a report.json."""
    path = Path(ref)
    if path.suffix == ".json" and path.exists():
        return _from_json(path)
    if (reports_dir / ref / "report.json").exists():
        return _from_json(reports_dir / ref / "report.json")
    if engine is not None:
        runs = store.find_runs(engine, ref=ref)
        if runs:
            return [(r["id"], r["name"], (r["summary"] or {}).get("aggregates") or {}) for r in runs
                    if r.get("summary")]
    raise LoadgenError(f"no run, session or report {ref!r} (looked in the database and {reports_dir})")


def _from_json(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    doc = json.loads(path.read_text())
    return [(run["run_id"], run["label"], run["aggregates"]) for sc in doc["scenarios"] for run in sc["runs"]]


def pair_up(a: list[tuple[str, str, dict]], b: list[tuple[str, str, dict]]) -> list[tuple[tuple, tuple]]:
    """Match runs by label; if labels differ (two single runs), pair them in order."""
    by_label = {lbl: item for item in b for lbl in [item[1]]}
    pairs = [(x, by_label[x[1]]) for x in a if x[1] in by_label]
    if not pairs:
        pairs = list(zip(a, b, strict=False))
    return pairs


def delta(va: float | None, vb: float | None) -> str:
    if va is None or vb is None:
        return ""
    if va == 0:
        return "" if vb == 0 else "new"
    return f"{(vb - va) / abs(va):+.1%}"
