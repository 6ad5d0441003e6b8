"""Publishing one request's task message: the only place that knows how it goes on the wire.

Two ways on: :func:`publish_request` sends it to its tier's Celery queue; :func:`stage_requests`
renders the same messages (byte for byte, plus the :data:`~tars_tasks.staging.STAGED_HEADER`)
and puts them in staging, from where a worker's dispatcher moves them into the Celery queue when
the fleet-wide limits let their calls go out (``docs/DISPATCH.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from config.keys import TASK_RUN_BUNDLE, TASK_RUN_REQUEST, kombu_priority, queue_for_tier
from tars_tasks.bundles import BundleMessage, bundle_id, group
from tars_tasks.messages import RunRequestMessage
from tars_tasks.render import capture_lpush
from tars_tasks.staging import STAGED_HEADER, StagedMessage, Staging


def publish_request(
    celery_app: Celery,
    *,
    producer,
    request_id: str,
    tier: str,
    tenant: str,
    priority: int,
    reply_to: str | None,
    staged_tokens: int | None = None,
) -> None:
    """Send ``tars.run_request`` for a recorded request; the task id is the request id.

    The message carries only what the worker uses (see :mod:`tars_tasks.messages`); the prompt,
    tenant and priority stay in Postgres (``priority`` still sets the broker priority).
    ``argsrepr``/``kwargsrepr`` are set so that events show the id, nothing more.
    ``staged_tokens``: the message is rendered for staging; the header says what its first
    attempt's slot reserves at dispatch.
    """
    _send(celery_app, TASK_RUN_REQUEST, RunRequestMessage(request_id=request_id, tier=tier, reply_to=reply_to),
          task_id=request_id, tier=tier, priority=priority, producer=producer,
          headers=None if staged_tokens is None else {STAGED_HEADER: staged_tokens})


def publish_bundle(celery_app: Celery, *, producer, request_ids: Sequence[str], tier: str, priority: int,
                   reply_to: str | None, staged_tokens: Sequence[int] | None = None) -> str:
    """Send ``tars.run_bundle`` for recorded requests of one tier and TARS ``priority`` (its
    broker priority, as a single request's): ids only, a task id of its own. Returns that id.
    ``staged_tokens``: rendered for staging; the header says what each member's first attempt
    reserves at dispatch (in the members' order)."""
    task_id = bundle_id()
    _send(celery_app, TASK_RUN_BUNDLE, BundleMessage(request_ids=tuple(request_ids), tier=tier, reply_to=reply_to),
          task_id=task_id, tier=tier, priority=priority, producer=producer,
          headers=None if staged_tokens is None else {STAGED_HEADER: list(staged_tokens)})
    return task_id


def _send(celery_app: Celery, task: str, message: Any, *, task_id: str, tier: str, priority: int, producer,
          headers: dict[str, Any] | None = None) -> None:
    """One message to the tier's queue at the broker priority of TARS ``priority``."""
    queue = queue_for_tier(tier)
    celery_app.send_task(task, kwargs=message.encode(), task_id=task_id, queue=queue, routing_key=queue,
                         priority=kombu_priority(priority), producer=producer, argsrepr="()",
                         kwargsrepr=message.kwargsrepr(), headers=headers)


@dataclass(frozen=True, slots=True)
class ToStage:
    """One recorded request to stage, and the tokens its first attempt reserves
    (:func:`tars_tasks.staging.staged_tokens`)."""

    request_id: str
    tier: str
    tenant: str
    priority: int
    tokens: int
    reply_to: str | None = None
    #: False: staged alone, never in a bundle (a tenant with a rate limit of its own: the
    #: dispatcher then paces each of its requests, instead of moving a bundle whose members beyond
    #: the tenant's limit would wait in worker slots, holding back other tenants).
    bundle: bool = True


def stage_requests(celery_app: Celery, *, redis_client: redis.Redis, namespace: str,
                   requests: Sequence[ToStage], staging: Staging | None = None, bundle_max: int = 0) -> None:
    """Stage recorded requests' messages instead of publishing them: one Redis pipeline (the
    stage scripts and, with task events on, Celery's task-sent events). ``redis_client`` must be
    the **broker's** Redis. Raises what the broker raised: the caller decides what a failed
    staging means for its requests (the coordinator: "enqueue failed", as for a failed publish).

    ``bundle_max`` > 1: every run of 2 .. ``bundle_max`` requests sharing (tier, priority, tenant)
    is staged as one ``tars.run_bundle`` entry (``tars_tasks.bundles``); dispatch moves it whole and
    reserves each member a slot of its own; a request with ``bundle`` False always goes alone."""
    if not requests:
        return
    runs = group(requests, key=lambda r: (r.tier, r.priority, r.tenant, r.reply_to) if r.bundle else r.request_id,
                 size=bundle_max)
    ids: list[str] = []
    with celery_app.producer_or_acquire() as producer, capture_lpush(producer) as rendered:
        for run in runs:
            r = run[0]
            if len(run) == 1:
                publish_request(celery_app, producer=producer, request_id=r.request_id, tier=r.tier, tenant=r.tenant,
                                priority=r.priority, reply_to=r.reply_to, staged_tokens=r.tokens)
                ids.append(r.request_id)
            else:
                ids.append(publish_bundle(celery_app, producer=producer, request_ids=[m.request_id for m in run],
                                          tier=r.tier, priority=r.priority, reply_to=r.reply_to,
                                          staged_tokens=[m.tokens for m in run]))
    messages = [StagedMessage(id=mid, tier=run[0].tier, priority=run[0].priority, tenant=run[0].tenant,
                              tokens=sum(m.tokens for m in run), body=rendered_message.payload,
                              member_tokens=tuple(m.tokens for m in run) if len(run) > 1 else ())
                for run, mid, rendered_message in zip(runs, ids, rendered.messages, strict=True)]
    pipe = redis_client.pipeline(transaction=False)
    (staging or Staging(redis_client=redis_client, namespace=namespace)).stage(messages, pipeline=pipe)
    rendered.send_other(pipe)
    pipe.execute()
