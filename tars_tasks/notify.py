"""Completion notices: workers tell a producer its requests are finished.

Notices are a latency optimisation, not the record: Postgres is. A producer that misses a
notice (it subscribed late, Redis blinked) still finds the result by polling the row, which
:meth:`tars_tasks.client.TarsClient.wait` does on a slow timer.

Workers publish one message per (batch, producer) after the batch's rows are committed.
Embedded fleets (no Redis) deliver in-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from config.keys import done_channel
from tars_tasks.redis_client import PubSubWatch

log = logging.getLogger(__name__)

#: (request_id, status)
Notice = tuple[str, str]
OnDone = Callable[[str, str, float], None]


class Notifier(Protocol):
    def publish(self, batches: dict[str, list[Notice]]) -> None: ...


class CompletionListener:
    """Receives notices for one producer and wakes whoever waits on a request id."""

    #: Remember this many finished ids whose waiter has not registered yet.
    RECENT_MAX = 200_000

    def __init__(self, producer_id: str, *, namespace: str) -> None:
        self.producer_id = producer_id
        #: Where workers publish this producer's notices (the task's ``reply_to``).
        self.channel = done_channel(namespace, producer_id)
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._callbacks: list[OnDone] = []

    def on_done(self, callback: OnDone) -> None:
        """Call ``callback(request_id, status, monotonic_time_received)`` for every notice."""
        self._callbacks.append(callback)

    def deliver(self, notices: Iterable[Notice]) -> None:
        now = time.monotonic()
        notices = list(notices)
        fired: list[threading.Event] = []
        with self._lock:
            for rid, status in notices:
                ev = self._events.pop(rid, None)
                if ev is not None:
                    fired.append(ev)
                self._recent[rid] = status
                if len(self._recent) > self.RECENT_MAX:
                    self._recent.popitem(last=False)
        for ev in fired:
            ev.set()
        for cb in self._callbacks:
            for rid, status in notices:
                cb(rid, status, now)

    def event_for(self, request_id: str) -> threading.Event:
        with self._lock:
            ev = threading.Event()
            if request_id in self._recent:
                ev.set()
            else:
                self._events[request_id] = self._events.get(request_id) or ev
                ev = self._events[request_id]
            return ev

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._events.pop(request_id, None)
            self._recent.pop(request_id, None)

    def close(self) -> None:
        """Stop receiving notices (subclasses release their subscription)."""


# --- in-process (embedded fleet) -----------------------------------------------------------

_local_listeners: dict[str, CompletionListener] = {}
_local_lock = threading.Lock()


class LocalNotifier:
    def publish(self, batches: dict[str, list[Notice]]) -> None:
        for channel, notices in batches.items():
            with _local_lock:
                listener = _local_listeners.get(channel)
            if listener is not None:
                listener.deliver(notices)


class LocalListener(CompletionListener):
    def __init__(self, producer_id: str, *, namespace: str) -> None:
        super().__init__(producer_id, namespace=namespace)
        with _local_lock:
            _local_listeners[self.channel] = self

    def close(self) -> None:
        with _local_lock:
            _local_listeners.pop(self.channel, None)


# --- Redis pub/sub -------------------------------------------------------------------------


class RedisNotifier:
    def __init__(self, redis_client) -> None:
        self._redis = redis_client

    def publish(self, batches: dict[str, list[Notice]]) -> None:
        if not batches:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for channel, notices in batches.items():
                pipe.publish(channel, json.dumps(notices, separators=(",", ":")))
            pipe.execute()
        except Exception as exc:  # the rows are durable; producers fall back to polling
            log.warning("completion notice not published (%s); producers will poll", exc)


class RedisListener(CompletionListener):
    def __init__(self, producer_id: str, *, namespace: str, redis_client) -> None:
        super().__init__(producer_id, namespace=namespace)
        self._pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(self.channel)
        self._watch = PubSubWatch(self._pubsub)  # a frozen connection is dropped, not waited on forever
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tars-listener-{producer_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=0.5)
                self._watch.check()
            except Exception as exc:
                log.warning("completion listener lost Redis (%s); retrying", exc)
                time.sleep(0.5)
                continue
            if msg and msg.get("type") == "message":
                try:
                    notices = [tuple(n) for n in json.loads(msg["data"])]
                except (ValueError, TypeError):
                    continue
                self.deliver(notices)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._pubsub.close()
        except Exception:
            pass
