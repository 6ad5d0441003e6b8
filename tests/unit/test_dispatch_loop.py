"""The worker's dispatcher loop: what it asks for and how long it waits (pure logic, a fake dispatcher)."""

from __future__ import annotations

import pytest

from workers.dispatch import MODEL_LIMIT_SLEEP_MAX_S, DispatchLoop, DispatchResult


class FakeDispatcher:
    horizon_s = 0.05

    def __init__(self, results: dict[str, DispatchResult]) -> None:
        self.results = results
        self.calls: list[dict] = []
        self.configs = 0

    def publish_tenant_config(self) -> None:
        self.configs += 1

    def dispatch(self, **kw) -> DispatchResult:
        self.calls.append(kw)
        return self.results[kw["tier"]]


def _r(reason: str, wait_s: float = 0.0) -> DispatchResult:
    return DispatchResult(moved=[], reason=reason, wait_s=wait_s, staged=1)


def test_the_free_slots_cap_both_the_moves_and_the_ready_depth():
    d = FakeDispatcher({"haiku": _r("empty")})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: 37, batch_max=20)
    loop.step()
    assert d.calls == [{"tier": "haiku", "max_moves": 20, "max_ready": 37}]


def test_a_worker_with_no_free_slot_asks_for_nothing():
    d = FakeDispatcher({"haiku": _r("empty")})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: 0, tick_s=0.02)
    assert loop.step() == pytest.approx(0.02) and d.calls == []


@pytest.mark.parametrize(("reason", "wait_s", "sleep_s"), [
    ("batch", 0.0, 0.0),                   # more to move: at once
    ("empty", 0.0, 0.02),                  # the tick
    ("ready_cap", 0.0, 0.02),
    ("model_limit", 0.5, 0.45),            # until the model's next slot is within the horizon
    ("model_limit", 30.0, MODEL_LIMIT_SLEEP_MAX_S),
    ("tenant_limit", 0.5, 0.02),           # another tenant's new work may come before
    ("tenant_limit", 0.03, 0.001),
])
def test_the_loop_sleeps_as_long_as_the_step_says_nothing_can_move(reason, wait_s, sleep_s):
    d = FakeDispatcher({"haiku": _r(reason, wait_s)})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: 5, tick_s=0.02)
    assert loop.step() == pytest.approx(sleep_s)


def test_the_tiers_of_one_worker_share_its_free_slots_within_a_step():
    from workers.dispatch import Reservation

    moved = [Reservation(id=str(i), tenant="a", priority=5, tokens=1, slot_us=0, slot_in_s=0) for i in range(30)]
    d = FakeDispatcher({"haiku": DispatchResult(moved=moved, reason="batch", wait_s=0, staged=0),
                        "sonnet": _r("empty")})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku", "sonnet"], free_slots=lambda: 50)
    loop.step()
    assert [(c["tier"], c["max_moves"], c["max_ready"]) for c in d.calls] == [("haiku", 50, 50), ("sonnet", 20, 20)]


def test_the_soonest_tier_decides_and_every_tier_is_stepped():
    d = FakeDispatcher({"haiku": _r("model_limit", 0.5), "sonnet": _r("batch")})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku", "sonnet"], free_slots=lambda: 5)
    assert loop.step() == 0.0 and [c["tier"] for c in d.calls] == ["haiku", "sonnet"]


def test_the_tenant_configuration_is_written_at_start_and_refreshed():
    d = FakeDispatcher({"haiku": _r("empty")})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: 5)
    loop.step()
    loop.step()
    assert d.configs == 1
    loop._config_written -= 10_000
    loop.step()
    assert d.configs == 2


def test_a_failing_step_does_not_end_the_loop():
    import threading

    calls = threading.Event()

    class Flaky(FakeDispatcher):
        n = 0

        def dispatch(self, **kw):
            self.n += 1
            if self.n >= 3:
                calls.set()
            raise ConnectionError("redis went away")

    loop = DispatchLoop(dispatcher=Flaky({}), tiers=["haiku"], free_slots=lambda: 5, tick_s=0.001).start()
    try:
        assert calls.wait(5)
    finally:
        loop.stop()


def _moved(n: int):
    from workers.dispatch import Reservation

    return [Reservation(id=str(i), tenant="a", priority=5, tokens=1, slot_us=0, slot_in_s=0) for i in range(n)]


@pytest.mark.parametrize(("free", "result", "bound"), [
    (5, _r("empty"), False),                 # everything staged moved: a freed slot changes nothing
    (5, _r("model_limit", 0.5), False),      # the model's limit holds it, not the slots
    (5, _r("tenant_limit", 0.5), False),
    (5, _r("ready_cap"), True),              # the Celery lists hold as much as the free slots
    (5, DispatchResult(moved=_moved(5), reason="batch", wait_s=0, staged=3), True),   # cut at the slots
    (50, DispatchResult(moved=_moved(20), reason="batch", wait_s=0, staged=3), False),  # cut at batch_max
    (0, _r("empty"), True),                  # a full worker
])
def test_a_finishing_task_wakes_the_loop_only_when_free_slots_held_the_last_step_back(free, result, bound):
    d = FakeDispatcher({"haiku": result})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: free, batch_max=20)
    loop.step()
    assert loop.slot_bound is bound
    loop.slot_freed()
    assert loop._wake.is_set() is bound


def test_a_staging_wake_that_comes_during_the_step_finding_the_tier_empty_keeps_the_tier_asked():
    """The wake's entries were staged after the script looked: marking the tier idle would leave
    them until the tick (with a tick of a minute, a minute)."""

    class WokenMidStep(FakeDispatcher):
        def dispatch(self, **kw):
            result = super().dispatch(**kw)
            if len(self.calls) == 1:
                loop.staged("haiku")  # heard while this step's script ran
            return result

    d = WokenMidStep({"haiku": DispatchResult(moved=[], reason="empty", wait_s=0, staged=0)})
    loop = DispatchLoop(dispatcher=d, tiers=["haiku"], free_slots=lambda: 5, tick_s=60.0)
    loop.step()
    loop.step()
    assert len(d.calls) == 2  # the second step asked the tier again
    loop.step()
    assert len(d.calls) == 2  # and, with no wake since, a tier found empty is idle until its tick
