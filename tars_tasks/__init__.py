"""TARS fleet: LLM agent work as a Celery worker fleet.

``celery -A tars_tasks worker -Q tars.haiku`` finds :data:`app` here. Importing this package
builds no Celery app and reads no setting: :data:`app` is built when first asked for
(:func:`tars_tasks.celery_app.get_app`), the default client on the first :func:`submit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tars_tasks.errors import (
    BrokerUnavailable,
    BudgetExceeded,
    ConfigurationError,
    DatabaseUnavailable,
    InvalidRequest,
    Overloaded,
    RequestNotFound,
    ResultTimeout,
    TarsError,
)
from tars_tasks.schemas import REQUIRED

if TYPE_CHECKING:
    from celery import Celery

    from tars_tasks.client import RequestHandle, TarsClient

__all__ = [
    "BrokerUnavailable",
    "BudgetExceeded",
    "ConfigurationError",
    "DatabaseUnavailable",
    "InvalidRequest",
    "Overloaded",
    "RequestNotFound",
    "ResultTimeout",
    "TarsClient",
    "TarsError",
    "app",
    "submit",
    "submit_many",
]


def __getattr__(name: str) -> Any:
    if name == "TarsClient":
        from tars_tasks.client import TarsClient

        return TarsClient
    if name == "app":
        from tars_tasks.celery_app import get_app

        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


app: Celery  # resolved by __getattr__ (built on first use)

_default_client: TarsClient | None = None


def _client() -> TarsClient:
    global _default_client
    if _default_client is None:
        from tars_tasks.client import TarsClient

        _default_client = TarsClient()
    return _default_client


def submit(
    *,
    role: str = REQUIRED,
    prompt: str = REQUIRED,
    priority: int | str = "normal",
    tenant: str = "default",
    idempotency_key: str | None = None,
    tier: str | None = None,
    run_id: str | None = None,
    **fields: Any,
) -> RequestHandle:
    """Submit one request with this process's default :class:`TarsClient`; returns its handle.

    Accepts and refuses exactly what :meth:`TarsClient.submit` does (see ``RequestSpec``): the
    model request's fields (``system``, ``messages``, ``max_tokens``, ...) go in ``fields``.
    """
    return _client().submit(role=role, prompt=prompt, priority=priority, tenant=tenant,
                            idempotency_key=idempotency_key, tier=tier, run_id=run_id, **fields)


def submit_many(requests: Iterable[Any], *, run_id: str | None = None) -> list[RequestHandle]:
    """Validate all, then record and queue all, with this process's default client."""
    return _client().submit_many(requests, run_id=run_id)
