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
  echoing a masked key, so redaction is tested against the real thing.

Endpoints: ``POST /v1/messages``, ``POST /v1/chat/completions``, ``GET /_mock/stats``,
``POST /_mock/reset``, ``POST /_mock/config``, ``GET /_mock/health``.
One event loop holds thousands of concurrent connections (the file-descriptor limit is raised
to its hard maximum at start).
"""

from __future__ import annotations

import asyncio
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

PROTOCOL_ANTHROPIC = "anthropic"
PROTOCOL_OPENAI = "openai"
DEFAULT_CONTEXT_TOKENS = 200_000
_DIRECTIVE_RE = re.compile(r"\[\[mock:([a-z_]+)(?:=([^\]]*))?\]\]")
_WORDS = ("the", "fleet", "answers", "each", "request", "in", "full", "and", "counts", "tokens")


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
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_at = time.time()

    def count(self, *, model: str, key: str, n: int = 1, at: float | None = None) -> None:
        self.per_second[model][int(at if at is not None else time.time())][key] += n

    def as_dict(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for model, secs in self.per_second.items():
            total: Counter = Counter()
            for c in secs.values():
                total.update(c)
            models[model] = {"per_second": {str(s): dict(c) for s, c in sorted(secs.items())}, "total": dict(total)}
        return {"models": models, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "started_at": self.started_at, "now": time.time()}


class MockLLM:
    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._initial = MockConfig(**asdict(self.config))
        self.stats = Stats()
        self.windows: dict[str, _Window] = defaultdict(_Window)
        self.rng = random.Random(self.config.seed)

    # --- app -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_get("/_mock/stats", self.get_stats)
        app.router.add_post("/_mock/reset", self.reset)
        app.router.add_post("/_mock/config", self.set_config)
        app.router.add_get("/_mock/config", self.get_config)
        app.router.add_get("/_mock/health", self.health)
        return app

    async def health(self, _req: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def get_stats(self, _req: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def reset(self, req: web.Request) -> web.Response:
        """Zero the counters and the mock's own limit windows; ``{"config": true}`` also restores
        the configuration the server was started with."""
        body = await req.json() if req.can_read_body else {}
        self.stats.reset()
        self.windows.clear()
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

    async def _handle(self, req: web.Request, protocol: str, arrived: float) -> web.Response:
        cfg = self.config
        try:
            body = await req.json()
        except ValueError:
            return _error(protocol, 400, "invalid_request_error", "body is not JSON")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return _error(protocol, 400, "invalid_request_error", "model: field required")
        stats = self.stats
        stats.count(model=model, key="requests", at=arrived)
        messages = body.get("messages")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if not isinstance(messages, list) or not messages:
            return self._fail(protocol, model, 400, "invalid_request_error", "messages: at least one message")
        if protocol == PROTOCOL_ANTHROPIC and not isinstance(max_tokens, int):
            return self._fail(protocol, model, 400, "invalid_request_error", "max_tokens: field required")
        key = _key_of(req, protocol)
        if not key:
            return self._fail(protocol, model, 401, "authentication_error", "no API key given")
        if cfg.expected_key is not None and key != cfg.expected_key:
            shown = f"{key[:3]}***{key[-2:]}" if len(key) > 6 else "***"
            return self._fail(protocol, model, 401, "authentication_error",
                              f"Incorrect API key provided: {shown}. You can find your API key in your account.")
        prompt = _prompt_of(body)
        directives = dict(_DIRECTIVE_RE.findall(prompt))
        input_tokens = estimate_tokens(prompt)
        if "status" in directives:
            st = int(directives["status"])
            return self._fail(protocol, model, st, _kind_for(st), f"forced status {st} by the prompt")
        if model in cfg.force_status:
            st = int(cfg.force_status[model])
            return self._fail(protocol, model, st, _kind_for(st), f"forced status {st} for {model}")
        if "context_too_long" in directives or input_tokens + int(max_tokens or 0) > cfg.context_tokens:
            msg = (f"prompt is too long: {input_tokens} tokens > {cfg.context_tokens} maximum"
                   if protocol == PROTOCOL_ANTHROPIC else
                   f"This model's maximum context length is {cfg.context_tokens} tokens. However, your messages "
                   f"resulted in {input_tokens} tokens.")
            return self._fail(protocol, model, 400, "invalid_request_error", msg, code="context_length_exceeded")
        lo, hi = cfg.output_tokens
        if isinstance(max_tokens, int) and max_tokens > 0:
            hi = max(1, min(hi, max_tokens))
            lo = min(lo, hi)
        out_tokens = self.rng.randint(lo, hi)
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
        stats.count(model=model, key="ok", at=arrived)
        stats.count(model=model, key="input_tokens", n=input_tokens, at=arrived)
        stats.count(model=model, key="output_tokens", n=out_tokens, at=arrived)
        text = " ".join(self.rng.choice(_WORDS) for _ in range(out_tokens))
        if protocol == PROTOCOL_ANTHROPIC:
            return web.json_response(_anthropic_message(model, text, input_tokens, out_tokens, hi),
                                     headers={"request-id": f"req_{uuid.uuid4().hex[:24]}"})
        return web.json_response(_openai_completion(model, text, input_tokens, out_tokens, hi),
                                 headers={"x-request-id": f"req_{uuid.uuid4().hex[:24]}"})

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


def _prompt_of(body: dict[str, Any]) -> str:
    parts: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        parts.append(system)
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return "\n".join(parts)


def _kind_for(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            529: "overloaded_error"}.get(status, "api_error")


def _error(protocol: str, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
           code: str | None = None) -> web.Response:
    if protocol == PROTOCOL_ANTHROPIC:
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _anthropic_message(model: str, text: str, input_tokens: int, output_tokens: int, max_tokens: int) -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if output_tokens >= max_tokens else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def _openai_completion(model: str, text: str, input_tokens: int, output_tokens: int, max_tokens: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": "length" if output_tokens >= max_tokens else "stop",
        }],
        "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                  "total_tokens": input_tokens + output_tokens},
        "system_fingerprint": None,
    }


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
