"""A bundle's finished members free their slots while the bundle is still held (workers/agent.py:
members_done, subtracted from the dispatcher's count of the requests a worker holds)."""

from __future__ import annotations

import threading

import pytest

from workers import agent
from workers.agent import SubAgent


class _Bundle:
    """A SubAgent whose members run until the test lets each one finish (or fail)."""

    def __init__(self, n: int) -> None:
        self.go = [threading.Event() for _ in range(n)]
        self.boom = [False] * n
        self.sub = SubAgent.__new__(SubAgent)
        self.sub.handle = self._handle  # type: ignore[method-assign]
        self.result: list[str] | None = None
        self.thread = threading.Thread(target=self._run, args=(n,), daemon=True)

    def _handle(self, *, message, **_kw) -> str:
        assert self.go[message].wait(10)
        if self.boom[message]:
            raise RuntimeError("a member that raised still finished")
        return "succeeded"

    def _run(self, n: int) -> None:
        try:
            self.result = self.sub.handle_bundle(messages=list(range(n)))
        except RuntimeError:
            self.result = ["raised"]


def _wait_for(value: int) -> None:
    for _ in range(1000):
        if agent.members_done() == value:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"members_done stayed {agent.members_done()}, not {value}")


@pytest.fixture(autouse=True)
def _clean():
    start = agent.members_done()
    yield
    assert agent.members_done() == start


def test_each_finished_member_is_counted_until_the_bundle_returns():
    base = agent.members_done()
    b = _Bundle(4)
    b.thread.start()
    for i, expect in ((2, 1), (0, 2), (3, 3)):
        b.go[i].set()
        _wait_for(base + expect)
    assert b.result is None  # the bundle is still held: member 1 runs
    b.go[1].set()
    b.thread.join(5)
    assert b.result == ["succeeded"] * 4
    assert agent.members_done() == base  # returned: its members are no longer among the held


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the member's thread raised
def test_a_member_that_raises_is_counted_finished_and_the_count_returns_to_where_it_was():
    base = agent.members_done()
    b = _Bundle(3)
    b.boom[1] = True
    b.thread.start()
    b.go[1].set()
    _wait_for(base + 1)
    b.go[0].set()
    b.go[2].set()
    b.thread.join(5)
    assert agent.members_done() == base


def test_members_outliving_a_bundle_that_raised_do_not_leave_the_count_high():
    """Member 0 runs in the bundle's own thread: if it raises, the bundle raises while the others
    still run; they finish later, and the count must end where it started (else the free slots
    would shrink for good)."""
    base = agent.members_done()
    b = _Bundle(3)
    b.boom[0] = True
    b.thread.start()
    b.go[0].set()
    b.thread.join(5)
    assert b.result == ["raised"] and agent.members_done() == base
    b.go[1].set()
    b.go[2].set()
    threading.Event().wait(0.2)
    assert agent.members_done() == base
