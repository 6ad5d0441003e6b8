"""Share of a py-spy speedscope profile's samples whose stack holds a frame (inclusive).

    python bench/profile_share.py PROFILE.speedscope.json workers/writer.py:_run workers/loader.py:_run

A frame is ``FILE_SUFFIX:FUNCTION`` (py-spy names frames by function; the file tells which ``_run``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def shares(path: Path, frames: list[str]) -> tuple[float, dict[str, float]]:
    doc = json.loads(path.read_text())
    table = doc["shared"]["frames"]
    wanted: dict[str, set[int]] = {}
    for spec in frames:
        file, _, func = spec.rpartition(":")
        wanted[spec] = {i for i, f in enumerate(table)
                        if f["name"].split(" ")[0].rsplit(".", 1)[-1] == func and f.get("file", "").endswith(file)}
    total = 0.0
    hit = dict.fromkeys(frames, 0.0)
    for prof in doc["profiles"]:
        for stack, w in zip(prof["samples"], prof["weights"], strict=True):
            total += w
            s = set(stack)
            for spec, ids in wanted.items():
                if s & ids:
                    hit[spec] += w
    return total, {k: (100.0 * v / total if total else 0.0) for k, v in hit.items()}


if __name__ == "__main__":
    total, out = shares(Path(sys.argv[1]), sys.argv[2:])
    print(f"samples {total:.0f}")
    for k, v in out.items():
        print(f"{k:40s} {v:5.1f}%")
