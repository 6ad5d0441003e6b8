"""The Anthropic Messages API (``POST /v1/messages``) over httpx.

The body (:func:`messages_body`): ``model``, ``max_tokens`` (required by the API), ``messages``
(the turns, the prompt last), ``system`` as a top-level string (never a message), ``temperature``,
``stop_sequences`` and ``metadata.user_id`` (an opaque end-user id). JSON mode has no schema-free
switch in this API; the instruction in the system prompt is it.

Usage comes from the response's ``usage`` block by token class (see
:mod:`workers.providers.usage`: input, 5-minute and 1-hour cache writes, cache reads, output),
each priced at its own catalog price. The key is read from the environment variable named by
the tier (default ``ANTHROPIC_API_KEY``) and sent only in the ``x-api-key`` header.
"""

from __future__ import annotations

import httpx

from config.catalog import ModelSpec
from tars_tasks.errors import TransientProviderError
from workers.providers.base import Completion
from workers.providers.http import HttpProvider, error_for_status, parse_json, post_json, redact
from workers.providers.request import ModelRequest
from workers.providers.usage import UsageMissing, anthropic_stop_reason, anthropic_usage

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_API_KEY_ENV = "ANTHROPIC_API_KEY"
ANTHROPIC_VERSION = "2023-06-01"
#: Phrases of Anthropic's 400 for a prompt beyond the context window.
CONTEXT_MARKERS = ("prompt is too long", "context window", "too many tokens", "context length")


class AnthropicProvider(HttpProvider):
    name = "anthropic"

    default_base_url = DEFAULT_BASE_URL
    default_api_key_env = DEFAULT_API_KEY_ENV

    def complete(self, *, spec: ModelSpec, request: ModelRequest, request_id: str, attempt: int) -> Completion:
        secret = self._secret(spec)
        body = messages_body(spec=spec, request=request, request_id=request_id)
        headers = {"x-api-key": secret, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        resp = post_json(client=self._client_for(spec), path="/v1/messages", headers=headers, body=body, spec=spec,
                         secret=secret)
        if resp.status_code >= 400:
            kind, message = _error_of(resp)
            raise error_for_status(status=resp.status_code, message=redact(message, secret=secret), kind=kind,
                                   headers=resp.headers, model=spec.model, context_markers=CONTEXT_MARKERS)
        data = parse_json(resp, spec=spec)
        try:
            usage = anthropic_usage(data.get("usage"))
        except UsageMissing:
            raise TransientProviderError(f"{spec.model}: response without usage", status_code=resp.status_code
                                         ) from None
        text = "".join(b.get("text", "") for b in data.get("content") or []
                       if isinstance(b, dict) and b.get("type") == "text")
        return Completion.of(text=text, usage=usage, stop_reason=anthropic_stop_reason(data.get("stop_reason")),
                             http_status=resp.status_code)


def messages_body(*, spec: ModelSpec, request: ModelRequest, request_id: str) -> dict:
    """The Messages API request body for ``request`` on ``spec``'s model."""
    body: dict = {
        "model": spec.model,
        "max_tokens": request.output_limit(spec),
        "messages": [{"role": t["role"], "content": t["content"]} for t in request.turns],
    }
    system = request.system_text()
    if system:
        body["system"] = system
    if request.temperature is not None and spec.accepts_temperature:
        body["temperature"] = request.temperature
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    body["metadata"] = {"user_id": request.end_user_id(request_id=request_id)}
    return body


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, or the raw body cut short."""
    try:
        err = resp.json().get("error") or {}
        return str(err.get("type", "")), str(err.get("message", ""))[:500]
    except (ValueError, AttributeError):
        return "", resp.text[:500]
