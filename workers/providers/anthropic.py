"""The Anthropic Messages API (``POST /v1/messages``) over httpx.

Usage and cost come from the response's ``usage`` block (``input_tokens`` plus any cache
read/creation tokens, ``output_tokens``). The key is read from the environment variable
named by the tier (default ``ANTHROPIC_API_KEY``) and sent only in the ``x-api-key`` header.
"""

from __future__ import annotations

import httpx

from config.catalog import ModelSpec
from tars_tasks.errors import TransientProviderError
from workers.providers.base import Completion
from workers.providers.http import HttpProvider, error_for_status, parse_json, post_json, redact

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_API_KEY_ENV = "ANTHROPIC_API_KEY"
ANTHROPIC_VERSION = "2023-06-01"
#: Phrases of Anthropic's 400 for a prompt beyond the context window.
CONTEXT_MARKERS = ("prompt is too long", "context window", "too many tokens", "context length")


class AnthropicProvider(HttpProvider):
    name = "anthropic"

    default_base_url = DEFAULT_BASE_URL
    default_api_key_env = DEFAULT_API_KEY_ENV

    def complete(self, *, spec: ModelSpec, prompt: str, request_id: str, attempt: int) -> Completion:
        secret = self._secret(spec)
        body = {
            "model": spec.model,
            "max_tokens": spec.output_tokens[1],
            "messages": [{"role": "user", "content": prompt}],
            "metadata": {"user_id": request_id},
        }
        headers = {"x-api-key": secret, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        resp = post_json(client=self._client_for(spec), path="/v1/messages", headers=headers, body=body, spec=spec,
                         secret=secret)
        if resp.status_code >= 400:
            kind, message = _error_of(resp)
            raise error_for_status(status=resp.status_code, message=redact(message, secret=secret), kind=kind,
                                   headers=resp.headers, model=spec.model, context_markers=CONTEXT_MARKERS)
        data = parse_json(resp, spec=spec)
        usage = data.get("usage") or {}
        if "input_tokens" not in usage or "output_tokens" not in usage:
            raise TransientProviderError(f"{spec.model}: response without usage", status_code=resp.status_code)
        text = "".join(b.get("text", "") for b in data.get("content") or [] if b.get("type") == "text")
        input_tokens = (int(usage["input_tokens"]) + int(usage.get("cache_creation_input_tokens") or 0)
                        + int(usage.get("cache_read_input_tokens") or 0))
        return Completion(text=text, input_tokens=input_tokens, output_tokens=int(usage["output_tokens"]),
                          http_status=resp.status_code)


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, or the raw body cut short."""
    try:
        err = resp.json().get("error") or {}
        return str(err.get("type", "")), str(err.get("message", ""))[:500]
    except (ValueError, AttributeError):
        return "", resp.text[:500]
