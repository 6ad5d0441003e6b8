"""The OpenAI Chat Completions API (``POST /v1/chat/completions``) over httpx.

The body (:func:`chat_body`): ``model``, the output limit as ``max_completion_tokens`` (or
``max_tokens``, the tier's ``openai_max_tokens_field``), ``messages`` with the system prompt as the
first (``system``) message, ``temperature``, ``stop``, ``response_format: {"type": "json_object"}``
in JSON mode (the system prompt then names JSON, as the API requires) and ``safety_identifier``
(an opaque end-user id).

Usage comes from ``usage.prompt_tokens`` (of which ``prompt_tokens_details.cached_tokens`` were
read from OpenAI's prompt cache, at the cached-input price) and ``usage.completion_tokens``. The
key is read from the environment variable named by the tier (default ``OPENAI_API_KEY``) and
sent only in the ``Authorization`` header. OpenAI's 401 body echoes a masked key; it is redacted
before use.
"""

from __future__ import annotations

import httpx

from config.catalog import ModelSpec
from tars_tasks.errors import TransientProviderError
from workers.providers.base import Completion
from workers.providers.http import HttpProvider, error_for_status, parse_json, post_json, redact
from workers.providers.request import ModelRequest
from workers.providers.usage import UsageMissing, openai_stop_reason, openai_usage

DEFAULT_BASE_URL = "https://api.openai.com"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context window")


class OpenAIProvider(HttpProvider):
    name = "openai"

    default_base_url = DEFAULT_BASE_URL
    default_api_key_env = DEFAULT_API_KEY_ENV

    def complete(self, *, spec: ModelSpec, request: ModelRequest, request_id: str, attempt: int) -> Completion:
        secret = self._secret(spec)
        body = chat_body(spec=spec, request=request, request_id=request_id)
        headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        resp = post_json(client=self._client_for(spec), path="/v1/chat/completions", headers=headers, body=body,
                         spec=spec, secret=secret)
        if resp.status_code >= 400:
            kind, message = _error_of(resp)
            raise error_for_status(status=resp.status_code, message=redact(message, secret=secret), kind=kind,
                                   headers=resp.headers, model=spec.model, context_markers=CONTEXT_MARKERS)
        data = parse_json(resp, spec=spec)
        try:
            usage = openai_usage(data.get("usage"))
        except UsageMissing:
            raise TransientProviderError(f"{spec.model}: response without usage", status_code=resp.status_code
                                         ) from None
        choices = data.get("choices") or [{}]
        first = choices[0] if isinstance(choices[0], dict) else {}
        text = ((first.get("message") or {}).get("content")) or ""
        return Completion.of(text=text, usage=usage, stop_reason=openai_stop_reason(first.get("finish_reason")),
                             http_status=resp.status_code)


def chat_body(*, spec: ModelSpec, request: ModelRequest, request_id: str) -> dict:
    """The Chat Completions request body for ``request`` on ``spec``'s model."""
    system = request.system_text()
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": t["role"], "content": t["content"]} for t in request.turns]
    body: dict = {"model": spec.model, spec.openai_max_tokens_field: request.output_limit(spec), "messages": messages}
    if request.temperature is not None and spec.accepts_temperature:
        body["temperature"] = request.temperature
    if request.stop:
        body["stop"] = list(request.stop)
    if request.json_mode:
        body["response_format"] = {"type": "json_object"}
    body["safety_identifier"] = request.end_user_id(request_id=request_id)
    return body


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    """``{"error": {"message", "type", "param", "code"}}``, or the raw body cut short."""
    try:
        err = resp.json().get("error") or {}
        kind = " ".join(str(x) for x in (err.get("type"), err.get("code")) if x)
        return kind, str(err.get("message", ""))[:500]
    except (ValueError, AttributeError):
        return "", resp.text[:500]
