"""One redis-py client per (process, URL), sized for hundreds of greenlets."""

from __future__ import annotations

import os
import threading

import redis

#: redis-py 8 caps a pool at 100 connections; a gevent worker runs hundreds of tasks.
MAX_CONNECTIONS = 2000

_lock = threading.Lock()
_clients: dict[tuple[int, str], redis.Redis] = {}


def get_redis(url: str) -> redis.Redis:
    key = (os.getpid(), url)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                socket_connect_timeout=5,
                socket_timeout=30,
                health_check_interval=30,
                decode_responses=False,
            )
            _clients[key] = client
        return client
