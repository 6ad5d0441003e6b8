"""Reserve a call's worst-case cost against its tenant's budget before it is made, settle after
(tars_tasks/budgets.py). First in the path (``next_move`` is asked before the fallback's and the
retry policy's), per docs/ARCHITECTURE.md, "A budget reserve/settle step":

* ``before_call``: reserve the first attempt's worst case — the whole input's estimate plus the
  output limit, at the tier's catalog prices; no room: the call gives up with reason ``budget``
  and no attempt is made (queued work that meets a spent budget fails, with nothing billed); not
  asked when the message was fetched, moments ago, with no limit set anywhere
  (:data:`HINT_NO_BUDGET_LIMITS`);
* ``next_move``: before another attempt (a transient error or an open breaker), reserve its worst
  case too (on the tier and its fallback, whichever costs more); no room: ``GiveUp(budget)``;
* ``after_call``: settle to the real cost of every attempt recorded (``api_calls``), releasing the
  rest; a call that raised settles to the estimates its rows carry.

A worker killed in between never settles: the reservation's lease expires and the next script for
the tenant charges it at its worst case (see :mod:`tars_tasks.budgets`). The fleet-state Redis
unreachable at reserve time is retried with backoff within the call's retry budget, then the call
fails ``fleet_state_unavailable`` (no call is made outside the budget).
"""

from __future__ import annotations

import logging
import time
import uuid
from decimal import Decimal

import redis

from config.catalog import ModelSpec
from tars_tasks.budgets import Budgets
from tars_tasks.codes import FailureReason
from tars_tasks.errors import CircuitOpen, TransientProviderError
from workers.callpath.context import Attempt, Call, CallOutcome, GiveUp, Move
from workers.callpath.path import CallStep

log = logging.getLogger(__name__)

#: The hint the sub-agent sets from ``requests.tenant``.
HINT_TENANT = "tenant"
#: The hint the sub-agent sets when the message was fetched with no budget limit set anywhere
#: (``tars_tasks.broker.slots``): the first attempt's reserve would answer "unlimited" and hold
#: nothing, so it is not asked (one round trip and two scripts less per call). Retries reserve.
HINT_NO_BUDGET_LIMITS = "no_budget_limits"
#: Backoff while the budget's Redis cannot be reached (bounded by the call's retry budget).
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0


class BudgetStep(CallStep):
    def __init__(self, *, budgets: Budgets) -> None:
        self.budgets = budgets

    @staticmethod
    def worst_case(call: Call, spec: ModelSpec) -> Decimal:
        """One attempt's most: the whole input (estimated) and the full output limit, at list prices."""
        return spec.cost_usd(input_tokens=call.estimated_input_tokens, output_tokens=call.request.output_limit(spec))

    def _reserve(self, call: Call, usd: Decimal) -> str | None:
        """None if reserved; else the refusal's text."""
        st = call.state_of(self)
        refusal, held = self.budgets.reserve_held(tenant=st["tenant"], reservation_id=st["id"], usd=usd)
        if refusal is None:
            # a tenant without a limit holds nothing: no settle (one round trip less per call);
            # a retry that finds a limit set meanwhile holds its reservation and settles
            st["reserved"] = bool(st.get("reserved")) or held
            st["granted"] = True
            return None
        return (f"{FailureReason.BUDGET}: {refusal.owner} has {refusal.used_usd:.6f} of its "
                f"{refusal.limit_usd:.6f} USD {refusal.period} budget spent or reserved; this attempt may cost "
                f"{usd:.6f}")

    def before_call(self, call: Call) -> None:
        tenant = call.hints.get(HINT_TENANT)
        if tenant is None:
            return
        st = call.state_of(self)
        st.update(tenant=tenant, id=f"{call.request_id}:{uuid.uuid4().hex[:12]}", reserved=False, granted=False)
        if call.hints.get(HINT_NO_BUDGET_LIMITS):
            st["granted"] = True
            return
        delay = RETRY_INITIAL_S
        while True:  # an unreachable Redis is retried with backoff inside the call's budget, as the limiter does
            try:
                error = self._reserve(call, self.worst_case(call, call.requested))
                break
            except redis.RedisError as exc:
                if time.monotonic() + delay > call.deadline:
                    call.give_up(reason=FailureReason.FLEET_STATE_UNAVAILABLE,
                                 error=f"{FailureReason.FLEET_STATE_UNAVAILABLE}: budget state unreachable: {exc}")
                    return
                log.warning("request %s: budget state unreachable (%s); retrying in %.2fs", call.request_id, exc,
                            delay)
                call.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        if error is not None:
            call.give_up(reason=FailureReason.BUDGET, error=error)

    def next_move(self, call: Call, attempt: Attempt, exc: BaseException) -> Move | None:
        st = call.state_of(self)
        if not st.get("granted") or not isinstance(exc, TransientProviderError | CircuitOpen):
            return None  # a permanent error ends the call anyway: nothing more to reserve
        spec = call.spec or call.requested
        worst = self.worst_case(call, spec)
        if spec.fallback:
            worst = max(worst, self.worst_case(call, call.spec_for(spec.fallback)))
        try:
            error = self._reserve(call, worst)
        except redis.RedisError as exc2:
            return GiveUp(reason=FailureReason.FLEET_STATE_UNAVAILABLE,
                          error=f"{FailureReason.FLEET_STATE_UNAVAILABLE}: budget state unreachable: {exc2}")
        return None if error is None else GiveUp(reason=FailureReason.BUDGET, error=error)

    def after_call(self, call: Call, outcome: CallOutcome | None) -> None:
        st = call.state_of(self)
        if not st.get("reserved"):
            return
        if outcome is not None:
            actual = sum((r.cost_usd for r in outcome.api_rows), Decimal(0))
        else:
            actual = sum((a.cost_usd for a in call.recorded), Decimal(0))
        try:
            self.budgets.settle(tenant=st["tenant"], reservation_id=st["id"], usd=actual)
        except redis.RedisError as exc:  # its lease expires and it is charged at its worst case
            log.warning("request %s: budget reservation not settled (%s); charged at its worst case when its "
                        "lease expires", call.request_id, exc)
