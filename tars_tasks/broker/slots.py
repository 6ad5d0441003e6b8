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

When the budgets' state lives in the broker's Redis too, the same round trip counts the budget
limits set (``HLEN`` of :func:`config.keys.budget_limits_key`): a call whose message was fetched
with no limit set anywhere need not ask the budget scripts, whose answer would be "unlimited"
(:meth:`SlotRead.no_budget_limits`; ``workers.callpath.budget_step``).
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
_budget_limits_key: str | None = None


@dataclass(frozen=True, slots=True)
class SlotRead:
    tier: str
    #: The slot (µs, Redis clock), or None: no slot was recorded for this message (a bundle's:
    #: its first member's).
    slot_us: int | None
    #: Redis' clock when it was read (µs), and ``time.monotonic()`` here just after.
    redis_now_us: int
    monotonic: float
    #: A bundle's slots, one per member in order (µs, Redis clock; 0: that member has none, it
    #: acquires its own); empty for a single message.
    member_slots_us: tuple[int, ...] = ()
    #: How many budget limits were set (tenants' and the fleet's) when it was read; None: not read.
    budget_limits: int | None = None

    def no_budget_limits(self, *, max_age_s: float) -> bool:
        """No budget limit was set anywhere when this was read, at most ``max_age_s`` ago: a budget
        reserve then would have answered "unlimited" and held nothing. A limit set since applies
        from the next fetch on, as it would to a call that had reserved just before it was set."""
        return self.budget_limits == 0 and time.monotonic() - self.monotonic <= max_age_s

    def slot_monotonic(self) -> float | None:
        """The slot as a ``time.monotonic()`` value of this process."""
        if self.slot_us is None:
            return None
        return self._here(self.slot_us)

    def slots_monotonic(self) -> list[float | None]:
        """Every slot recorded (a bundle's members' in order, None for a member without one; a single
        message's one), as ``time.monotonic()`` values of this process; empty if none was recorded."""
        recorded = self.member_slots_us or ((self.slot_us,) if self.slot_us is not None else ())
        return [self._here(us) if us else None for us in recorded]

    def _here(self, us: int) -> float:
        return self.monotonic - (self.redis_now_us - us) / 1_000_000


def enable(*, namespace: str, budget_limits_key: str | None = None) -> None:
    """Read staged messages' slots with their unacked record; ``budget_limits_key``: also count the
    budget limits set (only when the budgets' state is in the broker's Redis)."""
    global _namespace, _budget_limits_key
    _namespace = namespace
    _budget_limits_key = budget_limits_key


def disable() -> None:
    global _namespace, _budget_limits_key
    _namespace = None
    _budget_limits_key = None
    with _lock:
        _answers.clear()


def namespace() -> str | None:
    """The namespace whose slot records the transport reads, or None (disabled)."""
    return _namespace


def budget_limits_key() -> str | None:
    """The budget limits hash the transport counts, or None."""
    return _budget_limits_key


def put(request_id: str, read: SlotRead) -> None:
    with _lock:
        _answers[request_id] = read
        while len(_answers) > MAX_KEPT:
            _answers.popitem(last=False)


def take(request_id: str) -> SlotRead | None:
    with _lock:
        return _answers.pop(request_id, None)


def answer(*, tier: str, slot: bytes | str | None, redis_time: tuple,
           budget_limits: int | None = None) -> SlotRead:
    """A slot record as read (a single message's slot, or a bundle's comma-separated slots)."""
    sec, usec = redis_time
    now_us = int(sec) * 1_000_000 + int(usec)
    if slot is None:
        return SlotRead(tier=tier, slot_us=None, redis_now_us=now_us, monotonic=time.monotonic(),
                        budget_limits=budget_limits)
    text = slot.decode() if isinstance(slot, bytes) else str(slot)
    members = tuple(int(v) for v in text.split(","))
    return SlotRead(tier=tier, slot_us=members[0], redis_now_us=now_us, monotonic=time.monotonic(),
                    member_slots_us=members if len(members) > 1 else (), budget_limits=budget_limits)
