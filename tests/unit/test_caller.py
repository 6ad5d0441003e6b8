"""The call path (breaker → limiter → provider inside the retry loop) with a scripted provider,
real Redis, and a list standing in for the group-commit writer."""

from __future__ import annotations

from collections import deque

import pytest

from config.catalog import load_catalog
from tars_tasks.errors import (
    AuthenticationFailed,
    ContextTooLong,
    PermanentProviderError,
    RateLimited,
    TransientProviderError,
)
from tests.helpers import make_settings
from workers.caller import ModelCaller
from workers.providers import Completion
from workers.providers.request import ModelRequest


class ScriptedProvider:
    """Answers per tier from a queue of results (an exception is raised, a Completion returned)."""

    name = "scripted"

    def __init__(self, script: dict[str, list]) -> None:
        self.script = {t: deque(v) for t, v in script.items()}
        self.calls: list[str] = []

    def complete(self, *, spec, request, request_id, attempt):
        self.calls.append(spec.tier)
        queue = self.script.get(spec.tier)
        item = queue.popleft() if queue else Completion(text="ok", input_tokens=10, output_tokens=20)
        if isinstance(item, BaseException):
            raise item
        return item


class ListWriter:
    def __init__(self) -> None:
        self.recorded: list = []

    def record(self, api_rows):
        self.recorded.extend(api_rows)


@pytest.fixture
def make_caller(redis_url, redis):
    def _make(script: dict[str, list], **settings):
        fields = {"namespace": "unitcaller", "breaker_failure_threshold": 2, "breaker_cooldown_s": 60,
                  "retry_backoff_initial_s": 0.001, "retry_backoff_max_s": 0.01, **settings}
        s = make_settings({"TARS_BROKER_URL": redis_url}, **fields)
        sleeps: list[float] = []
        caller = ModelCaller(settings=s, catalog=load_catalog(), writer=ListWriter(), redis_client=redis,
                             sleep=sleeps.append)
        provider = ScriptedProvider(script)
        caller._providers = {t: provider for t in ("haiku", "sonnet", "opus")}
        return caller, provider, sleeps
    return _make


def _call(caller, tier="sonnet"):
    return caller.call(request_id="00000000-0000-0000-0000-000000000001", tier=tier,
                       request=ModelRequest.from_prompt("p" * 40), worker="w")


def test_a_success_is_one_completed_row_written_in_flight_first(make_caller):
    caller, _provider, _ = make_caller({})
    out = _call(caller)
    assert out.status == "succeeded" and out.tier_used == "sonnet"
    assert [r.outcome for r in caller.writer.recorded] == ["in_flight"]
    assert [r.outcome for r in out.api_rows] == ["ok"] and out.api_rows[0].cost_usd > 0


def test_transient_errors_are_retried_each_attempt_its_own_row(make_caller):
    caller, provider, _ = make_caller({"sonnet": [TransientProviderError("500", status_code=500), None]})
    provider.script["sonnet"] = deque([TransientProviderError("500", status_code=500)])
    out = _call(caller)
    assert out.status == "succeeded"
    assert [r.attempt for r in out.api_rows] == [1, 2]
    assert [r.outcome for r in out.api_rows] == ["transient_error", "ok"]


@pytest.mark.parametrize("exc", [PermanentProviderError("400", status_code=400), ContextTooLong("too long")])
def test_permanent_errors_fail_at_once_with_the_reason(make_caller, exc):
    caller, provider, _ = make_caller({"sonnet": [exc]})
    out = _call(caller)
    assert out.status == "failed" and len(out.api_rows) == 1 and provider.calls == ["sonnet"]
    assert exc.outcome in out.error


def test_a_401_fails_at_once_and_opens_the_breaker_for_every_later_call(make_caller):
    caller, provider, _ = make_caller({"sonnet": [AuthenticationFailed("401", status_code=401)]})
    out = _call(caller)
    assert out.status == "failed" and "auth_error" in out.error and provider.calls == ["sonnet"]
    later = _call(caller)  # breaker open -> the tier's fallback (haiku) answers
    assert later.status == "succeeded" and later.tier_used == "haiku" and provider.calls == ["sonnet", "haiku"]


def test_an_open_breaker_falls_back_to_the_fallback_tier_and_records_it(make_caller):
    fail = [TransientProviderError("503", status_code=503) for _ in range(2)]
    caller, provider, _ = make_caller({"sonnet": fail})
    out = _call(caller)  # two failures trip the breaker (threshold 2); attempt 3 is refused
    assert out.status == "succeeded" and out.tier_used == "haiku"
    assert [r.tier for r in out.api_rows] == ["sonnet", "sonnet", "haiku"]
    assert provider.calls == ["sonnet", "sonnet", "haiku"]


def test_with_the_wait_policy_an_open_breaker_is_waited_out_not_fallen_back_from(make_caller, redis):
    fail = [TransientProviderError("503", status_code=503) for _ in range(2)]
    caller, provider, sleeps = make_caller({"sonnet": fail}, breaker_open_policy="wait", breaker_cooldown_s=0.2)

    def real_sleep(s):
        import time
        sleeps.append(s)
        time.sleep(s)

    caller._sleep = real_sleep
    out = _call(caller)
    assert out.status == "succeeded" and out.tier_used == "sonnet"
    assert "haiku" not in provider.calls and any(s > 0.05 for s in sleeps)


def test_a_429_does_not_count_against_the_breaker(make_caller):
    storm = [RateLimited("429", status_code=429, retry_after_s=0.01) for _ in range(4)]
    caller, _provider, _ = make_caller({"sonnet": storm})
    out = _call(caller)
    assert out.status == "failed" and out.tier_used == "sonnet" and "rate_limited after 4 attempt(s)" in out.error
    view = caller.breaker.view(provider="scripted", model=caller.spec("sonnet").model)
    assert view.state == "closed"


def test_retry_after_is_honoured_between_attempts(make_caller):
    caller, _provider, sleeps = make_caller({"sonnet": [RateLimited("429", status_code=429, retry_after_s=3.0)]})
    assert _call(caller).status == "succeeded"
    assert max(sleeps) >= 3.0


def test_exhausted_retries_end_failed_with_the_last_reason(make_caller):
    caller, _, _ = make_caller({"haiku": [TransientProviderError("boom", status_code=502) for _ in range(9)]},
                               breaker_failure_threshold=100)
    out = _call(caller, tier="haiku")
    assert out.status == "failed" and out.error.startswith("transient_error after 4 attempt(s) on tier haiku")


def test_rate_limiter_waits_are_recorded_on_the_rows(make_caller):
    caller, _, _ = make_caller({})
    limiter = caller.limiter
    holds = iter([0.0, 0.05, 0.1])
    real = limiter.reserve

    def reserve_with_a_wait(**kw):
        import dataclasses

        ticket = real(**kw)
        return dataclasses.replace(ticket, due=ticket.due + next(holds))  # the limit made the call wait

    limiter.reserve = reserve_with_a_wait
    outs = [_call(caller, tier="opus") for _ in range(3)]
    waits = [o.api_rows[0].ratelimit_wait_ms for o in outs]
    # lower bounds only: the machine is shared, an upper bound would be a wall-clock assert
    assert waits[0] >= 0 and waits[1] >= 50 and waits[2] >= 100, waits


def test_the_round_trip_to_the_limiter_is_no_rate_limit_wait(make_caller):
    """A limiter with capacity to spare that takes 50 ms to answer (a loaded Redis) made no attempt
    wait for capacity: the recorded wait is 0, not the round trip (which is the worker's own work)."""
    import time

    caller, _, _ = make_caller({})
    limiter = caller.limiter
    real = limiter.reserve

    def slow_round_trip(**kw):
        time.sleep(0.05)
        return real(**kw)  # booked at once: the slot is due when the answer arrives

    limiter.reserve = slow_round_trip
    outs = [_call(caller, tier="opus") for _ in range(2)]
    assert [o.api_rows[0].ratelimit_wait_ms for o in outs] == [0.0, 0.0]


class SlowWriter(ListWriter):
    """A group commit that takes longer than a rate-limit slot stays fresh."""

    def record(self, api_rows):
        import time

        time.sleep(0.12)
        super().record(api_rows)


def _count_limiter_asks(limiter, *, fail_at: int | None = None) -> list[str]:
    """Count the limiter's reservations and acquires, in order; the ``fail_at``-th finds no capacity."""
    asked: list[str] = []
    inside = [0]  # acquire reserves too: count only the caller's own asks
    for name in ("reserve", "acquire"):
        real = getattr(limiter, name)

        def ask(_real=real, _name=name, **kw):
            if inside[0]:
                return _real(**kw)
            asked.append(_name)
            if len(asked) == fail_at:
                raise TimeoutError("no capacity within the deadline")
            inside[0] += 1
            try:
                return _real(**kw)
            finally:
                inside[0] -= 1

        setattr(limiter, name, ask)
    return asked


def test_a_slot_that_went_stale_while_the_attempt_row_was_committed_is_taken_again(make_caller):
    caller, provider, _ = make_caller({})
    caller.writer = SlowWriter()
    asked = _count_limiter_asks(caller.limiter)
    outcome = caller.call(request_id="r-slow", tier="haiku",
                          request=ModelRequest.from_prompt("hello"), worker="w")
    assert outcome.status == "succeeded" and provider.calls == ["haiku"]
    # the first slot (due at once) passed during the 120 ms commit (tolerance 50 ms): a fresh one taken
    assert asked == ["reserve", "acquire"]
    assert [r.outcome for r in outcome.api_rows] == ["ok"]


def test_the_attempt_row_is_committed_while_the_slot_comes_due(make_caller):
    caller, provider, _ = make_caller({})
    caller.writer = SlowWriter()  # a 120 ms commit
    limiter = caller.limiter
    asked = _count_limiter_asks(limiter)
    counted_reserve = limiter.reserve

    def reserve_a_second_ahead(**kw):
        import dataclasses

        ticket = counted_reserve(**kw)
        return dataclasses.replace(ticket, due=ticket.due + 1.0)  # as if the limit bound: next slot in 1 s

    limiter.reserve = reserve_a_second_ahead
    outcome = caller.call(request_id="r-overlap", tier="haiku",
                          request=ModelRequest.from_prompt("hello"), worker="w")
    assert outcome.status == "succeeded" and provider.calls == ["haiku"]
    # the commit ran inside the 1 s wait: the slot was used, not given up for a second one
    assert asked == ["reserve"] and limiter.late_slots == 0
    # the wait is the slot's distance once booked (1 s, less the moments between the booking and its answer)
    assert outcome.api_rows[0].ratelimit_wait_ms >= 950


def test_an_attempt_recorded_but_never_sent_is_not_billed(make_caller):
    caller, provider, _ = make_caller({})
    caller.writer = SlowWriter()
    asked = _count_limiter_asks(caller.limiter, fail_at=2)  # the fresh slot after the stale one never comes
    outcome = caller.call(request_id="r-unsent", tier="haiku",
                          request=ModelRequest.from_prompt("hello"), worker="w")
    assert asked[:2] == ["reserve", "acquire"]
    first = outcome.api_rows[0]
    assert first.outcome == "not_sent" and first.input_tokens == 0 and first.cost_usd == 0
    assert outcome.status == "succeeded" and provider.calls == ["haiku"]  # the retry went through
