"""One redis-py client per (process, URL, timeout), sized for hundreds of greenlets."""

from __future__ import annotations

import os
import threading

import redis

#: redis-py 8 caps a pool at 100 connections; a gevent worker runs hundreds of tasks.
MAX_CONNECTIONS = 2000
#: Read/write timeout of a client made without one (a worker's fleet-state client).
DEFAULT_SOCKET_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0

_lock = threading.Lock()
_clients: dict[tuple[int, str, float | None], redis.Redis] = {}


def get_redis(url: str, *, timeout_s: float | None = None) -> redis.Redis:
    """The process's client for ``url``. ``timeout_s`` bounds connect, each read and each write
    (a producer passes its ``client_timeout_s``, so a hung Redis is an error, not a wait)."""
    key = (os.getpid(), url, timeout_s)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                socket_connect_timeout=timeout_s or DEFAULT_CONNECT_TIMEOUT_S,
                socket_timeout=timeout_s or DEFAULT_SOCKET_TIMEOUT_S,
                socket_keepalive=True,
                health_check_interval=30,
                decode_responses=False,
            )
            _clients[key] = client
        return client
