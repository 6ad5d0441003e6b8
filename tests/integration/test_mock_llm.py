"""The mock LLM server itself: it holds thousands of concurrent connections, counts what it
received per model and second, draws latency per model, and resets."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.model_calls_support import mock_llm  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

CONNECTIONS = 2000


async def _flood(url: str, n: int) -> list[int]:
    import aiohttp

    body = {"model": "flood", "max_tokens": 5, "messages": [{"role": "user", "content": "hold on"}]}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one() -> int:
            async with s.post(url + "/v1/messages", json=body, headers={"x-api-key": "k"}) as r:
                await r.read()
                return r.status
        return await asyncio.gather(*(one() for _ in range(n)))


def test_the_mock_holds_thousands_of_concurrent_connections(mock_llm):  # noqa: F811
    mock = mock_llm("--latency", "fixed:1500")
    statuses = asyncio.run(_flood(mock.url, CONNECTIONS))
    assert statuses.count(200) == CONNECTIONS
    stats = mock.stats()
    assert stats["max_in_flight"] >= 0.9 * CONNECTIONS  # they were all open at once
    assert stats["models"]["flood"]["total"]["requests"] == CONNECTIONS


def test_latency_is_drawn_per_model_and_counters_reset(mock_llm):  # noqa: F811
    import time
    import urllib.request

    mock = mock_llm("--latency", "fixed:5", "--model-latency", "slow=fixed:300")

    def call(model: str) -> float:
        req = urllib.request.Request(mock.url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}
                                                     ).encode(), headers={"authorization": "Bearer k"})
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=10) as r:
            json.loads(r.read())
        return time.monotonic() - t0

    fast, slow = call("fast"), call("slow")
    assert slow > 0.29 and slow > fast  # same run, same machine: a ratio, not a performance figure
    assert mock.total("fast") == 1 and mock.total("slow") == 1
    assert mock.total("slow", "output_tokens") > 0
    mock.reset()
    assert mock.stats()["models"] == {}
