"""The call path: ordered steps with no-op hooks around the provider call, and the one loop that
runs them (dramatiq's middleware is the model: a step overrides the hooks it needs).

For one request (:class:`~workers.callpath.context.Call`)::

    before_call                      top to bottom; a step may end the call here (call.give_up /
    │                                call.succeed: a cached answer, a refused budget)
    └ for each attempt on the current tier:
        before_attempt               top to bottom (breaker leave, rate-limit slot, estimate, in_flight row)
        before_send                  top to bottom, once every before_attempt ran (a slot gone stale)
        provider.complete            the only thing the loop itself does
        after_attempt                bottom to top, when the provider answered
        after_attempt_failed         bottom to top, when a step or the provider raised a call error
        next_move                    top to bottom, after a failure: the first step with a move
                                     decides (Retry, UseTier, GiveUp); none: the call fails
    after_call                       bottom to top, always (outcome None if the call raised)

A new step (a response cache, a budget check) is a subclass of :class:`CallStep` put in the list
(:meth:`CallPath.add`); the loop below never changes for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from workers.callpath.context import CALL_ERRORS, Attempt, Call, CallOutcome, GiveUp, Move, Retry, UseTier


class CallStep:
    """A step of the call path. Every hook is a no-op; override the ones the step needs.

    Hooks may raise a call error (:data:`~workers.callpath.context.CALL_ERRORS`) from
    ``before_attempt``/``before_send`` to refuse the attempt; the ``after_*`` hooks should not raise.
    """

    def before_call(self, call: Call) -> None:
        """Once, before the first attempt."""

    def before_tier(self, call: Call) -> None:
        """A tier starts (the requested one, or a fallback): ``call.spec`` is its spec."""

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        """Before the attempt, in step order."""

    def before_send(self, call: Call, attempt: Attempt) -> None:
        """Right before the provider call, after every step's ``before_attempt``."""

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        """The provider answered (``attempt.completion``), in reverse step order."""

    def after_attempt_failed(self, call: Call, attempt: Attempt, exc: BaseException) -> None:
        """The attempt ended with ``exc`` (``attempt.sent`` says whether it reached the provider)."""

    def next_move(self, call: Call, attempt: Attempt, exc: BaseException) -> Move | None:
        """After a failed attempt: what to do next, or None for no opinion."""
        return None

    def after_call(self, call: Call, outcome: CallOutcome | None) -> None:
        """Once, at the end, whatever happened (``outcome`` None: the call raised)."""


class CallPath:
    """Ordered steps and the loop that runs them."""

    def __init__(self, steps: Iterable[CallStep]) -> None:
        self._steps: list[CallStep] = list(steps)

    @property
    def steps(self) -> tuple[CallStep, ...]:
        return tuple(self._steps)

    def step(self, kind: type[CallStep]) -> CallStep | None:
        """The first step of type ``kind``, if the path has one."""
        return next((s for s in self._steps if isinstance(s, kind)), None)

    def add(self, step: CallStep, *, before: type[CallStep] | None = None,
            after: type[CallStep] | None = None) -> None:
        """Put ``step`` in the path: last, or just before / after the first step of a type."""
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        anchor = before or after
        if anchor is None:
            self._steps.append(step)
            return
        for i, s in enumerate(self._steps):
            if isinstance(s, anchor):
                self._steps.insert(i if before is not None else i + 1, step)
                return
        raise ValueError(f"the call path has no {anchor.__name__} step")

    # --- the loop ------------------------------------------------------------------------------

    def run(self, call: Call) -> CallOutcome:
        steps = list(self._steps)  # a step added meanwhile joins the next call
        try:
            for s in steps:
                s.before_call(call)
            if call.outcome is None:
                self._start_tier(steps, call, call.requested.tier)
            while call.outcome is None:
                self._attempt(steps, call)
        except BaseException:
            for s in reversed(steps):
                s.after_call(call, None)
            raise
        for s in reversed(steps):
            s.after_call(call, call.outcome)
        return call.outcome

    @staticmethod
    def _start_tier(steps: list[CallStep], call: Call, tier: str, *, restart: bool = False) -> None:
        call.start_tier(tier, restart=restart)
        for s in steps:
            s.before_tier(call)

    def _attempt(self, steps: list[CallStep], call: Call) -> None:
        attempt = call.new_attempt()
        try:
            for s in steps:
                s.before_attempt(call, attempt)
            for s in steps:
                s.before_send(call, attempt)
            attempt.sent = True
            t0 = time.perf_counter()
            try:
                attempt.completion = attempt.provider.complete(spec=attempt.spec, request=call.request,
                                                               request_id=call.request_id, attempt=attempt.number)
            finally:
                attempt.latency_ms = (time.perf_counter() - t0) * 1000
        except CALL_ERRORS as exc:
            attempt.error = exc
            for s in reversed(steps):
                s.after_attempt_failed(call, attempt, exc)
            move = next((m for m in (s.next_move(call, attempt, exc) for s in steps) if m is not None), None)
            if isinstance(move, Retry):
                return
            if isinstance(move, UseTier):
                self._start_tier(steps, call, move.tier, restart=move.restart)
            elif isinstance(move, GiveUp):
                call.give_up(reason=move.reason, error=move.error)
            else:
                call.fail(exc)
            return
        for s in reversed(steps):
            s.after_attempt(call, attempt)
        call.succeed(attempt)
