"""The OpenAI Chat Completions API (``POST /v1/chat/completions``) over httpx.

Usage comes from ``usage.prompt_tokens`` / ``usage.completion_tokens``. The key is read from
the environment variable named by the tier (default ``OPENAI_API_KEY``) and sent only in the
``Authorization`` header. OpenAI's 401 body echoes a masked key; it is redacted before use.
"""

from __future__ import annotations

import httpx

from config.catalog import ModelSpec
from tars_tasks.errors import TransientProviderError
from workers.providers.base import Completion
from workers.providers.http import HttpProvider, error_for_status, parse_json, post_json, redact

DEFAULT_BASE_URL = "https://api.openai.com"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context window")


class OpenAIProvider(HttpProvider):
    name = "openai"

    default_base_url = DEFAULT_BASE_URL
    default_api_key_env = DEFAULT_API_KEY_ENV

    def complete(self, *, spec: ModelSpec, prompt: str, request_id: str, attempt: int) -> Completion:
        secret = self._secret(spec)
        body = {
            "model": spec.model,
            "max_tokens": spec.output_tokens[1],
            "messages": [{"role": "user", "content": prompt}],
            "user": request_id,
        }
        headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
        resp = post_json(client=self._client_for(spec), path="/v1/chat/completions", headers=headers, body=body,
                         spec=spec, secret=secret)
        if resp.status_code >= 400:
            kind, message = _error_of(resp)
            raise error_for_status(status=resp.status_code, message=redact(message, secret=secret), kind=kind,
                                   headers=resp.headers, model=spec.model, context_markers=CONTEXT_MARKERS)
        data = parse_json(resp, spec=spec)
        usage = data.get("usage") or {}
        if "prompt_tokens" not in usage or "completion_tokens" not in usage:
            raise TransientProviderError(f"{spec.model}: response without usage", status_code=resp.status_code)
        choices = data.get("choices") or [{}]
        text = ((choices[0].get("message") or {}).get("content")) or ""
        return Completion(text=text, input_tokens=int(usage["prompt_tokens"]),
                          output_tokens=int(usage["completion_tokens"]), http_status=resp.status_code)


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    """``{"error": {"message", "type", "param", "code"}}``, or the raw body cut short."""
    try:
        err = resp.json().get("error") or {}
        kind = " ".join(str(x) for x in (err.get("type"), err.get("code")) if x)
        return kind, str(err.get("message", ""))[:500]
    except (ValueError, AttributeError):
        return "", resp.text[:500]
