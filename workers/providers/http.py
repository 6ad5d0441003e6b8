"""What the real HTTP providers share: a keep-alive connection pool per process, status → error
mapping, ``Retry-After`` parsing, API keys from the environment and their redaction.

Under the gevent worker pool httpx's sync client is cooperative (sockets are monkeypatched),
so one keep-alive pool (:class:`ClientPool`) serves every greenlet of a worker process.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import certifi
import httpx

from config.catalog import ModelSpec
from tars_tasks.errors import (
    AuthenticationFailed,
    ContextTooLong,
    PermanentProviderError,
    ProviderConnectionError,
    ProviderError,
    ProviderNotConfigured,
    ProviderOverloaded,
    ProviderTimeout,
    RateLimited,
    TransientProviderError,
)
from workers.providers.request import estimate_tokens  # noqa: F401 - re-exported (dispatch, caller)

#: Connections one worker process keeps to one API host (a gevent worker runs hundreds of calls).
POOL_MAX_CONNECTIONS = 1000
POOL_MAX_KEEPALIVE = 500
POOL_KEEPALIVE_EXPIRY_S = 30.0
#: An error body longer than this is cut before it is kept.
ERROR_BODY_MAX_CHARS = 500
#: Token-like strings (sk-..., sk-ant-...) are redacted from anything kept, even masked ones.
_SECRET_RE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")

#: httpx logs every request at INFO; at hundreds of calls a second that buries a worker's log.
#: (It logs the URL and status only — never headers, so never the key.)
logging.getLogger("httpx").setLevel(logging.WARNING)

_pools: dict[tuple[int, str], ClientPool] = {}
_pools_lock = threading.Lock()


class ClientPool:
    """Keep-alive connections to one API root for one process: one single-connection
    ``httpx.Client`` per call in flight, reused by the next call.

    Repairs a measured cost of httpx's own pool under gevent: with hundreds of calls in flight,
    httpcore re-scans every pooled connection (a ``poll`` syscall each) on every request —
    about 9 ms of CPU per call at 50 concurrent calls and worse beyond, which capped a worker
    at ~70 calls/s. Checking out a client of its own keeps each call O(1) (~1.8 ms of CPU).
    """

    def __init__(self, *, base_url: str, max_connections: int = POOL_MAX_CONNECTIONS) -> None:
        self.base_url = base_url
        self._free: deque[httpx.Client] = deque()
        self._slots = threading.BoundedSemaphore(max_connections)
        #: One TLS context for all the pool's clients: httpx builds a new one per client
        #: otherwise (~30 ms of CPU each, measured), which stalls a worker ramping to 500 calls.
        self._tls = ssl.create_default_context(cafile=certifi.where())  # httpx's own default CA bundle
        self.created = 0

    def _new(self) -> httpx.Client:
        self.created += 1
        return httpx.Client(
            base_url=self.base_url,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=POOL_KEEPALIVE_EXPIRY_S),
            verify=self._tls,
            follow_redirects=False,
        )

    @contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """A client (and its kept-alive connection) for one call; at most ``max_connections`` at once."""
        with self._slots:
            try:
                c = self._free.pop()
            except IndexError:
                c = self._new()
            try:
                yield c
            finally:
                if len(self._free) < POOL_MAX_KEEPALIVE:
                    self._free.append(c)
                else:
                    c.close()

    def close(self) -> None:
        while self._free:
            self._free.pop().close()


def shared_pool(base_url: str) -> ClientPool:
    """The process's connection pool for one API root (made anew after a fork)."""
    key = (os.getpid(), base_url)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ClientPool(base_url=base_url)
        return pool


def timeout_for(spec: ModelSpec) -> httpx.Timeout:
    """The tier's whole-call timeout, with a shorter connect timeout."""
    return httpx.Timeout(spec.timeout_s, connect=min(spec.connect_timeout_s, spec.timeout_s))


def api_key(*, env_var: str) -> str:
    """Read the key at call time. It goes into a request header and nowhere else."""
    key = os.environ.get(env_var, "")
    if not key:
        raise ProviderNotConfigured(f"environment variable {env_var} (the API key) is not set")
    return key


def redact(text: str, *, secret: str | None) -> str:
    """Remove the key (and anything key-shaped, such as a provider echoing a masked key)."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _SECRET_RE.sub("[redacted]", text)


def retry_after_s(headers: httpx.Headers) -> float | None:
    """``retry-after-ms`` (OpenAI), then ``retry-after`` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(*, status: int, message: str, kind: str, headers: httpx.Headers, model: str,
                     context_markers: tuple[str, ...]) -> ProviderError:
    """Map an HTTP error status to the error hierarchy (``message`` already redacted)."""
    text = f"{model}: HTTP {status} {kind}: {message}".strip()
    wait = retry_after_s(headers)
    if status == 429:
        return RateLimited(text, status_code=status, retry_after_s=wait)
    if status == 529:
        return ProviderOverloaded(text, status_code=status, retry_after_s=wait)
    if status >= 500 or status in (408, 409):
        return TransientProviderError(text, status_code=status, retry_after_s=wait)
    if status == 401:
        return AuthenticationFailed(text, status_code=status)
    lowered = f"{kind} {message}".lower()
    if status in (400, 413) and any(m in lowered for m in context_markers):
        return ContextTooLong(text, status_code=status)
    return PermanentProviderError(text, status_code=status)


def post_json(*, client: httpx.Client | ClientPool, path: str, headers: dict[str, str], body: dict, spec: ModelSpec,
              secret: str) -> httpx.Response:
    """POST and map transport failures; the caller maps HTTP statuses."""
    if isinstance(client, ClientPool):
        with client.client() as c:
            return post_json(client=c, path=path, headers=headers, body=body, spec=spec, secret=secret)
    try:
        return client.post(path, json=body, headers=headers, timeout=timeout_for(spec))
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(f"{spec.model}: {type(exc).__name__} after at most {spec.timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise ProviderConnectionError(f"{spec.model}: {type(exc).__name__}: {redact(str(exc), secret=secret)}"
                                      ) from None


def parse_json(response: httpx.Response, *, spec: ModelSpec) -> dict:
    try:
        data = response.json()
    except ValueError:
        raise TransientProviderError(f"{spec.model}: HTTP {response.status_code} with a body that is not JSON",
                                     status_code=response.status_code) from None
    if not isinstance(data, dict):
        raise TransientProviderError(f"{spec.model}: unexpected JSON body", status_code=response.status_code)
    return data


class HttpProvider:
    """What the HTTP providers share: where to send, which key to read, which client to use.
    Subclasses set ``name``, ``default_base_url`` and ``default_api_key_env`` and implement
    ``complete``."""

    name: str
    default_base_url: str
    default_api_key_env: str

    def __init__(self, *, base_url: str | None = None, api_key_env: str | None = None,
                 client: httpx.Client | None = None) -> None:
        self.base_url = base_url
        self.api_key_env = api_key_env
        self._client = client

    def _client_for(self, spec: ModelSpec) -> httpx.Client | ClientPool:
        return self._client or shared_pool(spec.base_url or self.base_url or self.default_base_url)

    def _secret(self, spec: ModelSpec) -> str:
        return api_key(env_var=spec.api_key_env or self.api_key_env or self.default_api_key_env)
