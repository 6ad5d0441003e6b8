"""The call path of a model call: small steps with no-op hooks around the provider call, composed
in one place (:meth:`workers.caller.ModelCaller.default_steps`), run by one loop
(:class:`workers.callpath.path.CallPath`). See docs/ARCHITECTURE.md, "The call path"."""

from workers.callpath.context import (
    CALL_ERRORS,
    RETRY,
    Attempt,
    Call,
    CallOutcome,
    GiveUp,
    Move,
    Retry,
    UseTier,
)
from workers.callpath.path import CallPath, CallStep

__all__ = ["CALL_ERRORS", "RETRY", "Attempt", "Call", "CallOutcome", "CallPath", "CallStep", "GiveUp", "Move",
           "Retry", "UseTier"]
