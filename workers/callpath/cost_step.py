"""Cost accounting: what each attempt is billed, by token class, each at its own price.

Before the call: the whole request's estimated input at the input price — the row written
``in_flight`` carries it, so an attempt whose worker dies mid-call stays on the bill as
"billed, outcome unknown", never $0. After an answer: the usage the provider reported, every
class priced from the catalog. An attempt the provider answered with an error status, or that
was never sent, is billed nothing.
"""

from __future__ import annotations

from decimal import Decimal

from tars_tasks.errors import ProviderError
from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep


class CostStep(CallStep):
    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        est = call.estimated_input_tokens
        attempt.tokens = {"input_tokens": est}
        attempt.cost_usd = attempt.spec.cost_usd(input_tokens=est)

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        c = attempt.completion
        assert c is not None
        attempt.tokens = c.usage.columns()
        attempt.cost_usd = attempt.spec.usage_cost_usd(c.usage)

    def after_attempt_failed(self, call: Call, attempt: Attempt, exc: BaseException) -> None:
        if not attempt.sent or (isinstance(exc, ProviderError) and exc.status_code is not None):
            attempt.tokens = {}
            attempt.cost_usd = Decimal(0)
