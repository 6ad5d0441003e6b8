"""The task message: what a producer puts on a tier queue and what a worker reads back.

:class:`RunRequestMessage` is the one type of it: the publisher encodes it
(:meth:`RunRequestMessage.encode`, :mod:`tars_tasks.publish`) and the task decodes it
(:meth:`RunRequestMessage.decode`, :mod:`tars_tasks.tasks`). A TARS producer sends
``tars.run_request`` with keyword arguments only, and only what the worker uses: the request id
(also the task id), the tier to run on and the producer's completion channel. The prompt is
**not** in the message: the worker reads it (and tenant, priority, ...) from the request row (so
Celery events, Flower and its persistent file never see it). Messages of layout 2, which also
carried tenant and priority, are still read (queued before an upgrade); those fields are ignored.

A plain-Celery producer may instead send the request's own fields (``role``, ``prompt``,
``priority``, ``tenant``, ``idempotency_key``, ``tier`` and the model request's ``system``,
``messages``, ``max_tokens``, ``temperature``, ``stop``, ``response_format``, ``metadata``, and
``cache``, ``lane``, ``deadline``; optionally ``request_id``, else the task id is the request id)
for a request that has no row yet: the worker validates them exactly as ``submit`` does, records
the row and runs it (:attr:`RunRequestMessage.spec`); for a request that has a row, the row wins. Anything else —
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
MESSAGE_VERSION = 3
#: Keyword arguments of a TARS producer's message, by layout version.
ROUTING_FIELDS = frozenset({"v", "request_id", "tier", "reply_to"})
_ROUTING_FIELDS_BY_VERSION = {3: ROUTING_FIELDS, 2: ROUTING_FIELDS | {"tenant", "priority"}}
#: Keyword arguments a plain-Celery producer may send to create a request.
SPEC_FIELDS = frozenset({"role", "prompt", "priority", "tenant", "idempotency_key", "tier", "system", "messages",
                         "max_tokens", "temperature", "stop", "response_format", "metadata", "cache",
                         "lane", "deadline"})
_ID_MAX = 36
_EXCERPT = 80


class MalformedMessage(TarsError):
    """A ``tars.run_request`` message that cannot be run; it is dead-lettered with this reason."""


@dataclass(frozen=True, slots=True)
class RunRequestMessage:
    request_id: str
    #: The tier to run on (None: the request's own, for a plain-Celery message without one).
    tier: str | None
    #: The producer's completion channel (None: nobody listens for this request).
    reply_to: str | None = None
    #: The request's fields, when the message came from a plain-Celery producer (no row yet).
    spec: dict[str, Any] | None = None

    def encode(self) -> dict[str, Any]:
        """The keyword arguments a TARS producer publishes (no prompt, no spec)."""
        return {"v": MESSAGE_VERSION, "request_id": self.request_id, "tier": self.tier, "reply_to": self.reply_to}

    def kwargsrepr(self) -> str:
        """What Celery events and Flower show of it: the id and tier, nothing more."""
        return f"{{'request_id': '{self.request_id}', 'tier': '{self.tier}'}}"

    @classmethod
    def decode(cls, *, args: tuple | list, kwargs: dict[str, Any], task_id: str | None,
               delivery_priority: int | None) -> RunRequestMessage:
        """Read a ``tars.run_request`` message or raise :class:`MalformedMessage` saying why."""
        return decode(args=args, kwargs=kwargs, task_id=task_id, delivery_priority=delivery_priority)


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
        fields = _ROUTING_FIELDS_BY_VERSION.get(kwargs["v"]) if isinstance(kwargs["v"], int) else None
        if fields is None:
            raise MalformedMessage(f"unknown message layout v={_excerpt(kwargs['v'])}")
        unknown = set(kwargs) - fields
        if unknown:
            raise MalformedMessage(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = {"request_id", "tier"} - set(kwargs)
        if missing:
            raise MalformedMessage(f"missing field(s) {', '.join(sorted(missing))}")
        tier = kwargs["tier"]
        if tier not in TIERS:
            raise MalformedMessage(f"unknown tier {_excerpt(tier)}")
        reply_to = kwargs.get("reply_to")
        if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > 200):
            raise MalformedMessage(f"reply_to must be a channel name, got {_excerpt(reply_to)}")
        return RunRequestMessage(request_id=_request_id(kwargs["request_id"], field="request_id"), tier=tier,
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
    reply_to = kwargs.get("reply_to")
    return RunRequestMessage(request_id=request_id, tier=tier if tier in TIERS else None,
                             reply_to=reply_to if isinstance(reply_to, str) and len(reply_to) <= 200 else None,
                             spec=spec)
