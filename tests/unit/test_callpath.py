"""The call path's steps and their composition, on the in-memory limiter and breaker (pure logic,
no Redis; tests/unit/test_caller.py runs the same path on the real Redis ones)."""

from __future__ import annotations

import ast
from collections import deque
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from config.catalog import load_catalog
from tars_tasks.codes import FailureReason
from tars_tasks.errors import RateLimited, TransientProviderError
from tests.helpers import make_settings
from workers.caller import ModelCaller
from workers.callpath import Attempt, Call, CallOutcome, CallStep, GiveUp
from workers.callpath.breaker_step import BreakerStep
from workers.callpath.fallback_step import FallbackStep
from workers.callpath.limiter_step import LimiterStep
from workers.callpath.memory import InMemoryBreaker, InMemoryRateLimiter
from workers.callpath.recorder_step import RecorderStep
from workers.providers import Completion
from workers.providers.request import ModelRequest

RID = "00000000-0000-0000-0000-0000000000c1"


class Scripted:
    name = "scripted"

    def __init__(self, script: dict[str, list]) -> None:
        self.script = {t: deque(v) for t, v in script.items()}
        self.calls: list[str] = []

    def complete(self, *, spec, request, request_id, attempt):
        self.calls.append(spec.tier)
        q = self.script.get(spec.tier)
        item = q.popleft() if q else Completion(text="ok", input_tokens=10, output_tokens=20)
        if isinstance(item, BaseException):
            raise item
        return item


class Rows:
    def __init__(self) -> None:
        self.recorded: list = []

    def record(self, api_rows):
        self.recorded.extend(api_rows)


def make(script=None, *, limiter=True, breaker=True, **settings):
    fields = {"breaker_failure_threshold": 2, "retry_backoff_initial_s": 0.001, "retry_backoff_max_s": 0.01,
              **settings}
    sleeps: list[float] = []
    lim = InMemoryRateLimiter(sleep=sleeps.append) if limiter else None
    brk = InMemoryBreaker(failure_threshold=fields["breaker_failure_threshold"], cooldown_s=60) if breaker else None
    caller = ModelCaller(settings=make_settings({}, **fields), catalog=load_catalog(), writer=Rows(),
                         redis_client=None, sleep=sleeps.append, limiter=lim, breaker=brk)
    provider = Scripted(script or {})
    caller._providers = {t: provider for t in ("haiku", "sonnet", "opus")}
    return caller, provider, sleeps


def call(caller, tier="sonnet", **kw):
    return caller.call(request_id=RID, tier=tier, request=ModelRequest.from_prompt("p" * 40), worker="w", **kw)


# --- the composition ---------------------------------------------------------------------------


class Trace(CallStep):
    """Records every hook it sees, by name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_call(self, call):
        self.log.append(f"{self.name}.before_call")

    def before_attempt(self, call, attempt):
        self.log.append(f"{self.name}.before_attempt")

    def before_send(self, call, attempt):
        self.log.append(f"{self.name}.before_send")

    def after_attempt(self, call, attempt):
        self.log.append(f"{self.name}.after_attempt")

    def after_attempt_failed(self, call, attempt, exc):
        self.log.append(f"{self.name}.failed:{exc.outcome}")

    def after_call(self, call, outcome):
        self.log.append(f"{self.name}.after_call:{outcome.status if outcome else None}")


def test_the_default_path_is_composed_in_order_and_a_step_without_redis_is_left_out():
    caller, _, _ = make()
    assert [type(s).__name__ for s in caller.path.steps] == [
        "FallbackStep", "RetryStep", "BreakerStep", "ReservedSlotStep", "LimiterStep", "CostStep", "RecorderStep"]
    bare, _, _ = make(limiter=False, breaker=False)
    assert [type(s).__name__ for s in bare.path.steps] == ["FallbackStep", "RetryStep", "CostStep", "RecorderStep"]


def test_before_hooks_run_top_to_bottom_and_after_hooks_bottom_to_top():
    caller, _, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]}, breaker_failure_threshold=9)
    log: list[str] = []
    caller.path.add(Trace("a", log), before=BreakerStep)
    caller.path.add(Trace("b", log), after=RecorderStep)
    assert call(caller).status == "succeeded"
    assert log == [
        "a.before_call", "b.before_call",
        "a.before_attempt", "b.before_attempt", "a.before_send", "b.before_send", "b.failed:transient_error",
        "a.failed:transient_error",
        "a.before_attempt", "b.before_attempt", "a.before_send", "b.before_send", "b.after_attempt",
        "a.after_attempt",
        "b.after_call:succeeded", "a.after_call:succeeded",
    ]


def test_add_refuses_an_anchor_the_path_does_not_have():
    caller, _, _ = make(limiter=False)
    with pytest.raises(ValueError, match="no LimiterStep"):
        caller.path.add(CallStep(), before=LimiterStep)


# --- custom steps plug in without touching the loop ---------------------------------------------


class ResponseCache(CallStep):
    """A response cache: answers a request it has seen from memory, no provider call, no row."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}

    def before_call(self, call: Call) -> None:
        hit = self.answers.get(call.request.text())
        if hit is not None:
            call.answered(text=hit, stop_reason="end_turn")

    def after_call(self, call: Call, outcome: CallOutcome | None) -> None:
        if outcome is not None and outcome.status == "succeeded" and outcome.api_rows:
            self.answers[call.request.text()] = outcome.text


def test_a_response_cache_step_plugs_in_without_editing_the_loop():
    caller, provider, _ = make()
    cache = ResponseCache()
    caller.path.add(cache, before=BreakerStep)
    first, second = call(caller), call(caller)
    assert first.status == second.status == "succeeded" and second.text == first.text == "ok"
    assert provider.calls == ["sonnet"] and second.api_rows == []
    assert len(caller.writer.recorded) == 1  # the cached answer wrote no attempt row


class Budget(CallStep):
    """A budget (docs/ARCHITECTURE.md): reserves each attempt's estimate, refuses what does not fit,
    settles to the real cost."""

    def __init__(self, usd) -> None:
        self.left = Decimal(usd)
        self.settled: list[Decimal] = []

    @staticmethod
    def _estimate(call: Call) -> Decimal:
        return (call.spec or call.requested).cost_usd(input_tokens=call.estimated_input_tokens)

    def before_call(self, call: Call) -> None:
        if self._estimate(call) > self.left:
            call.give_up(reason=FailureReason.BUDGET_EXCEEDED, error="budget_exceeded: nothing left")
        else:
            self.left -= self._estimate(call)

    def next_move(self, call, attempt, exc):
        if self._estimate(call) > self.left:
            return GiveUp(reason=FailureReason.BUDGET_EXCEEDED, error="budget_exceeded: no room for another attempt")
        self.left -= self._estimate(call)
        return None

    def after_call(self, call: Call, outcome: CallOutcome | None) -> None:
        if outcome is not None:
            self.settled.append(sum((r.cost_usd for r in outcome.api_rows), start=Decimal(0)))


def test_a_budget_step_can_refuse_a_call_before_any_attempt_and_settle_after_every_call():
    caller, provider, _ = make()
    budget = Budget(usd=0)
    caller.path.add(budget, before=FallbackStep)
    out = call(caller)
    assert out.status == "failed" and out.failure_reason == "budget_exceeded" and out.api_rows == []
    assert provider.calls == [] and caller.writer.recorded == [] and budget.settled == [0]


def test_a_budget_step_first_in_the_path_stops_a_retry_the_budget_has_no_room_for():
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]},
                               breaker_failure_threshold=9)
    one = caller.spec("sonnet").cost_usd(input_tokens=ModelRequest.from_prompt("p" * 40).estimated_input_tokens())
    budget = Budget(usd=one * 3 / 2)
    caller.path.add(budget, before=FallbackStep)
    out = call(caller)
    assert out.status == "failed" and out.failure_reason == "budget_exceeded" and provider.calls == ["sonnet"]
    assert [r.outcome for r in out.api_rows] == ["transient_error"] and budget.settled == [0]


class SlotReservedUpstream(CallStep):
    """The dispatcher reserved the first attempt's rate-limit slot: the limiter must not acquire it."""

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        if call.hints.get("slot_reserved") and attempt.try_number == 1:
            attempt.slot_held = True
            attempt.reserved_tokens = call.hints.get("reserved_tokens")


def test_a_pre_reserved_first_slot_is_one_step_before_the_limiter():
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]},
                               breaker_failure_threshold=9)
    caller.path.add(SlotReservedUpstream(), before=LimiterStep)
    out = call(caller, hints={"slot_reserved": True, "reserved_tokens": 5000})
    assert out.status == "succeeded" and provider.calls == ["sonnet", "sonnet"]
    assert len(caller.limiter.acquired) == 1  # the retry acquired; the first attempt did not
    (_, _, retry_reserved), = caller.limiter.acquired
    # the answered retry corrects its own reservation to the usage (30 tokens); nothing else was charged
    assert [t for *_, t in caller.limiter.adjusted] == [30 - retry_reserved]
    answered, _, _ = make()
    answered.path.add(SlotReservedUpstream(), before=LimiterStep)
    assert call(answered, hints={"slot_reserved": True, "reserved_tokens": 5000}).status == "succeeded"
    assert answered.limiter.acquired == [] and [t for *_, t in answered.limiter.adjusted] == [30 - 5000]
    plain, _, _ = make()
    call(plain)
    assert len(plain.limiter.acquired) == 1


def test_the_default_path_trusts_a_dispatcher_reserved_first_slot_and_acquires_for_the_retry():
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]},
                               breaker_failure_threshold=9)
    out = call(caller, hints={"slot_reserved": True, "reserved_tokens": 5000})
    assert out.status == "succeeded" and provider.calls == ["sonnet", "sonnet"]
    assert len(caller.limiter.acquired) == 1  # only the retry
    answered, _, _ = make()
    assert call(answered, hints={"slot_reserved": True, "reserved_tokens": 5000}).status == "succeeded"
    assert answered.limiter.acquired == [] and [t for *_, t in answered.limiter.adjusted] == [30 - 5000]


def test_a_dispatched_slot_still_ahead_is_waited_for_and_one_missed_is_given_up_for_a_fresh_one():
    import time

    ahead, _, sleeps = make()
    out = call(ahead, hints={"slot_reserved": True, "reserved_tokens": 5000, "slot_at": time.monotonic() + 0.2})
    assert out.status == "succeeded" and ahead.limiter.acquired == []
    assert len(sleeps) == 1 and 0.1 < sleeps[0] <= 0.2  # waited for its slot after the row was written
    missed, _, _ = make()
    out = call(missed, hints={"slot_reserved": True, "reserved_tokens": 5000, "slot_at": time.monotonic() - 5.0,
                              "slot_grace_s": 0.1})
    assert out.status == "succeeded" and len(missed.limiter.acquired) == 1  # 5 s late: a fresh slot
    assert next(t for *_, t in missed.limiter.adjusted) == -5000  # the missed slot's tokens given back
    graced, _, _ = make()
    out = call(graced, hints={"slot_reserved": True, "reserved_tokens": 5000, "slot_at": time.monotonic() - 0.1,
                              "slot_grace_s": 0.5})
    assert out.status == "succeeded" and graced.limiter.acquired == []  # late, but within its grace


# --- the built-in steps' logic on the stand-ins -----------------------------------------------


def test_a_tripped_in_memory_breaker_sends_the_request_to_the_fallback_tier():
    fail = [TransientProviderError("503", status_code=503) for _ in range(2)]
    caller, provider, _ = make({"sonnet": fail})
    out = call(caller)
    assert out.status == "succeeded" and out.tier_used == "haiku" and provider.calls == ["sonnet", "sonnet", "haiku"]
    assert [(r.tier, r.outcome) for r in out.api_rows] == [
        ("sonnet", "transient_error"), ("sonnet", "transient_error"), ("haiku", "ok")]
    assert [r.attempt for r in out.api_rows] == [1, 2, 3]
    assert caller.breaker.state(provider="scripted", model=caller.spec("sonnet").model) == "open"


def test_with_no_fallback_left_an_open_breaker_fails_circuit_open_once_the_budget_is_spent(monkeypatch):
    caller, provider, _ = make({"haiku": [TransientProviderError("503", status_code=503)] * 2})
    clock = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    caller._sleep = lambda s: clock.__setitem__(0, clock[0] + s)
    out = call(caller, tier="haiku")
    assert out.status == "failed" and out.failure_reason == "circuit_open" and out.error.startswith("circuit_open")
    assert provider.calls == ["haiku", "haiku"]


def test_every_attempt_is_recorded_in_flight_with_its_input_estimate_before_it_is_sent():
    caller, _, _ = make()
    seen: list[dict] = []

    class Peek(CallStep):
        def before_send(self, call, attempt):
            seen.extend(caller.writer.recorded)

    caller.path.add(Peek())
    out = call(caller)
    (before,) = seen
    assert before.outcome == "in_flight" and before.input_tokens > 0 and before.cost_usd > 0
    assert before.id == out.api_rows[0].id and out.api_rows[0].outcome == "ok"


def test_a_call_killed_mid_flight_leaves_its_row_billed_with_the_input_estimate():
    class Killed(BaseException):
        pass

    caller, _, _ = make({"sonnet": [Killed()]})
    ended: list[object] = []

    class Watch(CallStep):
        def after_call(self, call, outcome):
            ended.append(outcome)

    caller.path.add(Watch())
    with pytest.raises(Killed):
        call(caller)
    (row,) = caller.writer.recorded
    assert row.outcome == "in_flight" and row.input_tokens > 0 and row.cost_usd > 0
    assert ended == [None]  # after_call ran, told the call raised


def test_a_stale_slot_is_given_back_and_taken_again_and_if_none_comes_the_row_is_not_sent(monkeypatch):
    caller, provider, _ = make()
    clock = [100.0]
    monkeypatch.setattr("workers.callpath.limiter_step.time.monotonic", lambda: clock[0])

    class SlowCommit(CallStep):
        def before_attempt(self, call, attempt):
            clock[0] += 1.0  # the row's commit outlasted the slot

    caller.path.add(SlowCommit(), after=RecorderStep)
    n = {"asks": 0}
    for name in ("reserve", "acquire"):
        real = getattr(caller.limiter, name)

        def ask(_real=real, **kw):
            n["asks"] += 1
            if n["asks"] == 2:  # the fresh slot after the stale one
                raise TimeoutError("no capacity within the deadline")
            return _real(**kw)

        setattr(caller.limiter, name, ask)
    out = call(caller)
    first = out.api_rows[0]
    assert first.outcome == "not_sent" and first.input_tokens == 0 and first.cost_usd == 0
    # reserve, stale → acquire (none) → not sent; retry: reserve, stale → acquire → sent
    assert out.status == "succeeded" and provider.calls == ["sonnet"] and n["asks"] == 4
    assert any(t < 0 for *_, t in caller.limiter.adjusted)  # the stale slot's tokens went back


def test_an_unreachable_limiter_is_retried_then_the_request_fails_fleet_state_unavailable(monkeypatch):
    caller, provider, sleeps = make()
    clock = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    caller._sleep = lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s))

    def down(**kw):
        raise redis.ConnectionError("refused")

    caller.limiter.acquire = caller.limiter.reserve = down
    out = call(caller)
    assert out.status == "failed" and out.failure_reason == "fleet_state_unavailable"
    assert out.api_rows == [] and provider.calls == [] and len(sleeps) > 3  # backed off, never sent


def test_a_limiter_back_within_the_budget_lets_the_call_through():
    caller, provider, sleeps = make()
    real, n = caller.limiter.reserve, {"k": 0}

    def flaky(**kw):
        n["k"] += 1
        if n["k"] <= 2:
            raise redis.TimeoutError("slow")
        return real(**kw)

    caller.limiter.reserve = flaky
    out = call(caller)
    assert out.status == "succeeded" and provider.calls == ["sonnet"] and sleeps[:2] == [0.1, 0.2]


def test_an_unreachable_breaker_lets_calls_through():
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]})

    def down(**kw):
        raise redis.ConnectionError("refused")

    caller.breaker.allow = caller.breaker.record_failure = caller.breaker.record_success = down
    out = call(caller)
    assert out.status == "succeeded" and provider.calls == ["sonnet", "sonnet"]


def test_a_fleet_limiter_timeout_is_rate_limited_and_retried_without_a_row():
    caller, provider, _ = make()
    real, n = caller.limiter.acquire, {"k": 0}

    def once_late(**kw):
        n["k"] += 1
        if n["k"] == 1:
            raise TimeoutError("no capacity")
        return real(**kw)

    caller.limiter.acquire = once_late
    out = call(caller)
    assert out.status == "succeeded" and [r.attempt for r in out.api_rows] == [1] and provider.calls == ["sonnet"]


def test_retry_after_and_the_attempt_cap_come_from_the_tenacity_policy():
    storm = [RateLimited("429", status_code=429, retry_after_s=2.5) for _ in range(9)]
    caller, provider, sleeps = make({"sonnet": storm})
    out = call(caller)
    spec = caller.spec("sonnet")
    assert out.status == "failed" and out.failure_reason == "rate_limited"
    assert len(provider.calls) == spec.max_attempts and sleeps.count(2.5) == spec.max_attempts - 1
    assert out.error.startswith(f"rate_limited after {spec.max_attempts} attempt(s) on tier sonnet")


# --- the loop knows no step ----------------------------------------------------------------------


def test_the_loop_names_no_step():
    """By construction: path.py imports nothing of any step, so a step is added without editing it."""
    tree = ast.parse(Path("workers/callpath/path.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "time", "collections.abc", "workers.callpath.context"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"BreakerStep", "LimiterStep", "RetryStep", "FallbackStep", "CostStep", "RecorderStep",
                        "breaker", "limiter", "writer"}


def test_retries_and_fallbacks_take_the_tenants_own_limits_too(tmp_path):
    """A tenant's limits bind every call the provider sees from it: the retry of a dispatched first
    attempt (whose slot the dispatcher took for model and tenant) reserves the tenant's limit and its
    limit on the tier; a call to the fallback tier reserves the tenant's limit on that tier."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.acme]\nrpm = 60\n[tenants.acme.tiers.sonnet]\nrpm = 6\n"
                       "[tenants.acme.tiers.haiku]\ntpm = 6000\n")
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]},
                               breaker_failure_threshold=9, tenants_path=tenants)
    out = call(caller, hints={"slot_reserved": True, "reserved_tokens": 5000, "tenant": "acme"})
    assert out.status == "succeeded" and provider.calls == ["sonnet", "sonnet"]
    keys = {k for scope, k in caller.limiter._tat if scope == ""}
    assert keys == {"tars:tlimit:acme", "tars:tlimit:acme:sonnet"}
    # sonnet at 6 RPM for acme: the next acme call on sonnet waits 10 s, another tenant's does not
    assert caller.limiter._tat[("", "tars:tlimit:acme:sonnet")][0] == pytest.approx(
        caller.limiter._tat[("", "tars:tlimit:acme")][0] - 1.0 + 10.0)

    fell, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)] * 2}, tenants_path=tenants,
                             breaker_failure_threshold=2, breaker_open_policy="fallback")
    out = call(fell, hints={"tenant": "acme"})
    assert out.status == "succeeded" and provider.calls[-1] == "haiku"
    assert ("", "tars:tlimit:acme:haiku") in fell.limiter._tat

    other, _, _ = make(tenants_path=tenants)
    call(other, hints={"tenant": "someone-else"})  # no limits of its own: the model's only
    assert {k for scope, k in other.limiter._tat if scope == ""} == set()


# --- the retry policy costs nothing until an attempt fails -------------------------------------


def test_a_tier_whose_first_attempt_succeeds_builds_no_retry_policy(monkeypatch):
    import workers.callpath.retry_step as retry_step

    built: list[str] = []
    real = retry_step.retrying_for

    def counting(spec, **kw):
        built.append(spec.tier)
        return real(spec, **kw)

    monkeypatch.setattr(retry_step, "retrying_for", counting)
    caller, _provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]})
    assert call(caller, tier="haiku").status == "succeeded" and built == []
    out = call(caller)  # sonnet: one transient failure, then success
    assert out.status == "succeeded" and [r.attempt for r in out.api_rows] == [1, 2] and built == ["sonnet"]


def test_the_retry_budget_counts_the_first_attempts_time_though_the_policy_starts_at_its_failure(monkeypatch):
    """The policy is built at the first failure; its clock still starts with the tier. A first
    attempt that took the whole retry budget leaves no room for a backoff: no retry."""
    import time as time_mod

    real_monotonic = time_mod.monotonic
    offset = [0.0]
    monkeypatch.setattr(time_mod, "monotonic", lambda: real_monotonic() + offset[0])
    # no limiter: its deadline (the tier's) would refuse the retry's slot on its own
    caller, provider, _ = make({"sonnet": [TransientProviderError("503", status_code=503)]}, limiter=False)
    budget = caller.spec("sonnet").retry_budget_s
    real_complete = provider.complete

    def slow_first(**kw):
        if not provider.calls:
            offset[0] += budget  # the first attempt "takes" the whole of the tier's retry budget
        return real_complete(**kw)

    provider.complete = slow_first
    call(caller)
    assert provider.calls.count("sonnet") == 1  # (then the fallback tier may answer)
