"""Render Celery task messages exactly as kombu's Redis transport would LPUSH them, without sending.

Staging (``workers/dispatch.py``) holds ready-to-run Celery messages: the string kombu's Redis
transport would push into a queue's priority list. This module produces that string by running
the ordinary publish path (``celery_app.send_task`` with a kombu ``Producer``) with the final
Redis commands captured instead of executed, so the message is byte for byte what Celery would
have sent (headers, properties, body encoding, delivery tag, delivery_info) and the list is the
one kombu would have chosen.

How: kombu 5.7's ``Producer.batch()`` routes each message through the channel with a
``_publish_batch`` collector, and the Redis channel hands its final commands (``lpush key
payload``) to that collector. :func:`capture_lpush` installs a collector that records them.
This relies on kombu 5.7 internals (``Producer._batch_local``); the project pins kombu
``>=5.7,<5.8`` and ``tests/integration/test_dispatch_render.py`` checks the result against a
real publish, so an upgrade that changes it fails loudly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tars_tasks.errors import StagingError


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    #: The Redis list kombu would have pushed to (the queue's priority list).
    list_key: str
    #: The JSON string kombu would have pushed.
    payload: str


@dataclass
class Rendered:
    """What the publishes inside :func:`capture_lpush` would have sent."""

    #: One per task message, in publish order.
    messages: list[RenderedMessage] = field(default_factory=list)
    #: Any other transport command, e.g. the ``publish`` of Celery's ``task-sent`` event when
    #: task events are on: not part of the message; :meth:`send_other` sends them.
    other: list[tuple[str, tuple]] = field(default_factory=list)

    def send_other(self, pipe) -> None:
        """Queue the other commands on a redis-py pipeline (or run them on a client)."""
        for name, args in self.other:
            getattr(pipe, name)(*args)


@dataclass
class _Collector:
    """Stands in for kombu's batch state and PublishBatch: records each publish's final commands."""

    rendered: Rendered = field(default_factory=Rendered)

    def publish(self, channel, message, **kwargs):  # the _ProducerBatchState interface
        if not hasattr(channel, "create_publish_batch"):
            raise StagingError("rendering for staging needs kombu's Redis transport")
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args) -> None:  # the PublishBatch interface
        if name == "lpush" and len(args) == 2:
            key, payload = args
            self.rendered.messages.append(RenderedMessage(list_key=_s(key), payload=_s(payload)))
        elif name == "pexpire":
            raise StagingError("a queue with x-expires cannot be staged (its lists expire)")
        else:
            self.rendered.other.append((name, args))


@contextmanager
def capture_lpush(producer) -> Iterator[Rendered]:
    """Inside the block, publishes through ``producer`` (e.g. ``celery_app.send_task(...,
    producer=producer)``) send nothing; each task message's LPUSH is recorded in the yielded
    :class:`Rendered` instead (``.messages``, in publish order)."""
    local = producer._batch_local
    previous = getattr(local, "current", None)
    collector = _Collector()
    local.current = collector
    try:
        yield collector.rendered
    finally:
        local.current = previous


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
