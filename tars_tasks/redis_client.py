"""Redis clients: one per (process, URL, bounds), sized for hundreds of greenlets, never waiting forever.

Every Redis connection TARS opens — the fleet-state client here, Celery's broker connections
(:func:`broker_transport_bounds`, used by ``tars_tasks.celery_app``), the producers'
completion pub/sub — has a connect bound, a reply bound and TCP keepalives
(docs/OPERATIONS.md, "Timeouts"):

* ``redis_socket_connect_timeout_s``: connect and handshake;
* ``redis_socket_timeout_s``: any reply. A frozen or half-open peer (the kernel still ACKs,
  nothing answers) turns into ``redis.TimeoutError`` after this long, the connection is
  dropped and the next command opens a new one. Commands are not retried by redis-py here
  (a retried ``EVALSHA`` of the rate limiter could reserve twice): each waits one bound;
* ``redis_health_check_interval_s``: a pooled connection idle this long is PINGed before it
  is used again;
* TCP keepalive (``tcp_keepalive_*``) and ``TCP_USER_TIMEOUT`` close the connection when the
  peer *host* is gone.

Pub/sub is the exception to "a reply is due": a subscriber waits for messages that may never
come, so no read timeout can apply to it. redis-py's pub/sub health check only *sends* a
PING every interval — a PONG that never comes is never an error — so :class:`PubSubWatch`
counts how long a PING stays unanswered and drops the connection, and the next read
reconnects and subscribes again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from config.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: redis-py 8 caps a pool at 100 connections; a gevent worker runs hundreds of tasks.
MAX_CONNECTIONS = 2000

_lock = threading.Lock()
_clients: dict[tuple, redis.Redis] = {}


def tcp_keepalive_options(settings: Settings) -> dict[int, int]:
    """``IPPROTO_TCP`` socket options for keepalive and ``TCP_USER_TIMEOUT`` (those this OS has)."""
    wanted = {
        "TCP_KEEPIDLE": settings.tcp_keepalive_idle_s,
        "TCP_KEEPINTVL": settings.tcp_keepalive_interval_s,
        "TCP_KEEPCNT": settings.tcp_keepalive_count,
    }
    if settings.tcp_user_timeout_s:
        wanted["TCP_USER_TIMEOUT"] = int(settings.tcp_user_timeout_s * 1000)
    return {getattr(socket, name): int(value) for name, value in wanted.items() if hasattr(socket, name)}


def redis_connection_bounds(settings: Settings, *, timeout_s: float | None = None) -> dict[str, Any]:
    """Keyword arguments of redis-py's ``Redis``/``ConnectionPool`` that bound every wait.
    ``timeout_s`` (a producer's ``client_timeout_s``) tightens the connect and reply bounds."""
    connect = settings.redis_socket_connect_timeout_s
    reply = settings.redis_socket_timeout_s
    if timeout_s is not None:
        connect, reply = min(connect, timeout_s), min(reply, timeout_s)
    return {
        "socket_connect_timeout": connect,
        "socket_timeout": reply,
        "socket_keepalive": True,
        "socket_keepalive_options": tcp_keepalive_options(settings),
        "health_check_interval": settings.redis_health_check_interval_s,
    }


def broker_transport_bounds(settings: Settings, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The same bounds as kombu Redis transport options (``broker_transport_options``).

    Kombu passes them to redis-py and, in 5.7, also uses ``health_check_interval`` for its own
    checks of long-lived connections: a BRPOP reply overdue by more than 1 s (the BRPOP
    timeout) + the interval, and a pub/sub connection (Celery's control and events) that
    missed PINGs, are dropped and reconnected.
    """
    return dict(redis_connection_bounds(settings, timeout_s=timeout_s))


def get_redis(url: str, *, settings: Settings | None = None, timeout_s: float | None = None) -> redis.Redis:
    """The shared client of this process for ``url``, with ``settings``' bounds (default: the
    environment's); ``timeout_s`` tightens them (a producer passes its ``client_timeout_s``)."""
    settings = settings or get_settings()
    bounds = redis_connection_bounds(settings, timeout_s=timeout_s)
    key = (os.getpid(), url, tuple(sorted((k, repr(v)) for k, v in bounds.items())))
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(url, max_connections=MAX_CONNECTIONS, decode_responses=False, **bounds)
            _clients[key] = client
        return client


def queue_script(pipe: redis.client.Pipeline, script: redis.commands.core.Script, *, keys: list[Any],
                 args: list[Any] | None = None) -> None:
    """Queue ``script`` (a registered :class:`redis.commands.core.Script`) on ``pipe`` as an EVAL
    of its text. ``script(..., client=pipe)`` makes the pipeline's ``execute()`` first ask
    ``SCRIPT EXISTS`` (redis-py's ``Pipeline.load_scripts``): a round trip more on every
    execute — two per submit call on a producer (budgets, staging). EVAL needs no script loaded
    (Redis keeps it cached under its SHA1) and cannot fail NOSCRIPT after a restart or a flush."""
    pipe.eval(script.script, len(keys), *keys, *(args or []))


class PubSubWatch:
    """Detects a pub/sub connection that stopped answering and drops it, so the next read reconnects.

    Call :meth:`check` after every ``get_message``. redis-py sends a health-check PING when the
    connection has been quiet for its ``health_check_interval`` and counts it in
    ``health_check_response_counter`` until the PONG is read. A live server answers at once;
    a counter that stays above zero for longer than the reply bound (``socket_timeout``)
    means nobody is answering.
    """

    def __init__(self, pubsub: redis.client.PubSub, *, reply_timeout_s: float | None = None) -> None:
        self.pubsub = pubsub
        kwargs = pubsub.connection_pool.connection_kwargs
        self.reply_timeout_s = reply_timeout_s or kwargs.get("socket_timeout") or 10.0
        if not kwargs.get("health_check_interval"):
            raise ValueError("PubSubWatch needs a client with health_check_interval > 0 (it is what sends the PINGs)")
        self._unanswered_since: float | None = None
        #: Connections dropped because they stopped answering.
        self.dropped = 0

    def check(self) -> bool:
        """True while the connection answers; False when it was just dropped as stale."""
        if self.pubsub.health_check_response_counter <= 0:
            self._unanswered_since = None
            return True
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
            return True
        if now - self._unanswered_since <= self.reply_timeout_s:
            return True
        log.warning("Redis pub/sub connection left a PING unanswered for %.0fs; dropping it and subscribing again",
                    now - self._unanswered_since)
        self._unanswered_since = None
        self.pubsub.health_check_response_counter = 0
        self.dropped += 1
        conn = self.pubsub.connection
        if conn is not None:
            conn.disconnect()
        return False
