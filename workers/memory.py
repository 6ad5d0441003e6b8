"""The C allocator's setting a long-running worker needs: a fixed mmap threshold (glibc only).

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own
``mmap``, returned to the system when freed. But when such a block is freed, glibc raises the
threshold to its size (up to 32 MiB, "dynamic mmap threshold"). From then on the large transient
buffers of a worker (a group commit's parameter arrays, a dispatch step's messages, a big
response) come from the main heap, where a block still in use above them keeps their pages
resident: the heap's resident size creeps up for minutes as rarer, larger peaks occur, while the
Python objects alive stay the same (issue 13's soaks, docs/BENCHMARKS.md: tracemalloc flat within
0.7 MiB over four minutes, the ``[heap]`` segment +0.24 and +0.44 MiB from the first to the third
minute, +0.06 and +0.12 with the threshold fixed). Setting the threshold explicitly
(``mallopt(M_MMAP_THRESHOLD, n)``) also turns the dynamic adjustment off: large blocks always go
to ``mmap`` and back. It keeps them out of the heap; it did not lower the whole worker's RSS slope
in those soaks. The rest of the rise was in pymalloc's arenas, and came from cyclic garbage: each
finished task's greenlet waited for a full collection (tars_tasks/broker/gevent_pool.py, and
:func:`freeze_startup_objects` below).
This is what ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment does, applied by the worker
itself so that every way of starting one (``tars fleet worker``, plain ``celery -A tars_tasks
worker``, compose) gets it.

Elsewhere (musl, macOS, a libc without ``mallopt``) :func:`fix_mmap_threshold` does nothing and
says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

#: ``M_MMAP_THRESHOLD`` in glibc's <malloc.h>.
M_MMAP_THRESHOLD = -3
#: glibc's own starting threshold: what it uses until the first large block is freed.
DEFAULT_THRESHOLD_BYTES = 128 * 1024
#: glibc's ceiling for the threshold (``HEAP_MAX_SIZE / 2`` on 64-bit): ``mallopt`` refuses more.
MAX_THRESHOLD_BYTES = 32 * 1024 * 1024


def _mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def fix_mmap_threshold(*, threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Fix this process's mmap threshold at ``threshold_bytes`` (0: leave glibc's dynamic one).

    True when the C library took the setting; False where there is nothing to set.
    """
    if threshold_bytes < 0 or threshold_bytes > MAX_THRESHOLD_BYTES:
        raise ValueError(f"threshold_bytes must be 0 or at most {MAX_THRESHOLD_BYTES:,}, got {threshold_bytes:,}")
    if threshold_bytes == 0:
        return False
    fn = _mallopt()
    if fn is None:
        log.debug("no mallopt in this C library: mmap threshold left as it is")
        return False
    return fn(M_MMAP_THRESHOLD, threshold_bytes) == 1


def freeze_startup_objects() -> int:
    """Move every object alive now (modules, classes, functions, the app's configuration: what a
    started worker keeps for its whole life) out of the cyclic collector's reach; returns how many.

    A started worker holds ~156,000 objects the collector tracks. Its full collections, which a busy
    worker runs every 10-20 s (requests in flight outlive the young generations), walk them all:
    130-140 ms with the hub held at C = 1,000 in issue 13's soak, 82-85 ms with them frozen
    (``gc.freeze``: not walked; what the requests allocate afterwards is collected as before).
    Garbage is collected first, so none is frozen; an object frozen here that later became cyclic
    garbage would stay (start-up objects live as long as the worker).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
