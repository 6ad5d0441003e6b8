"""The pre-reserved slot step: a staged request's first attempt uses the rate-limit slot its
dispatcher reserved (``docs/DISPATCH.md``) instead of acquiring one.

A dispatcher moves a staged message into its Celery queue only after reserving, in the same
script, the model's fleet-wide RPM + TPM slot (and the tenant's) for its first call. The task
passes that on as hints (``{"slot_reserved": True, "reserved_tokens": N}``); this step, placed
just before the limiter step, marks the first attempt on the requested tier as holding its slot
(``attempt.slot_held``, ``attempt.reserved_tokens``), so the limiter does not acquire a second
one; it still corrects the reservation from ``N`` to the real usage after the answer. With
the slot's time (hint ``slot_at``, read by the task from the dispatcher's record) the send waits
for a slot still ahead (the message was moved up to the dispatch horizon early, so its row is
committed meanwhile) and the limiter step gives up a slot missed by more than its tolerance plus
``slot_grace_s`` (then acquires a fresh one).
Everything else acquires as before: retries, a fallback tier, a redelivered message (its
reservation was spent by the delivery that died; the task does not pass the hint then).
"""

from __future__ import annotations

import time

from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep

#: The hints this step reads (set by ``tars_tasks.tasks.run_request`` for a staged message).
HINT_SLOT_RESERVED = "slot_reserved"
HINT_RESERVED_TOKENS = "reserved_tokens"
#: ``time.monotonic()`` of the reserved slot, if the task could read it: the limiter step then
#: gives a slot the send would miss by more than its tolerance up and acquires a fresh one.
HINT_SLOT_AT = "slot_at"
#: How much later than the limiter's own tolerance the reserved slot may still be used.
HINT_SLOT_GRACE_S = "slot_grace_s"


class ReservedSlotStep(CallStep):
    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        if not call.hints.get(HINT_SLOT_RESERVED) or attempt.try_number != 1:
            return
        if attempt.spec.tier != call.requested.tier:  # a fallback before the first try: another model's limit
            return
        attempt.slot_held = True
        slot_at = call.hints.get(HINT_SLOT_AT)
        if slot_at is not None:
            call.state_of(self)["slot_at"] = slot_at
            # what the limiter step judges staleness by: the slot, plus the grace a dispatched slot has
            attempt.slot_at = slot_at + float(call.hints.get(HINT_SLOT_GRACE_S) or 0.0)
        tokens = call.hints.get(HINT_RESERVED_TOKENS)
        attempt.reserved_tokens = int(tokens) if tokens is not None else None

    def before_send(self, call: Call, attempt: Attempt) -> None:
        """A message dispatched ahead of its slot (the horizon) waits for the slot here, after its
        row was committed, as the limiter's own reservations do: sent early, it would crowd a window."""
        slot_at = call.state_of(self).pop("slot_at", None)
        if slot_at is None or not attempt.slot_held or attempt.ticket is not None:
            return
        left = slot_at - time.monotonic()
        if left > 0:
            call.sleep(left)
