"""A worker fixes glibc's mmap threshold (workers/memory.py): once a large block was freed, the next
large blocks would otherwise come from the heap and keep its pages resident.

The first test shows the mechanism in a real process on this machine's C library, both ways: with
glibc's dynamic threshold, forty 256 KiB buffers allocated after a 4 MiB one was freed land in the
heap (the test would pass on the old worker code only if this did not happen); with the threshold
fixed they are mmapped and the heap stays put. The second starts a real worker each way and reads
what it did from its log.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tars_tasks.client import TarsClient
from tests.helpers import make_settings

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")]

SCRIPT = r"""
import json, sys
from workers.memory import fix_mmap_threshold

def heap_kib():
    rss, inside = 0, False
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and len(f) >= 5 and ":" in f[3]:
            inside = len(f) > 5 and f[5] == "[heap]"
        elif inside and f[0] == "Rss:":
            rss += int(f[1])
    return rss

fixed = fix_mmap_threshold(threshold_bytes=int(sys.argv[1]))
big = bytearray(4 << 20)
big[::4096] = b"x" * len(big[::4096])
del big  # freed: glibc's dynamic threshold rises to 4 MiB unless it was fixed
before = heap_kib()
keep = []
for _ in range(40):
    b = bytearray(256 << 10)
    b[::4096] = b"y" * len(b[::4096])  # touch every page
    keep.append(b)
print(json.dumps({"fixed": fixed, "heap_growth_kib": heap_kib() - before}))
"""


def _heap_growth(threshold_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threshold_bytes)], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def test_after_a_large_block_is_freed_the_next_ones_stay_out_of_the_heap_only_with_the_threshold_fixed():
    dynamic = _heap_growth(0)
    fixed = _heap_growth(128 * 1024)
    assert dynamic["fixed"] is False and fixed["fixed"] is True
    # 40 x 256 KiB = 10,240 KiB touched: in the heap with the dynamic threshold, in their own mmaps if fixed
    assert dynamic["heap_growth_kib"] >= 8 * 1024, dynamic
    assert fixed["heap_growth_kib"] < 1024, fixed


@pytest.mark.parametrize(("setting", "line"), [(None, "mmap threshold fixed at 131,072 bytes"),
                                               ("0", "mmap threshold left to the C library")],
                         ids=["default", "TARS_WORKER_MMAP_THRESHOLD_BYTES=0"])
def test_a_worker_fixes_the_threshold_before_its_first_request_unless_told_not_to(setting, line, fleet_env,
                                                                                  start_worker):
    env = {} if setting is None else {"TARS_WORKER_MMAP_THRESHOLD_BYTES": setting}
    worker = start_worker(tiers=["haiku"], concurrency=5, env=env)
    with TarsClient(settings=make_settings(fleet_env)) as client:
        h = client.submit(role="researcher", prompt="allocator")
        assert client.wait(h.id, timeout=60).status == "succeeded"
    worker.stop(timeout=20)
    log = worker.log_path.read_text()
    assert f"allocator: {line}" in log, log[-2000:]
    assert log.index(f"allocator: {line}") < log.index(" ready."), log[-2000:]
