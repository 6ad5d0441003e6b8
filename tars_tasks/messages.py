"""The task message: what a producer puts on a tier queue and what a worker reads back.

A TARS producer sends ``tars.run_request`` with keyword arguments only, and only the routing
fields: the request id (also the task id), the tier to run on, tenant, priority and the
producer's completion channel. The prompt is **not** in the message: the worker reads it from
the request row (so Celery events, Flower and its persistent file never see it).

A plain-Celery producer may instead send the request's own fields (``role``, ``prompt``,
``priority``, ``tenant``, ``idempotency_key``, ``tier`` and the model request's ``system``,
``messages``, ``max_tokens``, ``temperature``, ``stop``, ``response_format``, ``metadata``;
optionally ``request_id``, else the task id is the request id) for a request that has no row
yet: the worker validates them exactly as ``submit`` does, records the row and runs it
(:attr:`RunRequestMessage.spec`); for a request that has a row, the row wins. Anything else —
positional arguments, unknown fields, an id that is not a UUID, no row and no fields to make
one — is a :class:`MalformedMessage` (or a dead letter from the worker), recorded with the
reason instead of acked silently.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from config.keys import TIERS, tars_priority
from tars_tasks.errors import TarsError

#: Version of the message layout, carried as ``v``; absent in plain-Celery messages.
MESSAGE_VERSION = 2
#: Keyword arguments of a TARS producer's message.
ROUTING_FIELDS = frozenset({"v", "request_id", "tier", "tenant", "priority", "reply_to"})
#: Keyword arguments a plain-Celery producer may send to create a request.
SPEC_FIELDS = frozenset({"role", "prompt", "priority", "tenant", "idempotency_key", "tier", "system", "messages",
                         "max_tokens", "temperature", "stop", "response_format", "metadata"})
_ID_MAX = 36
_EXCERPT = 80


class MalformedMessage(TarsError):
    """A ``tars.run_request`` message that cannot be run; it is dead-lettered with this reason."""


@dataclass(frozen=True, slots=True)
class RunRequestMessage:
    request_id: str
    #: The tier to run on (None: the request's own, for a plain-Celery message without one).
    tier: str | None
    tenant: str | None
    priority: int
    reply_to: str | None
    #: The request's fields, when the message came from a plain-Celery producer (no row yet).
    spec: dict[str, Any] | None = None

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments a TARS producer publishes (no prompt, no spec)."""
        return {"v": MESSAGE_VERSION, "request_id": self.request_id, "tier": self.tier, "tenant": self.tenant,
                "priority": self.priority, "reply_to": self.reply_to}


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


def _request_id(value: Any, *, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _ID_MAX:
        raise MalformedMessage(f"{field} must be a request id of 1-{_ID_MAX} characters, got {_excerpt(value)}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise MalformedMessage(f"{field} is not a UUID: {_excerpt(value)}") from None


def decode(*, args: tuple | list, kwargs: dict[str, Any], task_id: str | None,
           delivery_priority: int | None) -> RunRequestMessage:
    """Read a ``tars.run_request`` message or raise :class:`MalformedMessage` saying why."""
    if args:
        raise MalformedMessage(f"positional arguments are not accepted ({len(args)} given); send keyword arguments")
    if not isinstance(kwargs, dict):
        raise MalformedMessage(f"keyword arguments must be a mapping, got {type(kwargs).__name__}")
    if "v" in kwargs:
        unknown = set(kwargs) - ROUTING_FIELDS
        if unknown:
            raise MalformedMessage(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = {"request_id", "tier"} - set(kwargs)
        if missing:
            raise MalformedMessage(f"missing field(s) {', '.join(sorted(missing))}")
        tier = kwargs["tier"]
        if tier not in TIERS:
            raise MalformedMessage(f"unknown tier {_excerpt(tier)}")
        priority = kwargs.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
            raise MalformedMessage(f"priority must be an integer 0..9, got {_excerpt(priority)}")
        reply_to = kwargs.get("reply_to")
        if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > 200):
            raise MalformedMessage(f"reply_to must be a channel name, got {_excerpt(reply_to)}")
        tenant = kwargs.get("tenant")
        return RunRequestMessage(request_id=_request_id(kwargs["request_id"], field="request_id"), tier=tier,
                                 tenant=tenant if isinstance(tenant, str) else None, priority=priority,
                                 reply_to=reply_to)
    # A plain-Celery producer: the request's own fields (or only the id of a recorded request).
    unknown = set(kwargs) - SPEC_FIELDS - {"request_id", "reply_to"}
    if unknown:
        raise MalformedMessage(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                               f"send {', '.join(sorted(SPEC_FIELDS))} (and optionally request_id)")
    rid = kwargs.get("request_id", task_id)
    request_id = _request_id(rid, field="request_id" if "request_id" in kwargs else "task id")
    spec = {k: kwargs[k] for k in SPEC_FIELDS if k in kwargs} or None
    if spec is not None and "priority" not in spec:
        spec["priority"] = tars_priority(delivery_priority)
    tier = kwargs.get("tier")
    priority = (spec or {}).get("priority", tars_priority(delivery_priority))
    reply_to = kwargs.get("reply_to")
    return RunRequestMessage(request_id=request_id, tier=tier if tier in TIERS else None,
                             tenant=kwargs.get("tenant") if isinstance(kwargs.get("tenant"), str) else None,
                             priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else 5,
                             reply_to=reply_to if isinstance(reply_to, str) and len(reply_to) <= 200 else None,
                             spec=spec)
