"""Telling a poison request from its bystanders.

A request that crashes its worker process (a segfault in a C library, an out-of-memory kill)
takes every other request in flight in that process down with it, and all of them come back
redelivered. Counting deliveries alone then fails the bystanders as "poison" too (measured: 8
requests failed for 1 poison one). So a request redelivered often enough to be suspect
(``max_deliveries - 1`` redeliveries) runs **alone**: the process lets the calls in flight
finish, holds new ones back, and marks the suspect in Redis for the duration of its call. If the
process dies during that call, the mark survives and the next delivery fails the request as
poison without calling the model again; if the call returns, the mark is removed and the
bystander goes on as usual. A crash while running alone is the evidence; nothing else is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CallGate:
    """Shared passage for ordinary calls, exclusive passage for a suspect (one process)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive_waiting = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            while self._exclusive or self._active:
                self._cond.wait()
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
