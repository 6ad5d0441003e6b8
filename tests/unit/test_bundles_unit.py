"""Bundles' pure parts: how a submit_many is cut into runs, and what a worker accepts as a bundle."""

from __future__ import annotations

import uuid

import pytest

from tars_tasks.bundles import BUNDLE_MAX_MEMBERS, BundleMessage, group
from tars_tasks.messages import MalformedMessage


def test_runs_share_their_key_keep_submission_order_and_are_bounded():
    items = [("haiku", 0, i) for i in range(5)] + [("sonnet", 9, 5), ("haiku", 9, 6), ("haiku", 0, 7)]
    runs = group(items, key=lambda x: x[:2], size=3)
    assert [[x[2] for x in r] for r in runs] == [[0, 1, 2], [3, 4, 7], [5], [6]]


def test_a_size_below_two_is_one_message_per_request():
    assert group([1, 2, 3], key=lambda x: 0, size=0) == [[1], [2], [3]]
    assert group([1, 2, 3], key=lambda x: 0, size=1) == [[1], [2], [3]]


def test_a_bundle_round_trips_and_its_members_are_single_messages():
    ids = tuple(str(uuid.uuid4()) for _ in range(3))
    b = BundleMessage(request_ids=ids, tier="sonnet", reply_to="ch")
    back = BundleMessage.decode(args=(), kwargs=b.encode())
    assert back == b
    assert [(m.request_id, m.tier, m.reply_to) for m in back.members()] == [(i, "sonnet", "ch") for i in ids]
    # the members' ids in plain text (Flower shows them; the reconciler's presence search finds them)
    assert "sonnet" in b.kwargsrepr() and all(i in b.kwargsrepr() for i in ids)


@pytest.mark.parametrize("kwargs", [
    {"v": 2, "tier": "haiku", "request_ids": [str(uuid.uuid4())]},
    {"v": 1, "tier": "gpt", "request_ids": [str(uuid.uuid4())]},
    {"v": 1, "tier": "haiku", "request_ids": []},
    {"v": 1, "tier": "haiku", "request_ids": ["not-a-uuid"]},
    {"v": 1, "tier": "haiku", "request_ids": [str(uuid.uuid4()) for _ in range(BUNDLE_MAX_MEMBERS + 1)]},
    {"v": 1, "tier": "haiku", "request_ids": [str(uuid.uuid4())], "prompt": "x"},
])
def test_a_malformed_bundle_is_refused_with_a_reason(kwargs):
    with pytest.raises(MalformedMessage):
        BundleMessage.decode(args=(), kwargs=kwargs)


def test_a_duplicated_member_runs_once():
    rid = str(uuid.uuid4())
    assert BundleMessage.decode(args=(), kwargs={"v": 1, "tier": "haiku", "request_ids": [rid, rid]}).request_ids \
        == (rid,)


# --- members run at once: threads, or greenlets under gevent ------------------------------------

_CONCURRENT_PROBE = r"""
import sys, threading
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
    import gevent
from workers.agent import _run_concurrently, _greenlets

n = 8
barrier = threading.Barrier(n, timeout=10)  # every member must be running before any may return
seen, caller = [], threading.get_ident()
def member(i):
    barrier.wait()
    seen.append((i, threading.get_ident() == caller))
_run_concurrently(member, n)
assert sorted(i for i, _ in seen) == list(range(n)), seen
assert dict(seen)[0], "member 0 runs in the caller"
print("greenlets" if _greenlets() else "threads", len(seen))
"""


@pytest.mark.parametrize("mode", ["threads", "gevent"])
def test_bundle_members_run_at_once_and_all_finish_before_the_bundle_returns(mode: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CONCURRENT_PROBE, mode], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["greenlets" if mode == "gevent" else "threads", "8"]
