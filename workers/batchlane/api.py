"""The providers' batch APIs over httpx: submit a batch, find one again, read its status and results.

* **Anthropic Message Batches**: ``POST /v1/messages/batches`` with ``requests: [{custom_id,
  params}]`` (``params`` is exactly a Messages body, :func:`workers.providers.anthropic.messages_body`);
  ``GET /v1/messages/batches/{id}`` until ``processing_status`` is ``ended``; the JSONL at its
  ``results_url``: ``{"custom_id", "result": {"type": "succeeded", "message"} | {"type": "errored",
  "error": {"type": "error", "error": {"type", "message"}}} | {"type": "expired"} | {"type": "canceled"}}``.
  ``GET /v1/messages/batches`` lists batches, most recent first (``has_more``, ``last_id``, ``after_id``).
* **OpenAI Batch**: the requests as a JSONL file (``{"custom_id", "method": "POST", "url":
  "/v1/chat/completions", "body"}``) uploaded with ``POST /v1/files`` (``purpose=batch``), then
  ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window: "24h"``, ``metadata``);
  ``GET /v1/batches/{id}`` until ``status`` is ``completed``, ``failed``, ``expired`` or ``cancelled``;
  results in ``output_file_id`` / ``error_file_id`` (``GET /v1/files/{id}/content``), one line per
  request: ``{"custom_id", "response": {"status_code", "body"} | null, "error": {"code", "message"} | null}``.

A request's ``custom_id`` is its TARS request id (a UUID: 36 characters of ``[0-9a-f-]``, inside both
APIs' rules). The TARS batch id goes in OpenAI's ``metadata.tars_batch``; Anthropic batches carry no
metadata, so :meth:`AnthropicBatches.find` matches by creation time and request count (see
docs/COST_CONTROLS.md, "Batch lane", for why that is enough under one active runner).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from config.catalog import ModelSpec
from config.pricing import Usage
from tars_tasks.errors import PermanentProviderError, ProviderError, TransientProviderError
from workers.providers import anthropic as anthropic_api
from workers.providers import openai as openai_api
from workers.providers.http import api_key, error_for_status, redact
from workers.providers.request import ModelRequest
from workers.providers.usage import anthropic_stop_reason, anthropic_usage, openai_stop_reason, openai_usage

#: How far back from a submit's start a batch found by listing may have been created (clock skew).
FIND_SKEW_S = 120.0
#: Pages of the provider's batch list read when looking for a batch again.
FIND_MAX_PAGES = 20

SUCCEEDED, ERRORED, EXPIRED, CANCELED, MISSING = "succeeded", "errored", "expired", "canceled", "missing"


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One request's result in an ended batch."""

    custom_id: str
    kind: str
    text: str | None = None
    usage: Usage | None = None
    stop_reason: str | None = None
    #: For ``errored``: the HTTP status the request got and the error it maps to.
    http_status: int | None = None
    error: ProviderError | None = None

    @property
    def permanent(self) -> bool:
        return isinstance(self.error, PermanentProviderError)


@dataclass(frozen=True, slots=True)
class Submitted:
    provider_batch_id: str
    input_file_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchStatus:
    ended: bool
    provider_status: str


class BatchApiError(TransientProviderError):
    """A batch API call failed in a way worth trying again (5xx, 429, connection)."""


class BatchRefused(PermanentProviderError):
    """The provider refused the batch itself (4xx at create): its requests cannot go this way."""


def _check(resp: httpx.Response, *, what: str, secret: str, model: str) -> httpx.Response:
    if resp.status_code < 400:
        return resp
    try:
        err = resp.json().get("error") or {}
        kind, message = str(err.get("type") or err.get("code") or ""), str(err.get("message", ""))[:500]
    except (ValueError, AttributeError):
        kind, message = "", resp.text[:500]
    text = redact(f"{what}: HTTP {resp.status_code} {kind}: {message}", secret=secret)
    if resp.status_code >= 500 or resp.status_code in (408, 409, 429, 529):
        raise BatchApiError(text, status_code=resp.status_code)
    raise BatchRefused(text, status_code=resp.status_code)


class _Api:
    name = ""
    default_base_url = ""
    default_api_key_env = ""

    def __init__(self, *, spec: ModelSpec, timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.secret = api_key(env_var=spec.api_key_env or self.default_api_key_env)
        self.client = httpx.Client(base_url=(spec.base_url or self.default_base_url).rstrip("/"),
                                   timeout=httpx.Timeout(timeout_s, connect=spec.connect_timeout_s))

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, *, what: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.client.request(method, path, headers=self.headers(), **kw)
        except httpx.HTTPError as exc:
            raise BatchApiError(f"{what}: {type(exc).__name__}: {exc}") from exc
        return _check(resp, what=what, secret=self.secret, model=self.spec.model)

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _item_error(self, status: int, kind: str, message: str) -> ProviderError:
        markers = anthropic_api.CONTEXT_MARKERS if self.name == "anthropic" else openai_api.CONTEXT_MARKERS
        return error_for_status(status=status, message=redact(message, secret=self.secret), kind=kind,
                                headers=httpx.Headers(), model=self.spec.model, context_markers=markers)


class AnthropicBatches(_Api):
    name = "anthropic"
    default_base_url = anthropic_api.DEFAULT_BASE_URL
    default_api_key_env = anthropic_api.DEFAULT_API_KEY_ENV

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.secret, "anthropic-version": anthropic_api.ANTHROPIC_VERSION}

    def submit(self, *, tars_batch_id: str, items: list[tuple[str, ModelRequest]]) -> Submitted:
        body = {"requests": [{"custom_id": rid, "params": anthropic_api.messages_body(spec=self.spec, request=req,
                                                                                      request_id=rid)}
                             for rid, req in items]}
        data = self._request("POST", "/v1/messages/batches", json=body, what="create message batch").json()
        return Submitted(provider_batch_id=str(data["id"]))

    def find(self, *, tars_batch_id: str, request_count: int, since: datetime, known: set[str]) -> str | None:
        """The batch a submit that started at ``since`` created, if the provider has it: created at or
        after ``since`` (less :data:`FIND_SKEW_S`), not one of ``known``, with ``request_count`` requests;
        the oldest such (one runner submits one batch at a time)."""
        after, found = None, []
        for _ in range(FIND_MAX_PAGES):
            params: dict[str, Any] = {"limit": 100, **({"after_id": after} if after else {})}
            page = self._request("GET", "/v1/messages/batches", params=params, what="list message batches").json()
            older = False
            for b in page.get("data") or []:
                created = datetime.fromisoformat(str(b["created_at"]).replace("Z", "+00:00"))
                if created.timestamp() < since.timestamp() - FIND_SKEW_S:
                    older = True
                    continue
                if b["id"] not in known and sum((b.get("request_counts") or {}).values()) == request_count:
                    found.append((created, b["id"]))
            if older or not page.get("has_more") or not page.get("last_id"):
                break
            after = page["last_id"]
        return min(found)[1] if found else None

    def status(self, provider_batch_id: str) -> BatchStatus:
        data = self._request("GET", f"/v1/messages/batches/{provider_batch_id}", what="retrieve message batch").json()
        return BatchStatus(ended=data.get("processing_status") == "ended",
                           provider_status=str(data.get("processing_status")))

    def results(self, provider_batch_id: str) -> list[ItemResult]:
        data = self._request("GET", f"/v1/messages/batches/{provider_batch_id}", what="retrieve message batch").json()
        url = data.get("results_url") or f"/v1/messages/batches/{provider_batch_id}/results"
        resp = self._request("GET", url, what="message batch results")
        out = []
        for line in resp.text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(self._item(str(row.get("custom_id")), row.get("result") or {}))
        return out

    def _item(self, custom_id: str, result: dict[str, Any]) -> ItemResult:
        kind = result.get("type")
        if kind == SUCCEEDED:
            msg = result.get("message") or {}
            text = "".join(b.get("text", "") for b in msg.get("content") or []
                           if isinstance(b, dict) and b.get("type") == "text")
            return ItemResult(custom_id=custom_id, kind=SUCCEEDED, text=text, usage=anthropic_usage(msg.get("usage")),
                              stop_reason=anthropic_stop_reason(msg.get("stop_reason")))
        if kind == ERRORED:
            err = ((result.get("error") or {}).get("error")) or {}
            etype = str(err.get("type", "api_error"))
            status = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                      "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                      "overloaded_error": 529}.get(etype, 500)
            return ItemResult(custom_id=custom_id, kind=ERRORED, http_status=status,
                              error=self._item_error(status, etype, str(err.get("message", ""))))
        return ItemResult(custom_id=custom_id, kind=EXPIRED if kind == EXPIRED else CANCELED)


class OpenAIBatches(_Api):
    name = "openai"
    default_base_url = openai_api.DEFAULT_BASE_URL
    default_api_key_env = openai_api.DEFAULT_API_KEY_ENV
    ENDPOINT = "/v1/chat/completions"
    TERMINAL = ("completed", "failed", "expired", "cancelled")

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secret}"}

    def submit(self, *, tars_batch_id: str, items: list[tuple[str, ModelRequest]]) -> Submitted:
        lines = "".join(json.dumps({"custom_id": rid, "method": "POST", "url": self.ENDPOINT,
                                    "body": openai_api.chat_body(spec=self.spec, request=req, request_id=rid)}) + "\n"
                        for rid, req in items)
        f = self._request("POST", "/v1/files", data={"purpose": "batch"},
                          files={"file": (f"tars-{tars_batch_id}.jsonl", lines.encode(), "application/jsonl")},
                          what="upload batch input file").json()
        body = {"input_file_id": f["id"], "endpoint": self.ENDPOINT, "completion_window": "24h",
                "metadata": {"tars_batch": tars_batch_id}}
        data = self._request("POST", "/v1/batches", json=body, what="create batch").json()
        return Submitted(provider_batch_id=str(data["id"]), input_file_id=str(f["id"]))

    def find(self, *, tars_batch_id: str, request_count: int, since: datetime, known: set[str]) -> str | None:
        """The batch whose ``metadata.tars_batch`` is ``tars_batch_id`` (listed newest first)."""
        after = None
        for _ in range(FIND_MAX_PAGES):
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self._request("GET", "/v1/batches", params=params, what="list batches").json()
            older = False
            for b in page.get("data") or []:
                if (b.get("metadata") or {}).get("tars_batch") == tars_batch_id and b["id"] not in known:
                    return str(b["id"])
                if int(b.get("created_at") or 0) < since.timestamp() - FIND_SKEW_S:
                    older = True
            if older or not page.get("has_more") or not page.get("last_id"):
                return None
            after = page["last_id"]
        return None

    def status(self, provider_batch_id: str) -> BatchStatus:
        data = self._request("GET", f"/v1/batches/{provider_batch_id}", what="retrieve batch").json()
        st = str(data.get("status"))
        return BatchStatus(ended=st in self.TERMINAL, provider_status=st)

    def results(self, provider_batch_id: str) -> list[ItemResult]:
        data = self._request("GET", f"/v1/batches/{provider_batch_id}", what="retrieve batch").json()
        out = []
        for fid in (data.get("output_file_id"), data.get("error_file_id")):
            if not fid:
                continue
            text = self._request("GET", f"/v1/files/{fid}/content", what="batch results file").text
            out += [self._item(json.loads(line)) for line in text.splitlines() if line.strip()]
        return out

    def _item(self, row: dict[str, Any]) -> ItemResult:
        custom_id = str(row.get("custom_id"))
        resp = row.get("response") or None
        if resp is None:
            code = str((row.get("error") or {}).get("code", ""))
            return ItemResult(custom_id=custom_id, kind=CANCELED if "cancel" in code else EXPIRED)
        status, body = int(resp.get("status_code") or 0), resp.get("body") or {}
        if status == 200:
            first = (body.get("choices") or [{}])[0]
            text = (first.get("message") or {}).get("content") or ""
            return ItemResult(custom_id=custom_id, kind=SUCCEEDED, text=text, usage=openai_usage(body.get("usage")),
                              stop_reason=openai_stop_reason(first.get("finish_reason")))
        err = body.get("error") or {}
        kind = " ".join(str(x) for x in (err.get("type"), err.get("code")) if x)
        return ItemResult(custom_id=custom_id, kind=ERRORED, http_status=status,
                          error=self._item_error(status, kind, str(err.get("message", ""))))


def batch_api(spec: ModelSpec) -> AnthropicBatches | OpenAIBatches:
    """The batch API of ``spec``'s provider (raises :class:`PermanentProviderError` if it has none)."""
    if spec.provider == "anthropic":
        return AnthropicBatches(spec=spec)
    if spec.provider == "openai":
        return OpenAIBatches(spec=spec)
    raise PermanentProviderError(f"tier {spec.tier}: provider {spec.provider!r} has no batch API")
