"""Bundles: several requests of one tier and priority in one broker message (issue 13).

A TARS producer with ``bundle_max`` > 1 sends ``tars.run_bundle`` for every run of 2 ..
``bundle_max`` requests of a ``submit_many`` call that share a (tier, priority) — with dispatch on,
a (tier, priority, tenant), since staging keeps a list per tenant; a lone request still goes as
``tars.run_request``. The bundle
carries ids only (no prompt), like a single message, and goes to its tier's priority list like one.

Per-request acknowledgement semantics are kept by the rows, not by the message: the worker runs
every member as if it had come alone (``workers.agent.SubAgent.handle``: row read, terminal →
re-announce only, budgets, cache, breaker, limiter, fleet mode, its own durable finish and
completion notice) and the bundle is acked once every member's rows are durable. A crash before
the ack redelivers the whole bundle; members whose rows are terminal are not run again, the rest
are (docs/DELIVERY.md, "Bundles").

Staged (``docs/DISPATCH.md``): a bundle is one staging entry carrying each member's token estimate
(:class:`tars_tasks.staging.StagedMessage`); the dispatch script moves it whole when its first
member's slot is due and reserves every member the slot k single moves would have got, one after
the other (recorded under the bundle's id); the worker sends each member's first attempt at its
own slot. The staged count, the dispatcher's free slots and the deficit round robin count members.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from config.keys import TIERS
from tars_tasks.messages import MalformedMessage, RunRequestMessage, _request_id

#: The layout of a bundle's keyword arguments, carried as ``v``.
BUNDLE_VERSION = 1
#: The most members a worker accepts in one bundle (``bundle_max``'s own upper bound).
BUNDLE_MAX_MEMBERS = 64
_FIELDS = frozenset({"v", "tier", "reply_to", "request_ids"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BundleMessage:
    """One ``tars.run_bundle`` message: request ids of one tier (and priority, the broker's)."""

    request_ids: tuple[str, ...]
    tier: str
    reply_to: str | None = None

    def encode(self) -> dict[str, Any]:
        return {"v": BUNDLE_VERSION, "tier": self.tier, "reply_to": self.reply_to,
                "request_ids": list(self.request_ids)}

    def kwargsrepr(self) -> str:
        """What Celery events and Flower show of it — and, in plain text in the message's headers,
        what the lost-request reconciler's presence search finds its members by (the kwargs are
        base64 inside the body): ``tars_tasks.broker.presence``."""
        ids = ", ".join(f"'{rid}'" for rid in self.request_ids)
        return f"{{'tier': '{self.tier}', 'request_ids': [{ids}]}}"

    def members(self) -> list[RunRequestMessage]:
        """Each member as the single message it stands for."""
        return [RunRequestMessage(request_id=rid, tier=self.tier, reply_to=self.reply_to) for rid in self.request_ids]

    @classmethod
    def decode(cls, *, args: tuple | list, kwargs: Any) -> BundleMessage:
        """Read a ``tars.run_bundle`` message or raise :class:`MalformedMessage` saying why."""
        if args:
            raise MalformedMessage(f"positional arguments are not accepted ({len(args)} given)")
        if not isinstance(kwargs, dict) or kwargs.get("v") != BUNDLE_VERSION:
            raise MalformedMessage(f"not a bundle of layout v={BUNDLE_VERSION}")
        unknown = set(kwargs) - _FIELDS
        if unknown:
            raise MalformedMessage(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        tier = kwargs.get("tier")
        if tier not in TIERS:
            raise MalformedMessage(f"unknown tier {tier!r}"[:120])
        ids = kwargs.get("request_ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= BUNDLE_MAX_MEMBERS:
            raise MalformedMessage(f"request_ids must be a list of 1-{BUNDLE_MAX_MEMBERS} request ids")
        reply_to = kwargs.get("reply_to")
        if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > 200):
            raise MalformedMessage("reply_to must be a channel name")
        rids = tuple(dict.fromkeys(_request_id(i, field="request_ids[]") for i in ids))  # a duplicate runs once
        return cls(request_ids=rids, tier=tier, reply_to=reply_to)


def bundle_id() -> str:
    """A bundle's task id (it names the message, not a request)."""
    return str(uuid.uuid4())


def group(items: Iterable[T], *, key: Callable[[T], Hashable], size: int) -> list[list[T]]:
    """``items`` in runs of at most ``size`` sharing ``key``, in the order of each key's first
    item (and each run in submission order). ``size`` < 2: every item alone."""
    if size < 2:
        return [[i] for i in items]
    by_key: dict[Hashable, list[T]] = {}
    for i in items:
        by_key.setdefault(key(i), []).append(i)
    return [members[j : j + size] for members in by_key.values() for j in range(0, len(members), size)]

