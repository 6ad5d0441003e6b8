"""Is a request's message somewhere in the broker? (staged for dispatch, in a tier's lists, or in
a worker's ``unacked``)

Used where a request row is ``queued`` with no attempt and something must decide whether its
message is still on its way or was never sent (a worker killed between committing a job's next
steps and publishing them). The lists are read in chunks from the client side, so a long
backlog costs round trips, never a blocked Redis; callers use it on rare repair paths only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from config.keys import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    UNACKED_KEY,
    priority_list,
    queue_for_tier,
    stage_parked_key,
    stage_queue_key,
    stage_ring_key,
)

#: Messages read per LRANGE.
CHUNK = 1000


def tier_lists(tiers: Iterable[str]) -> list[str]:
    """The broker lists of ``tiers``, every priority (kombu's names, deduplicated)."""
    out: list[str] = []
    for tier in tiers:
        for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1):
            key = priority_list(queue_for_tier(tier), p)
            if key not in out:
                out.append(key)
    return out


#: A request id as it appears in a message (the task id in kombu's headers; in ``unacked`` the
#: message is JSON inside JSON, so its quotes are escaped: the id's own characters are not).
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def staging_lists(client, *, namespace: str, tiers: Iterable[str]) -> list[str]:
    """The staging lists of ``tiers`` that hold entries now: one per (priority, tenant) with work,
    found from the priorities' round-robin rings and the parked set (docs/DISPATCH.md, "Keys")."""
    out: list[str] = []
    for tier in tiers:
        pipe = client.pipeline(transaction=False)
        prios = list(range(PRIORITY_MAX, PRIORITY_MIN - 1, -1))
        for p in prios:
            pipe.lrange(stage_ring_key(namespace, tier, p), 0, -1)
        pipe.zrange(stage_parked_key(namespace, tier), 0, -1)
        *rings, parked = pipe.execute()
        pairs = [(p, t.decode()) for p, ring in zip(prios, rings, strict=True) for t in ring]
        for member in parked:
            p, _, t = member.decode().partition(":")
            pairs.append((int(p), t))
        for p, t in pairs:
            key = stage_queue_key(namespace, tier, p, t)
            if key not in out:
                out.append(key)
    return out


def ids_in_broker(client, *, ids: Iterable[str], tiers: Iterable[str], namespace: str | None = None) -> set[str]:
    """The subset of ``ids`` whose message is staged (with ``namespace``), in one of ``tiers``'
    lists or held unacked.

    A message carries its request id as its task id; every uuid-shaped token of a message is
    read once (one regex pass, C speed) and looked up in a set, so a search costs the bytes
    read, not ids x messages."""
    wanted = {i.encode(): i for i in ids}
    found: set[str] = set()
    if not wanted:
        return found

    def scan(blobs) -> None:
        for blob in blobs:
            for token in _UUID.findall(blob):
                rid = wanted.pop(token, None)
                if rid is not None:
                    found.add(rid)

    # staging first, then the lists, then unacked: the way a message moves (a dispatcher moves it
    # from staging into a list, a worker from a list into unacked), so one moving meanwhile is
    # seen in one of them
    tiers = list(tiers)
    keys = staging_lists(client, namespace=namespace, tiers=tiers) if namespace is not None else []
    for key in [*keys, *tier_lists(tiers)]:
        start = 0
        while wanted:
            chunk = client.lrange(key, start, start + CHUNK - 1)
            scan(chunk)
            if len(chunk) < CHUNK:
                break
            start += CHUNK
    if wanted:
        scan(client.hvals(UNACKED_KEY))
    return found
