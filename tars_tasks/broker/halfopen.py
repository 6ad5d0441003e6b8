"""Kombu's Redis transport, with its half-open checks also on the path Celery's gevent pool uses.

Kombu 5.7 detects a frozen or half-open Redis connection in two ways: a BRPOP whose reply is
overdue, and a pub/sub connection whose health-check PINGs go unanswered (``check_health()``
only *sends* a PING; the missing PONG is never an error by itself). The BRPOP check runs from
the event loop and from ``drain_events``; the pub/sub check only from the event loop's timer.

A gevent (or eventlet) worker has no event loop: its consumer runs Celery's "synloop", and its
remote-control box (``gPidbox``: ``celery inspect``, ``control.ping`` — what ``tars fleet
healthcheck worker`` and Flower use) is a greenlet looping on ``drain_events(timeout=1)``.
Measured: after the broker froze for one second, that worker's task consumer recovered (the
BRPOP check) but it never answered a ping again — its pub/sub connection stayed frozen, so the
healthcheck failed for as long as the worker lived. :class:`IdleCheckingPoller` runs the same
pub/sub check from the idle path of ``drain_events`` (at most once a second; the PING itself
goes out only every ``health_check_interval``), so the stale connection is dropped and the box
subscribes again over a new one.

Dropping it is not enough on that path: ``gPidbox.loop`` treats only ``socket.timeout`` as
"nothing happened" and ends on any other error, so the reconnection that follows — a connect
or SUBSCRIBE that times out while Redis is still frozen, or a read that fails after a Redis
restart — ended the box for good (measured: the worker took tasks again, never answered a
ping). :class:`IdleCheckingPoller` therefore catches connection errors of *pub/sub*
connections in ``drain_events``, drops the connection and subscribes again on the next poll.
Errors of the BRPOP connection still reach Celery's consumer, which reconnects as before.
"""

from __future__ import annotations

import contextlib
import logging
from queue import Empty
from time import monotonic

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Seconds between two idle-path pub/sub checks of one poller (kombu counts a PING missed per check).
IDLE_CHECK_INTERVAL_S = 1.0


def _stopping() -> bool:
    """Whether this process is a Celery worker told to stop: its flags set as ``maybe_shutdown``
    reads them (an exit code, 0 included; not None or False)."""
    from celery.worker import state  # unset outside a worker

    return any(f is not None and f is not False for f in (state.should_stop, state.should_terminate))


class IdleCheckingPoller(kombu_redis.MultiChannelPoller):
    """``MultiChannelPoller`` whose ``drain_events`` path checks and survives pub/sub connections,
    and ends at a worker's shutdown.

    Celery's gevent consumer (its "synloop") checks for a shutdown only between calls of
    ``drain_events(timeout=2.0)``, and kombu's loop inside that call polls again after each empty
    BRPOP (``brpop_timeout``, 1 s) until the 2 s are over: a warm shutdown began up to 3 s after
    SIGTERM (measured 3.0 s on an idle worker). Once the worker's stop flags are set, an empty poll
    of a call with a timeout raises ``socket.timeout`` as the end of that timeout would, so the
    consumer stops fetching within one BRPOP. A message that arrives is delivered as before; a call
    without a timeout waits as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_pubsub_check = 0.0
        #: Pub/sub connections dropped after an error, to be subscribed again.
        self.listen_errors = 0

    def get(self, callback, timeout=None):
        try:
            return super().get(callback, timeout=timeout)
        except Empty:
            now = monotonic()
            if now - self._last_pubsub_check >= IDLE_CHECK_INTERVAL_S:
                self._last_pubsub_check = now
                self.maybe_check_subclient_health()
            if timeout is not None and _stopping():
                raise TimeoutError() from None  # socket.timeout: "nothing came" to every caller
            raise

    def _register_LISTEN(self, channel):
        try:
            super()._register_LISTEN(channel)
        except channel.connection_errors as exc:
            self._drop_listen(channel, exc)

    def handle_event(self, fileno, event):
        chan_type = self._fd_to_chan.get(fileno)
        if chan_type is None or chan_type[1] != "LISTEN":
            return super().handle_event(fileno, event)
        channel = chan_type[0]
        try:
            return super().handle_event(fileno, event)
        except channel.connection_errors as exc:
            self._drop_listen(channel, exc)
            return None

    def _drop_listen(self, channel, exc: BaseException) -> None:
        """Forget the channel's pub/sub connection; the next poll connects and subscribes again."""
        self.listen_errors += 1
        log.warning("Redis pub/sub connection failed (%s: %s); subscribing again on the next poll",
                    type(exc).__name__, exc)
        client = channel.__dict__.get("subclient")
        sock = self._chan_to_sock.pop((channel, client, "LISTEN"), None)
        for fd, chan_type in list(self._fd_to_chan.items()):
            if chan_type == (channel, "LISTEN"):
                del self._fd_to_chan[fd]
                with contextlib.suppress(Exception):
                    self.poller.unregister(fd)
        if sock is not None:
            with contextlib.suppress(Exception):
                self.poller.unregister(sock)
        channel._in_listen = None
        if client is not None and client.connection is not None:
            with contextlib.suppress(Exception):
                client.connection.disconnect()


class HalfOpenChecks:
    """Mixin for subclasses of kombu's Redis ``Transport``: use :class:`IdleCheckingPoller`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = IdleCheckingPoller()
