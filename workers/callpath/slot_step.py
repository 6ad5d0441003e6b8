"""The pre-reserved slot step: a staged request's first attempt uses the rate-limit slot its
dispatcher reserved (``docs/DISPATCH.md``) instead of acquiring one.

A dispatcher moves a staged message into its Celery queue only after reserving, in the same
script, the model's fleet-wide RPM + TPM slot (and the tenant's) for its first call. The task
passes that on as hints (``{"slot_reserved": True, "reserved_tokens": N}``); this step, placed
just before the limiter step, marks the first attempt on the requested tier as holding its slot
(``attempt.slot_held``, ``attempt.reserved_tokens``), so the limiter does not acquire a second
one; it still corrects the reservation from ``N`` to the real usage after the answer.
Everything else acquires as before: retries, a fallback tier, a redelivered message (its
reservation was spent by the delivery that died; the task does not pass the hint then).
"""

from __future__ import annotations

from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep

#: The hints this step reads (set by ``tars_tasks.tasks.run_request`` for a staged message).
HINT_SLOT_RESERVED = "slot_reserved"
HINT_RESERVED_TOKENS = "reserved_tokens"


class ReservedSlotStep(CallStep):
    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        if not call.hints.get(HINT_SLOT_RESERVED) or attempt.try_number != 1:
            return
        if attempt.spec.tier != call.requested.tier:  # a fallback before the first try: another model's limit
            return
        attempt.slot_held = True
        tokens = call.hints.get(HINT_RESERVED_TOKENS)
        attempt.reserved_tokens = int(tokens) if tokens is not None else None
