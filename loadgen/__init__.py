"""loadgen: drive the TARS fleet and write a load-test report whose every number is measured.

    tars loadgen run baseline                 # embedded fleet, no services needed
    tars loadgen run degradation --fail-if 'p99>4s,error_rate>5%'
    tars loadgen compare RUN_A RUN_B

Drivers (closed loop, open loop, sweep) issue requests through :class:`tars_tasks.client.TarsClient`;
metrics are computed from the requests' own rows (Postgres or the embedded SQLite) joined with
the generator's timings, and both are stored with the run so any figure can be recomputed.
"""

from __future__ import annotations

from loadgen.scenarios import PRESETS, Scenario, get_scenario

__all__ = ["PRESETS", "Scenario", "get_scenario"]
