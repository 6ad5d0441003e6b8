"""Issue #14 audit: places of a report that still contradicted another part of it, or showed a
withheld percentile as a bare "—" (the rule: "—" with the reason), found by reading generated
reports. Each test failed on the code before its fix."""

from __future__ import annotations

from pathlib import Path

from loadgen.report import render_markdown
from loadgen.runner import ScenarioResult, Session
from loadgen.scenarios import Scenario
from tests.loadgen.simulate import ENVIRONMENT, Call, Sim


def _healthy_sweep() -> Session:
    steps = [Sim(concurrency=c, duration_s=6, warmup_s=1, calls=lambda i: [Call(model_s=0.5)]).run()
             .step(label=f"sweep @ concurrency={c}", level=c) for c in (1, 2, 3)]
    sweep = {"axis": "concurrency", "levels": [1, 2, 3], "knee": 3, "broke_at": None, "why": [], "stopped": None,
             "policy": {}}
    result = ScenarioResult(scenario=Scenario(name="sweep", title="Sweep", kind="sweep", levels=(1, 2, 3)),
                            steps=steps, sweep=sweep)
    return Session(id="sim", started_at="t0", finished_at="t1", environment=dict(ENVIRONMENT), scenarios=[result],
                   out_dir=Path("/nonexistent"))


def test_a_sweep_in_which_no_level_broke_names_no_knee_in_the_summary_either():
    md = render_markdown(_healthy_sweep())
    assert "No knee within the levels run" in md  # the sweep's own analysis
    summary = md.split("## Executive Summary", 1)[1].split("---", 1)[0]
    assert "**Knee (sweep):** concurrency = 3" not in summary, summary  # a knee is where the next level broke
    assert "none within the levels run" in summary, summary
