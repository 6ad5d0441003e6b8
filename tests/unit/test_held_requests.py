"""The dispatcher's count of the requests its worker holds (workers/dispatch.py: HeldRequests).

The free slots it gives must never exceed the true ones (a worker would pull more than it can
start), must be exact wherever they could bind a step, and must not cost a walk over Celery's
reserved requests at every step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.dispatch import HeldRequests

CONCURRENCY = 100
EXACT_BELOW = 20


class Worker:
    """Celery's side: messages received (the signal first), then reserved, later finished."""

    def __init__(self) -> None:
        self.reserved: list[int] = []  # the requests each held message stands for
        self.now = 0.0
        self.walks = 0
        self.held = HeldRequests(count=self._walk, refresh_s=0.1, clock=lambda: self.now)

    def _walk(self) -> int:
        self.walks += 1
        return sum(self.reserved)

    def receive(self, n: int) -> None:
        self.held.received(n)
        self.reserved.append(n)

    def true_free(self) -> int:
        return CONCURRENCY - sum(self.reserved)


events = st.lists(st.one_of(
    st.tuples(st.just("receive"), st.integers(1, 16)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.floats(0.0, 0.15)),
    st.tuples(st.just("step"), st.just(0)),
), max_size=200)


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_free_slots_never_exceed_the_true_ones_and_are_exact_where_they_could_bind(evs):
    w = Worker()
    for kind, arg in evs:
        if kind == "receive" and w.true_free() >= arg:
            w.receive(arg)
        elif kind == "finish" and w.reserved:
            w.reserved.pop(arg % len(w.reserved))
        elif kind == "tick":
            w.now += arg
        elif kind == "step":
            free = w.held.free(CONCURRENCY, exact_below=EXACT_BELOW)
            assert free <= w.true_free()
            if free < EXACT_BELOW:
                assert free == w.true_free()


def test_far_from_the_bound_a_step_does_not_walk_the_reserved_requests():
    w = Worker()
    for _ in range(50):
        w.receive(1)
        w.now += 0.001
        assert w.held.free(CONCURRENCY, exact_below=EXACT_BELOW) <= w.true_free()
    assert w.walks == 1  # the first step; the next 49 added what was received
    w.now += 0.1
    w.held.free(CONCURRENCY, exact_below=EXACT_BELOW)
    assert w.walks == 2  # refreshed


def test_near_the_bound_every_step_walks():
    w = Worker()
    for _ in range(CONCURRENCY - EXACT_BELOW + 1):
        w.receive(1)
    for _ in range(5):
        assert w.held.free(CONCURRENCY, exact_below=EXACT_BELOW) == EXACT_BELOW - 1
    assert w.walks == 5


def test_a_message_received_just_before_a_walk_and_reserved_after_it_is_still_counted():
    w = Worker()
    w.held.free(CONCURRENCY, exact_below=EXACT_BELOW)
    w.held.received(10)  # task_received fired ...
    w.now += 0.2
    w.held.exact()  # ... a walk ran (a threads pool) before Celery reserved the message ...
    w.reserved.append(10)  # ... and now it is reserved
    w.now += 0.01
    assert w.held.free(CONCURRENCY, exact_below=EXACT_BELOW) <= w.true_free() == CONCURRENCY - 10
