"""The mock's prompt cache: where cache writes and cache reads come from, as each provider makes them.

* **Anthropic** caches explicitly: a content block with ``cache_control`` (``{"type": "ephemeral"}``,
  optional ``"ttl": "1h"``) is a breakpoint; the prompt up to it (``system`` first, then the
  messages) is cached if it has at least ``min_tokens``. A later request with the same prefix
  reads it (``cache_read_input_tokens``, the lifetime refreshed); the part up to a breakpoint not
  cached yet is written (``cache_creation_input_tokens``, split into 5-minute and 1-hour writes
  by the breakpoint's ``ttl``). ``input_tokens`` is the rest.
* **OpenAI** caches automatically: a prompt of at least ``min_tokens`` (1024) has its prefixes
  cached in steps of 128 tokens; a later prompt sharing a prefix reports the longest cached
  one as ``prompt_tokens_details.cached_tokens`` (part of ``prompt_tokens``). No writes are billed.

Tokens are the mock's estimate (four characters each) of the prompt text as joined by
:attr:`loadgen.mock_llm.wire.Parsed.text`, so prefix and whole agree. Entries expire after their
lifetime; at most ``max_entries`` are kept (oldest dropped first).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

from loadgen.mock_llm.wire import Segment

OPENAI_CACHE_STEP_TOKENS = 128


@dataclass(frozen=True, slots=True)
class CacheUsage:
    input_tokens: int
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens + self.cache_read_tokens


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4)) if chars else 0


class PromptCache:
    def __init__(self, *, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        #: prefix digest -> (expires at, lifetime s)
        self._entries: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _hit(self, digest: bytes, now: float) -> bool:
        entry = self._entries.get(digest)
        if entry is None:
            return False
        if entry[0] <= now:
            del self._entries[digest]
            return False
        self._entries[digest] = (now + entry[1], entry[1])  # a read refreshes the lifetime
        self._entries.move_to_end(digest)
        return True

    def _put(self, digest: bytes, now: float, ttl_s: float) -> None:
        self._entries[digest] = (now + ttl_s, ttl_s)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def anthropic(self, *, model: str, segments: list[Segment], now: float, min_tokens: int,
                  ttl_s: dict[str, float]) -> CacheUsage:
        """Token classes of one Messages request (see the module docstring)."""
        h = hashlib.sha256(model.encode())
        chars = 0
        points: list[tuple[int, bytes, str]] = []  # (prefix tokens, digest, ttl) per breakpoint
        for seg in segments:
            if seg.text:
                if chars:
                    h.update(b"\n")
                    chars += 1
                h.update(seg.text.encode("utf-8", "surrogatepass"))
                chars += len(seg.text)
            if seg.cache_ttl is not None and _tokens(chars) >= min_tokens:
                points.append((_tokens(chars), h.copy().digest(), seg.cache_ttl))
        total = _tokens(chars)
        read = 0
        first_new = 0
        for i in range(len(points) - 1, -1, -1):
            if self._hit(points[i][1], now):
                read, first_new = points[i][0], i + 1
                break
        writes = {"5m": 0, "1h": 0}
        covered = read
        for tokens, digest, ttl in points[first_new:]:
            writes[ttl] += tokens - covered
            covered = tokens
            self._put(digest, now, ttl_s[ttl])
        return CacheUsage(input_tokens=total - covered, cache_write_tokens=writes["5m"],
                          cache_write_1h_tokens=writes["1h"], cache_read_tokens=read)

    def openai(self, *, model: str, text: str, now: float, min_tokens: int, ttl_s: float) -> CacheUsage:
        """Token classes of one Chat Completions request: the longest cached 128-token-step prefix."""
        total = _tokens(len(text))
        if total < min_tokens:
            return CacheUsage(input_tokens=total)
        h = hashlib.sha256(model.encode())
        done = 0
        cached = 0
        digests: list[bytes] = []
        k = min_tokens
        while k * 4 <= len(text):
            h.update(text[done : k * 4].encode("utf-8", "surrogatepass"))
            done = k * 4
            digest = h.copy().digest()
            digests.append(digest)
            if self._hit(digest, now):
                cached = k
            k += OPENAI_CACHE_STEP_TOKENS
        for digest in digests:
            self._put(digest, now, ttl_s)
        return CacheUsage(input_tokens=total - cached, cache_read_tokens=cached)

