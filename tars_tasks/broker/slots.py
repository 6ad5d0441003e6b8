"""A staged message's reserved slot, read in the round trip that records it as unacked.

A message the dispatcher moved out of staging has its rate-limit slot recorded in Redis
(:func:`config.keys.stage_slots_key`); the worker that runs it reads and deletes that record and
compares it with Redis' clock, to give up a slot it would miss (``workers.agent``). That was a
round trip of its own per message. When :func:`enable` was called (a worker whose tasks run in
the process that fetches the messages — gevent, threads, solo — and whose limiter state lives in
the broker's Redis), the transport adds the read, the delete and ``TIME`` to the pipeline that
records the message as unacked (:mod:`tars_tasks.broker.transport`) and leaves the answer here
for the task to :func:`take`. A message whose answer is not here (fetched before :func:`enable`,
another pool) is read as before.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

#: Answers kept at most (a message fetched and never run — given back on a broken connection —
#: leaves its answer here; the oldest go first).
MAX_KEPT = 10_000

_lock = threading.Lock()
_answers: OrderedDict[str, SlotRead] = OrderedDict()
_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class SlotRead:
    tier: str
    #: The slot (µs, Redis clock), or None: no slot was recorded for this message.
    slot_us: int | None
    #: Redis' clock when it was read (µs), and ``time.monotonic()`` here just after.
    redis_now_us: int
    monotonic: float

    def slot_monotonic(self) -> float | None:
        """The slot as a ``time.monotonic()`` value of this process."""
        if self.slot_us is None:
            return None
        return self.monotonic - (self.redis_now_us - self.slot_us) / 1_000_000


def enable(*, namespace: str) -> None:
    global _namespace
    _namespace = namespace


def disable() -> None:
    global _namespace
    _namespace = None
    with _lock:
        _answers.clear()


def namespace() -> str | None:
    """The namespace whose slot records the transport reads, or None (disabled)."""
    return _namespace


def put(request_id: str, read: SlotRead) -> None:
    with _lock:
        _answers[request_id] = read
        while len(_answers) > MAX_KEPT:
            _answers.popitem(last=False)


def take(request_id: str) -> SlotRead | None:
    with _lock:
        return _answers.pop(request_id, None)


def answer(*, tier: str, slot: bytes | str | None, redis_time: tuple) -> SlotRead:
    sec, usec = redis_time
    return SlotRead(tier=tier, slot_us=None if slot is None else int(slot),
                    redis_now_us=int(sec) * 1_000_000 + int(usec), monotonic=time.monotonic())
