"""Is a request's message somewhere in the broker? (a tier's lists, or a worker's ``unacked``)

Used where a request row is ``queued`` with no attempt and something must decide whether its
message is still on its way or was never sent (a worker killed between committing a job's next
steps and publishing them). The lists are read in chunks from the client side, so a long
backlog costs round trips, never a blocked Redis; callers use it on rare repair paths only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from config.keys import PRIORITY_MAX, PRIORITY_MIN, UNACKED_KEY, priority_list, queue_for_tier

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


def ids_in_broker(client, *, ids: Iterable[str], tiers: Iterable[str]) -> set[str]:
    """The subset of ``ids`` whose message is in one of ``tiers``' lists or held unacked.

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

    # lists first, then unacked: a message a worker takes meanwhile moves from a list into
    # unacked, so it is seen in one of the two
    for key in tier_lists(tiers):
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
