"""A local mock LLM provider: Anthropic Messages and OpenAI Chat Completions over HTTP (aiohttp).

It stands in for the real APIs in tests and benchmarks and, above all, *counts what it
received* — requests and tokens per model per second — so a test measures what a provider
would see rather than what the fleet believes it sent.

Behaviour (all settable at start and at run time with ``POST /_mock/config``):

* latency per model from a distribution (``fixed:MS``, ``uniform:LOW:HIGH``);
* injected faults: 5xx (``error_rate``), overloaded (``overload_rate``: Anthropic 529,
  OpenAI 503), hangs longer than any client timeout (``timeout_rate``), a forced status per
  model (``force_status``) and per prompt (``[[mock:status=400]]``, ``[[mock:context_too_long]]``);
* its own RPM/TPM limits per model over a sliding ``window_s``, answered with 429 (or 529,
  ``limit_status``) and ``Retry-After`` / ``retry-after-ms``;
* optional API key check (``expected_key``): a wrong key gets 401, with OpenAI's habit of
  echoing a masked key, so redaction is tested against the real thing;
* each API's request shape checked as the real API checks it (:mod:`loadgen.mock_llm.wire`:
  unknown fields, ``max_tokens`` required by Anthropic, no ``system`` role in its messages,
  OpenAI's JSON mode needing the word "JSON", ...), so a client sending the wrong shape fails here;
* the request honoured: ``system`` (a string or text blocks) counted as input, ``max_tokens`` /
  ``max_completion_tokens`` capping the answer (stop reason ``max_tokens`` / ``length``), stop
  sequences ending it, JSON mode answering one JSON object;
* a prompt cache (:mod:`loadgen.mock_llm.cache`): Anthropic ``cache_control`` breakpoints write
  and read the cache, OpenAI prefixes of 1024+ tokens are cached automatically, so usage comes
  back by token class (input, cache writes 5-minute/1-hour, cache reads, output) and the
  counters keep each class apart (``input_tokens`` is the input not cached);
* streaming (``stream: true``): server-sent events in each API's own format
  (:mod:`loadgen.mock_llm.answers`), usage included, so the official SDKs' streaming helpers work.

Endpoints: ``POST /v1/messages``, ``POST /v1/chat/completions``, both providers' batch APIs
(:mod:`loadgen.mock_llm.batches`: Anthropic Message Batches, OpenAI Files + Batch), ``GET /_mock/stats``,
``GET /_mock/requests`` (the last bodies received, newest last: what a client really sent),
``POST /_mock/reset``, ``POST /_mock/config``, ``GET /_mock/health``.
One event loop holds thousands of concurrent connections (the file-descriptor limit is raised
to its hard maximum at start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from config.catalog import LatencyProfile
from loadgen.mock_llm.answers import (
    Answer,
    anthropic_events,
    anthropic_message,
    make_answer,
    openai_chunks,
    openai_completion,
    sse,
)
from loadgen.mock_llm.cache import CacheUsage, PromptCache
from loadgen.mock_llm.wire import WireError, parse_anthropic, parse_openai

PROTOCOL_ANTHROPIC = "anthropic"
PROTOCOL_OPENAI = "openai"
DEFAULT_CONTEXT_TOKENS = 200_000
_DIRECTIVE_RE = re.compile(r"\[\[mock:([a-z_]+)(?:=([^\]]*))?\]\]")
#: Counter keys of the token classes (``GET /_mock/stats``).
#: Request bodies kept for ``GET /_mock/requests``.
BODIES_KEPT = 200
#: A body larger than this is listed by its size only (200 such bodies would be gigabytes).
BODY_KEPT_MAX_BYTES = 256 * 1024
TOKEN_COUNTERS = ("input_tokens", "cache_write_tokens", "cache_write_1h_tokens", "cache_read_tokens",
                  "output_tokens")


@dataclass
class MockConfig:
    #: Default latency ("fixed:MS" / "uniform:LOW_MS:HIGH_MS" / "lognormal:MEDIAN_MS:SIGMA") and
    #: per-model overrides.
    latency: str = "uniform:20:60"
    model_latency: dict[str, str] = field(default_factory=dict)
    error_rate: float = 0.0
    overload_rate: float = 0.0
    timeout_rate: float = 0.0
    #: How long a "timeout" request hangs before it is answered 504.
    hang_s: float = 30.0
    #: Faults apply only to these models (empty: every model).
    fault_models: list[str] = field(default_factory=list)
    #: model -> HTTP status every request for it gets.
    force_status: dict[str, int] = field(default_factory=dict)
    #: The mock's own limits, per model (0 = unlimited), over a sliding window of window_s.
    rpm: int = 0
    tpm: int = 0
    window_s: float = 60.0
    #: Retry-After sent with a 429; None = the time until the window frees a slot.
    retry_after_s: float | None = None
    #: Status for "over the limit": 429, or 529 (Anthropic "overloaded") .
    limit_status: int = 429
    output_tokens: tuple[int, int] = (20, 60)
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    #: If set, requests must carry exactly this key (x-api-key / Bearer), else 401.
    expected_key: str | None = None
    seed: int | None = None
    #: The prompt cache (see :mod:`loadgen.mock_llm.cache`): on/off, the shortest prefix cached
    #: (tokens), and the lifetimes of a default (5-minute) and a 1-hour entry, in seconds.
    prompt_cache: bool = True
    cache_min_tokens: int = 1024
    cache_ttl_s: float = 300.0
    cache_ttl_1h_s: float = 3600.0
    #: The batch APIs (:mod:`loadgen.mock_llm.batches`): seconds from a batch's creation until it has
    #: ended (every request answered at that moment), and the share of its requests that expire.
    batch_delay_s: float = 2.0
    batch_expire_rate: float = 0.0

    def update(self, data: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown mock config field(s): {', '.join(sorted(unknown))}")
        for k, v in data.items():
            if k == "output_tokens":
                v = (int(v[0]), int(v[1]))
            setattr(self, k, v)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected_key"] = "(set)" if self.expected_key else None  # never echo a key
        return d


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _sample_ms(spec: str, rng: random.Random) -> float:
    """``fixed:MS``, ``uniform:LOW_MS:HIGH_MS`` or ``lognormal:MEDIAN_MS:SIGMA``."""
    if spec.startswith("lognormal:"):
        median_ms, sigma = (float(x) for x in spec.split(":")[1:3])
        return rng.lognormvariate(math.log(max(median_ms, 1e-9)), sigma)
    profile = LatencyProfile.parse(spec)
    if profile.distribution == "fixed":
        return profile.low_ms
    return rng.uniform(profile.low_ms, profile.high_ms)


class _Window:
    """Sliding log of (arrival time, tokens) for the mock's own RPM/TPM limit of one model."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def admit(self, *, now: float, tokens: int, rpm: int, tpm: int, window_s: float) -> float | None:
        """Record the request and return None, or return seconds until it would fit."""
        while self.events and self.events[0][0] <= now - window_s:
            self.tokens -= self.events.popleft()[1]
        over_r = rpm and len(self.events) + 1 > rpm
        over_t = tpm and self.tokens + tokens > tpm and self.events
        if over_r or over_t:
            return max(0.001, self.events[0][0] + window_s - now)
        self.events.append((now, tokens))
        self.tokens += tokens
        return None


class Stats:
    """Counters per model per wall-clock second (what a provider's dashboard would show)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.per_second: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))
        #: requests per end user (``metadata.user_id`` / ``user``) per model per second
        self.per_user: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_at = time.time()

    def count(self, *, model: str, key: str, n: int = 1, at: float | None = None) -> None:
        self.per_second[model][int(at if at is not None else time.time())][key] += n

    def count_user(self, *, model: str, user: str, at: float) -> None:
        self.per_user[user][model][int(at)] += 1

    def as_dict(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for model, secs in self.per_second.items():
            total: Counter = Counter()
            for c in secs.values():
                total.update(c)
            models[model] = {"per_second": {str(s): dict(c) for s, c in sorted(secs.items())}, "total": dict(total)}
        users = {u: {m: {str(sec): n for sec, n in sorted(c.items())} for m, c in by_model.items()}
                 for u, by_model in self.per_user.items()}
        return {"models": models, "users": users, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "started_at": self.started_at, "now": time.time()}


class MockLLM:
    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._initial = MockConfig(**asdict(self.config))
        self.stats = Stats()
        self.windows: dict[str, _Window] = defaultdict(_Window)
        self.rng = random.Random(self.config.seed)
        self.cache = PromptCache()
        #: (protocol, body) of the last requests received
        self.bodies: deque[tuple[str, Any]] = deque(maxlen=BODIES_KEPT)
        from loadgen.mock_llm.batches import BatchStore

        self.batches = BatchStore(self)

    # --- app -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/v1/chat/completions", self.openai)
        self.batches.routes(app)
        app.router.add_get("/_mock/stats", self.get_stats)
        app.router.add_get("/_mock/requests", self.get_requests)
        app.router.add_post("/_mock/reset", self.reset)
        app.router.add_post("/_mock/config", self.set_config)
        app.router.add_get("/_mock/config", self.get_config)
        app.router.add_get("/_mock/health", self.health)
        return app

    async def health(self, _req: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def get_stats(self, _req: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def get_requests(self, _req: web.Request) -> web.Response:
        """The last request bodies received (headers, and so keys, are not kept), newest last."""
        return web.json_response([{"protocol": p, "body": b} for p, b in self.bodies])

    async def reset(self, req: web.Request) -> web.Response:
        """Zero the counters and the mock's own limit windows; ``{"config": true}`` also restores
        the configuration the server was started with."""
        body = await req.json() if req.can_read_body else {}
        self.stats.reset()
        self.windows.clear()
        self.cache.clear()
        self.bodies.clear()
        self.batches.clear()
        if isinstance(body, dict) and body.get("config"):
            self.config = MockConfig(**asdict(self._initial))
        return web.json_response({"ok": True})

    async def get_config(self, _req: web.Request) -> web.Response:
        return web.json_response(self.config.public())

    async def set_config(self, req: web.Request) -> web.Response:
        try:
            self.config.update(await req.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.config.public())

    # --- protocols -----------------------------------------------------------------------------

    async def anthropic(self, req: web.Request) -> web.Response:
        return await self._serve(req, PROTOCOL_ANTHROPIC)

    async def openai(self, req: web.Request) -> web.Response:
        return await self._serve(req, PROTOCOL_OPENAI)

    async def _serve(self, req: web.Request, protocol: str) -> web.Response:
        arrived = time.time()
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._handle(req, protocol, arrived)
        finally:
            self.stats.in_flight -= 1

    async def _handle(self, req: web.Request, protocol: str, arrived: float) -> web.StreamResponse:
        cfg = self.config
        try:
            body = await req.json()
        except ValueError:
            return _error(protocol, 400, "invalid_request_error", "body is not JSON")
        big = (req.content_length or 0) > BODY_KEPT_MAX_BYTES
        self.bodies.append((protocol, {"_omitted_bytes": req.content_length} if big else body))
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return _error(protocol, 400, "invalid_request_error", "model: field required")
        stats = self.stats
        stats.count(model=model, key="requests", at=arrived)
        try:
            parsed = parse_anthropic(body) if protocol == PROTOCOL_ANTHROPIC else parse_openai(body)
        except WireError as exc:
            return self._fail(protocol, model, exc.status, exc.kind, str(exc), code=exc.code)
        if parsed.end_user:
            stats.count_user(model=model, user=parsed.end_user, at=arrived)
        key = _key_of(req, protocol)
        if not key:
            return self._fail(protocol, model, 401, "authentication_error", "no API key given")
        if cfg.expected_key is not None and key != cfg.expected_key:
            shown = f"{key[:3]}***{key[-2:]}" if len(key) > 6 else "***"
            return self._fail(protocol, model, 401, "authentication_error",
                              f"Incorrect API key provided: {shown}. You can find your API key in your account.")
        prompt = parsed.text
        directives = dict(_DIRECTIVE_RE.findall(prompt))
        input_tokens = estimate_tokens(prompt)
        if "status" in directives:
            st = int(directives["status"])
            return self._fail(protocol, model, st, _kind_for(st), f"forced status {st} by the prompt")
        if model in cfg.force_status:
            st = int(cfg.force_status[model])
            return self._fail(protocol, model, st, _kind_for(st), f"forced status {st} for {model}")
        if "context_too_long" in directives or input_tokens + int(parsed.max_tokens or 0) > cfg.context_tokens:
            msg = (f"prompt is too long: {input_tokens} tokens > {cfg.context_tokens} maximum"
                   if protocol == PROTOCOL_ANTHROPIC else
                   f"This model's maximum context length is {cfg.context_tokens} tokens. However, your messages "
                   f"resulted in {input_tokens} tokens.")
            return self._fail(protocol, model, 400, "invalid_request_error", msg, code="context_length_exceeded")
        answer = make_answer(rng=self.rng, parsed=parsed, output_tokens=cfg.output_tokens,
                             usage=CacheUsage(input_tokens=input_tokens))
        out_tokens = answer.output_tokens
        if cfg.rpm or cfg.tpm:
            wait = self.windows[model].admit(now=arrived, tokens=input_tokens + out_tokens, rpm=cfg.rpm, tpm=cfg.tpm,
                                             window_s=cfg.window_s)
            if wait is not None:
                retry = cfg.retry_after_s if cfg.retry_after_s is not None else wait
                headers = {"retry-after": str(max(1, math.ceil(retry))), "retry-after-ms": str(int(retry * 1000))}
                if cfg.limit_status == 529 and protocol == PROTOCOL_ANTHROPIC:
                    return self._fail(protocol, model, 529, "overloaded_error", "Overloaded", headers=headers)
                return self._fail(protocol, model, 429, "rate_limit_error",
                                  f"rate limit of {cfg.rpm} requests / {cfg.tpm} tokens per {cfg.window_s:g}s "
                                  "exceeded", headers=headers, code="rate_limit_exceeded")
        faulty = not cfg.fault_models or model in cfg.fault_models
        roll = self.rng.random()
        latency_s = _sample_ms(cfg.model_latency.get(model, cfg.latency), self.rng) / 1000.0
        if faulty and roll < cfg.timeout_rate:
            await asyncio.sleep(cfg.hang_s)
            return self._fail(protocol, model, 504, "timeout_error", "upstream timed out")
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if faulty and roll < cfg.timeout_rate + cfg.error_rate:
            return self._fail(protocol, model, 500, "api_error", "Internal server error")
        if faulty and roll < cfg.timeout_rate + cfg.error_rate + cfg.overload_rate:
            if protocol == PROTOCOL_ANTHROPIC:
                return self._fail(protocol, model, 529, "overloaded_error", "Overloaded")
            return self._fail(protocol, model, 503, "server_error", "The server is overloaded")
        answer = dataclasses.replace(answer, usage=self._cache_usage(parsed, input_tokens=input_tokens))
        stats.count(model=model, key="ok", at=arrived)
        for name in TOKEN_COUNTERS[:-1]:
            stats.count(model=model, key=name, n=getattr(answer.usage, name), at=arrived)
        stats.count(model=model, key="output_tokens", n=out_tokens, at=arrived)
        if parsed.stream:
            stats.count(model=model, key="streamed", at=arrived)
            return await self._stream(req, protocol, model, answer, include_usage=parsed.include_usage)
        if protocol == PROTOCOL_ANTHROPIC:
            return web.json_response(anthropic_message(model, answer),
                                     headers={"request-id": f"req_{uuid.uuid4().hex[:24]}"})
        return web.json_response(openai_completion(model, answer),
                                 headers={"x-request-id": f"req_{uuid.uuid4().hex[:24]}"})

    def answer_body(self, protocol: str, body: Any, *, at: float) -> tuple[int, dict[str, Any]]:
        """One request of a batch, answered now: ``(status, response body)`` as the interactive endpoint
        would answer it (the same checks, prompt directives, prompt cache and counters, the counters
        also under ``batched``) — without latency, random faults or the mock's own RPM/TPM limits,
        which a batch API does not apply per request."""
        cfg = self.config
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return 400, _error_body(protocol, "invalid_request_error", "model: field required")
        stats = self.stats
        stats.count(model=model, key="requests", at=at)
        stats.count(model=model, key="batched", at=at)
        try:
            parsed = parse_anthropic(body) if protocol == PROTOCOL_ANTHROPIC else parse_openai(body)
        except WireError as exc:
            stats.count(model=model, key=f"status_{exc.status}", at=at)
            return exc.status, _error_body(protocol, exc.kind, str(exc), code=exc.code)
        if parsed.stream:
            stats.count(model=model, key="status_400", at=at)
            return 400, _error_body(protocol, "invalid_request_error", "stream: not supported in a batch")
        directives = dict(_DIRECTIVE_RE.findall(parsed.text))
        input_tokens = estimate_tokens(parsed.text)
        status = int(directives["status"]) if "status" in directives else cfg.force_status.get(model)
        if status:
            stats.count(model=model, key=f"status_{status}", at=at)
            return int(status), _error_body(protocol, _kind_for(int(status)), f"forced status {status}")
        if "context_too_long" in directives or input_tokens + int(parsed.max_tokens or 0) > cfg.context_tokens:
            stats.count(model=model, key="status_400", at=at)
            return 400, _error_body(protocol, "invalid_request_error",
                                    f"prompt is too long: {input_tokens} tokens > {cfg.context_tokens} maximum",
                                    code="context_length_exceeded")
        answer = make_answer(rng=self.rng, parsed=parsed, output_tokens=cfg.output_tokens,
                             usage=self._cache_usage(parsed, input_tokens=input_tokens))
        stats.count(model=model, key="ok", at=at)
        for name in TOKEN_COUNTERS[:-1]:
            stats.count(model=model, key=name, n=getattr(answer.usage, name), at=at)
            stats.count(model=model, key=f"batched_{name}", n=getattr(answer.usage, name), at=at)
        stats.count(model=model, key="output_tokens", n=answer.output_tokens, at=at)
        stats.count(model=model, key="batched_output_tokens", n=answer.output_tokens, at=at)
        if protocol == PROTOCOL_ANTHROPIC:
            return 200, anthropic_message(model, answer)
        return 200, openai_completion(model, answer)

    def _cache_usage(self, parsed, *, input_tokens: int) -> CacheUsage:
        """The input's token classes once the request is served (a refused request caches nothing)."""
        cfg = self.config
        if not cfg.prompt_cache:
            return CacheUsage(input_tokens=input_tokens)
        now = time.monotonic()
        if parsed.protocol == PROTOCOL_ANTHROPIC:
            return self.cache.anthropic(model=parsed.model, segments=parsed.segments, now=now,
                                        min_tokens=cfg.cache_min_tokens,
                                        ttl_s={"5m": cfg.cache_ttl_s, "1h": cfg.cache_ttl_1h_s})
        return self.cache.openai(model=parsed.model, text=parsed.text, now=now, min_tokens=cfg.cache_min_tokens,
                                 ttl_s=cfg.cache_ttl_s)

    async def _stream(self, req: web.Request, protocol: str, model: str, answer: Answer, *,
                      include_usage: bool) -> web.StreamResponse:
        """The answer as server-sent events in the API's own format (see :mod:`loadgen.mock_llm.answers`)."""
        rid = f"req_{uuid.uuid4().hex[:24]}"
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                           "cache-control": "no-cache",
                                           "request-id" if protocol == PROTOCOL_ANTHROPIC else "x-request-id": rid})
        await resp.prepare(req)
        try:
            if protocol == PROTOCOL_ANTHROPIC:
                for event, data in anthropic_events(model, answer):
                    await resp.write(sse(data, event=event))
            else:
                for chunk in openai_chunks(model, answer, include_usage=include_usage):
                    await resp.write(sse(chunk))
                await resp.write(sse("[DONE]"))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats.count(model=model, key="stream_aborted")
        return resp

    def _fail(self, protocol: str, model: str, status: int, kind: str, message: str, *,
              headers: dict[str, str] | None = None, code: str | None = None) -> web.Response:
        self.stats.count(model=model, key=f"status_{status}")
        return _error(protocol, status, kind, message, headers=headers, code=code)


# --- wire formats ----------------------------------------------------------------------------


def _key_of(req: web.Request, protocol: str) -> str:
    if protocol == PROTOCOL_ANTHROPIC and req.headers.get("x-api-key"):
        return req.headers["x-api-key"]
    auth = req.headers.get("authorization", "")  # OpenAI; newer Anthropic SDKs send Bearer too
    return auth[7:] if auth.lower().startswith("bearer ") else ""


def _kind_for(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            529: "overloaded_error"}.get(status, "api_error")


def _error_body(protocol: str, kind: str, message: str, *, code: str | None = None) -> dict[str, Any]:
    if protocol == PROTOCOL_ANTHROPIC:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error(protocol: str, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
           code: str | None = None) -> web.Response:
    return web.json_response(_error_body(protocol, kind, message, code=code), status=status, headers=headers)


def raise_fd_limit() -> int:
    """Thousands of connections need thousands of descriptors: raise the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def serve(*, host: str, port: int, config: MockConfig, backlog: int = 4096) -> None:
    """Run until SIGINT/SIGTERM. Prints one "listening" line when ready."""
    limit = raise_fd_limit()
    mock = MockLLM(config)

    def ready(_msg: str) -> None:  # aiohttp calls print() once the socket is bound
        print(f"mock-llm listening on http://{host}:{port} (fd limit {limit})", flush=True)

    web.run_app(mock.app(), host=host, port=port, access_log=None, backlog=backlog, print=ready,
                handle_signals=True, shutdown_timeout=1.0)
