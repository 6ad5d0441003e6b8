"""One clock for a run: monotonic for intervals, mapped to epoch seconds for storage.

The request rows carry wall-clock timestamps (written by the coordinator and the workers);
the generator measures with ``time.monotonic``. Mapping every monotonic reading through one
(wall, mono) pair taken at the start keeps the generator's timings immune to wall-clock steps
while still comparable with the rows (same host, or hosts kept in sync by NTP).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RunClock:
    wall0: float = field(default_factory=time.time)
    mono0: float = field(default_factory=time.monotonic)

    def epoch(self, mono: float) -> float:
        return self.wall0 + (mono - self.mono0)

    def now(self) -> float:
        return self.epoch(time.monotonic())
