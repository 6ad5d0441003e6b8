"""The providers' batch APIs, as the mock serves them (test equipment, like the rest of the mock).

**Anthropic Message Batches** (``/v1/messages/batches``)::

    POST   /v1/messages/batches              {"requests": [{"custom_id", "params"}]} -> message_batch
    GET    /v1/messages/batches              ?limit&after_id&before_id: {"data", "has_more", "first_id", "last_id"}
    GET    /v1/messages/batches/{id}         processing_status in_progress | canceling | ended, request_counts
    GET    /v1/messages/batches/{id}/results JSONL: {"custom_id", "result": {"type": "succeeded", "message"} |
                                             {"type": "errored", "error": {"type": "error", "error": {...}}} |
                                             {"type": "expired"} | {"type": "canceled"}}
    POST   /v1/messages/batches/{id}/cancel

**OpenAI Files + Batch** (``/v1/files``, ``/v1/batches``)::

    POST   /v1/files                  multipart purpose=batch, file=<JSONL of {"custom_id", "method", "url", "body"}>
    GET    /v1/files/{id}/content     the file's bytes (input, output or error file)
    POST   /v1/batches                {"input_file_id", "endpoint", "completion_window": "24h", "metadata"?}
    GET    /v1/batches                ?limit&after: {"object": "list", "data", "first_id", "last_id", "has_more"}
    GET    /v1/batches/{id}           status validating | in_progress | finalizing | completed | failed | expired |
                                      cancelling | cancelled; output_file_id, error_file_id, request_counts
    POST   /v1/batches/{id}/cancel

A batch ends ``batch_delay_s`` after it was created (``MockConfig``, ``POST /_mock/config``): at the
first look after that, every request in it is answered by :meth:`MockLLM.answer_body` — the same
checks, directives, prompt cache and token counters as the interactive endpoints (counted again
under ``batched*``). ``batch_expire_rate`` of the requests, and every request whose prompt holds
``[[mock:batch_expired]]``, expire instead (Anthropic ``expired``; OpenAI: the batch is ``expired``
and those requests are in its error file with code ``batch_expired``). Stored in memory only.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from loadgen.mock_llm.server import MockLLM

ANTHROPIC = "anthropic"
OPENAI = "openai"
_CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_EXPIRED_DIRECTIVE = "[[mock:batch_expired]]"
#: What the mock's OpenAI batches accept as ``endpoint``.
OPENAI_ENDPOINTS = ("/v1/chat/completions",)
WINDOW_S = 24 * 3600


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Batch:
    id: str
    protocol: str
    created_at: float
    #: (custom_id, request body) in the order given
    requests: list[tuple[str, Any]]
    metadata: dict[str, str] | None = None
    endpoint: str | None = None
    input_file_id: str | None = None
    ended_at: float | None = None
    cancel_at: float | None = None
    #: custom_id -> ("succeeded" | "errored" | "expired" | "canceled", status, body)
    results: dict[str, tuple[str, int, Any]] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    failed_errors: list[dict[str, Any]] | None = None


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: float

    def obj(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class BatchStore:
    """Every batch and file the mock was given (cleared by ``POST /_mock/reset``)."""

    def __init__(self, mock: MockLLM) -> None:
        self.mock = mock
        self.clear()

    def clear(self) -> None:
        self.batches: dict[str, _Batch] = {}
        self.files: dict[str, _File] = {}

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/messages/batches", self.anthropic_create)
        r.add_get("/v1/messages/batches", self.anthropic_list)
        r.add_get("/v1/messages/batches/{id}", self.anthropic_get)
        r.add_get("/v1/messages/batches/{id}/results", self.anthropic_results)
        r.add_post("/v1/messages/batches/{id}/cancel", self.cancel)
        r.add_post("/v1/files", self.file_upload)
        r.add_get("/v1/files/{id}", self.file_get)
        r.add_get("/v1/files/{id}/content", self.file_content)
        r.add_post("/v1/batches", self.openai_create)
        r.add_get("/v1/batches", self.openai_list)
        r.add_get("/v1/batches/{id}", self.openai_get)
        r.add_post("/v1/batches/{id}/cancel", self.cancel)

    # --- processing ------------------------------------------------------------------------------

    def _advance(self, b: _Batch, now: float | None = None) -> None:
        """End the batch if its time has come (or it was cancelled): answer every request once."""
        now = time.time() if now is None else now
        if b.ended_at is not None:
            return
        due = b.created_at + float(self.mock.config.batch_delay_s)
        if b.cancel_at is None and now < due:
            return
        from loadgen.mock_llm.server import PROTOCOL_ANTHROPIC, PROTOCOL_OPENAI

        protocol = PROTOCOL_ANTHROPIC if b.protocol == ANTHROPIC else PROTOCOL_OPENAI
        rate = float(self.mock.config.batch_expire_rate)
        for custom_id, body in b.requests:
            if b.failed_errors is not None:
                break
            if b.cancel_at is not None:
                b.results[custom_id] = ("canceled", 0, None)
                continue
            text = json.dumps(body)
            if _EXPIRED_DIRECTIVE in text or (rate and self.mock.rng.random() < rate):
                b.results[custom_id] = ("expired", 0, None)
                continue
            status, answer = self.mock.answer_body(protocol, body, at=now)
            b.results[custom_id] = ("succeeded" if status == 200 else "errored", status, answer)
        b.ended_at = now
        if b.protocol == OPENAI and b.failed_errors is None:
            self._openai_files(b)

    def _openai_files(self, b: _Batch) -> None:
        ok, bad = [], []
        for custom_id, (kind, status, body) in b.results.items():
            line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
                                    "response": None, "error": None}
            if kind in ("succeeded", "errored"):
                line["response"] = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}",
                                    "body": body}
            elif kind == "expired":
                line["error"] = {"code": "batch_expired",
                                 "message": "This request could not be executed before the completion window "
                                            "expired."}
            else:
                line["error"] = {"code": "batch_cancelled",
                                 "message": "This request could not be executed before the batch was cancelled."}
            (ok if kind == "succeeded" else bad).append(line)
        if ok:
            b.output_file_id = self._store_file(f"batch_{b.id}_output.jsonl", "batch_output", ok).id
        if bad:
            b.error_file_id = self._store_file(f"batch_{b.id}_error.jsonl", "batch_output", bad).id

    def _store_file(self, filename: str, purpose: str, lines: list[dict[str, Any]]) -> _File:
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        f = _File(id=f"file-{uuid.uuid4().hex[:24]}", filename=filename, purpose=purpose, data=data,
                  created_at=time.time())
        self.files[f.id] = f
        return f

    def _auth(self, req: web.Request, protocol: str) -> web.Response | None:
        from loadgen.mock_llm.server import _error, _key_of

        key = _key_of(req, protocol)
        expected = self.mock.config.expected_key
        if not key or (expected is not None and key != expected):
            return _error(protocol, 401, "authentication_error", "invalid x-api-key" if key else "no API key given")
        return None

    def _found(self, req: web.Request, protocol: str) -> _Batch | web.Response:
        from loadgen.mock_llm.server import _error

        b = self.batches.get(req.match_info["id"])
        if b is None or b.protocol != protocol:
            return _error(protocol, 404, "not_found_error", f"no batch {req.match_info['id']}")
        self._advance(b)
        return b

    # --- Anthropic -------------------------------------------------------------------------------

    def _anthropic_obj(self, b: _Batch, base: str) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if b.ended_at is None:
            counts["processing"] = len(b.requests)
        else:
            for kind, _status, _body in b.results.values():
                counts[kind] += 1
        ended = b.ended_at is not None
        status = "ended" if ended else ("canceling" if b.cancel_at is not None else "in_progress")
        return {"id": b.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
                "ended_at": _iso(b.ended_at), "created_at": _iso(b.created_at),
                "expires_at": _iso(b.created_at + WINDOW_S), "archived_at": None,
                "cancel_initiated_at": _iso(b.cancel_at),
                "results_url": f"{base}/v1/messages/batches/{b.id}/results" if ended else None}

    async def anthropic_create(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_ANTHROPIC, _error

        denied = self._auth(req, PROTOCOL_ANTHROPIC)
        if denied is not None:
            return denied
        try:
            body = await req.json()
        except ValueError:
            return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error", "body is not JSON")
        if not isinstance(body, dict) or set(body) != {"requests"}:
            extra = sorted(set(body) - {"requests"}) if isinstance(body, dict) else []
            return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error",
                          f"{extra[0]}: Extra inputs are not permitted" if extra else "requests: Field required")
        items = body["requests"]
        if not isinstance(items, list) or not 1 <= len(items) <= 100_000:
            return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error", "requests: 1 to 100,000 items")
        seen: set[str] = set()
        requests: list[tuple[str, Any]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"custom_id", "params"}:
                return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error",
                              f"requests.{i}: exactly custom_id and params")
            cid = item["custom_id"]
            if not isinstance(cid, str) or _CUSTOM_ID_RE.fullmatch(cid) is None:
                return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error",
                              f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error",
                              f"Duplicate custom_id values are not allowed: {cid}")
            if not isinstance(item["params"], dict):
                return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error", f"requests.{i}.params: an object")
            seen.add(cid)
            requests.append((cid, item["params"]))
        b = _Batch(id=f"msgbatch_{uuid.uuid4().hex[:24]}", protocol=ANTHROPIC, created_at=time.time(),
                   requests=requests)
        self.batches[b.id] = b
        self.mock.stats.count(model="_batches", key="anthropic_created")
        return web.json_response(self._anthropic_obj(b, _base(req)))

    async def anthropic_get(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_ANTHROPIC

        denied = self._auth(req, PROTOCOL_ANTHROPIC)
        if denied is not None:
            return denied
        b = self._found(req, ANTHROPIC)
        return b if isinstance(b, web.Response) else web.json_response(self._anthropic_obj(b, _base(req)))

    async def anthropic_list(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_ANTHROPIC

        denied = self._auth(req, PROTOCOL_ANTHROPIC)
        if denied is not None:
            return denied
        mine = [b for b in self.batches.values() if b.protocol == ANTHROPIC]
        mine.sort(key=lambda b: b.created_at, reverse=True)  # most recent first
        page, has_more = _page(mine, limit=req.query.get("limit"), after=req.query.get("after_id"),
                               before=req.query.get("before_id"))
        for b in page:
            self._advance(b)
        data = [self._anthropic_obj(b, _base(req)) for b in page]
        return web.json_response({"data": data, "has_more": has_more,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def anthropic_results(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_ANTHROPIC, _error

        denied = self._auth(req, PROTOCOL_ANTHROPIC)
        if denied is not None:
            return denied
        b = self._found(req, ANTHROPIC)
        if isinstance(b, web.Response):
            return b
        if b.ended_at is None:
            return _error(PROTOCOL_ANTHROPIC, 400, "invalid_request_error",
                          f"Message Batch {b.id} has not yet ended; results are not available")
        lines = []
        for cid, (kind, _status, body) in b.results.items():
            if kind == "succeeded":
                result: dict[str, Any] = {"type": "succeeded", "message": body}
            elif kind == "errored":
                result = {"type": "errored", "error": body}
            else:
                result = {"type": kind}
            lines.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
        return web.Response(body="".join(lines).encode(), content_type="application/binary")

    async def cancel(self, req: web.Request) -> web.Response:
        protocol = ANTHROPIC if req.path.startswith("/v1/messages/") else OPENAI
        b = self._found(req, protocol)
        if isinstance(b, web.Response):
            return b
        if b.ended_at is None and b.cancel_at is None:
            b.cancel_at = time.time()
            self._advance(b)
        obj = self._anthropic_obj(b, _base(req)) if protocol == ANTHROPIC else self._openai_obj(b)
        return web.json_response(obj)

    # --- OpenAI ----------------------------------------------------------------------------------

    async def file_upload(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI, _error

        denied = self._auth(req, PROTOCOL_OPENAI)
        if denied is not None:
            return denied
        purpose, filename, data = None, "upload.jsonl", None
        try:
            reader = await req.multipart()
            async for part in reader:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    filename = part.filename or filename
                    data = await part.read()
        except (AssertionError, ValueError) as exc:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", f"expected multipart/form-data: {exc}")
        if purpose != "batch" or data is None:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", "purpose must be 'batch' and a file given")
        f = _File(id=f"file-{uuid.uuid4().hex[:24]}", filename=filename, purpose="batch", data=bytes(data),
                  created_at=time.time())
        self.files[f.id] = f
        return web.json_response(f.obj())

    async def file_get(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI, _error

        f = self.files.get(req.match_info["id"])
        if f is None:
            return _error(PROTOCOL_OPENAI, 404, "invalid_request_error", f"No such File object: {req.match_info['id']}")
        return web.json_response(f.obj())

    async def file_content(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI, _error

        denied = self._auth(req, PROTOCOL_OPENAI)
        if denied is not None:
            return denied
        f = self.files.get(req.match_info["id"])
        if f is None:
            return _error(PROTOCOL_OPENAI, 404, "invalid_request_error", f"No such File object: {req.match_info['id']}")
        return web.Response(body=f.data, content_type="application/octet-stream")

    def _openai_obj(self, b: _Batch) -> dict[str, Any]:
        now = time.time()
        ended = b.ended_at is not None
        kinds = [k for k, _s, _b in b.results.values()]
        if b.failed_errors is not None:
            status = "failed"
        elif ended and b.cancel_at is not None:
            status = "cancelled"
        elif ended:
            status = "expired" if "expired" in kinds else "completed"
        elif b.cancel_at is not None:
            status = "cancelling"
        else:
            status = "validating" if now - b.created_at < 0.1 else "in_progress"
        total = len(b.requests)
        done = sum(1 for k in kinds if k == "succeeded")
        return {
            "id": b.id, "object": "batch", "endpoint": b.endpoint,
            "errors": {"object": "list", "data": b.failed_errors} if b.failed_errors else None,
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": int(b.created_at), "in_progress_at": int(b.created_at),
            "expires_at": int(b.created_at + WINDOW_S), "finalizing_at": int(b.ended_at) if ended else None,
            "completed_at": int(b.ended_at) if status == "completed" else None,
            "failed_at": int(b.created_at) if status == "failed" else None,
            "expired_at": int(b.ended_at) if status == "expired" else None,
            "cancelling_at": int(b.cancel_at) if b.cancel_at else None,
            "cancelled_at": int(b.ended_at) if status == "cancelled" else None,
            "request_counts": {"total": total, "completed": done, "failed": len(kinds) - done if ended else 0},
            "metadata": b.metadata,
        }

    async def openai_create(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI, _error

        denied = self._auth(req, PROTOCOL_OPENAI)
        if denied is not None:
            return denied
        try:
            body = await req.json()
        except ValueError:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", "body is not JSON")
        allowed = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        if not isinstance(body, dict) or set(body) - allowed:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", "Unrecognized request argument supplied")
        if body.get("endpoint") not in OPENAI_ENDPOINTS:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error",
                          f"endpoint: the mock accepts {', '.join(OPENAI_ENDPOINTS)}")
        if body.get("completion_window") != "24h":
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", "completion_window: only '24h'")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16
                                 or any(not isinstance(v, str) or len(k) > 64 or len(v) > 512
                                        for k, v in meta.items())):
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error", "metadata: at most 16 string pairs")
        f = self.files.get(body.get("input_file_id") or "")
        if f is None:
            return _error(PROTOCOL_OPENAI, 400, "invalid_request_error",
                          f"No such File object: {body.get('input_file_id')}")
        requests, errors, seen = [], [], set()
        for n, raw in enumerate(f.data.decode("utf-8", "replace").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append({"code": "invalid_json_line", "line": n, "message": "not JSON", "param": None})
                continue
            if (not isinstance(line, dict) or set(line) != {"custom_id", "method", "url", "body"}
                    or line["method"] != "POST" or line["url"] != body["endpoint"]
                    or not isinstance(line["custom_id"], str) or line["custom_id"] in seen):
                errors.append({"code": "invalid_request", "line": n, "param": None,
                               "message": "each line: custom_id (unique), method POST, url = the endpoint, body"})
                continue
            seen.add(line["custom_id"])
            requests.append((line["custom_id"], line["body"]))
        b = _Batch(id=f"batch_{uuid.uuid4().hex[:24]}", protocol=OPENAI, created_at=time.time(), requests=requests,
                   metadata=meta, endpoint=body["endpoint"], input_file_id=f.id,
                   failed_errors=errors or (None if requests else [{"code": "empty_file", "line": None,
                                                                   "message": "no requests", "param": None}]))
        self.batches[b.id] = b
        self.mock.stats.count(model="_batches", key="openai_created")
        return web.json_response(self._openai_obj(b))

    async def openai_get(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI

        denied = self._auth(req, PROTOCOL_OPENAI)
        if denied is not None:
            return denied
        b = self._found(req, OPENAI)
        return b if isinstance(b, web.Response) else web.json_response(self._openai_obj(b))

    async def openai_list(self, req: web.Request) -> web.Response:
        from loadgen.mock_llm.server import PROTOCOL_OPENAI

        denied = self._auth(req, PROTOCOL_OPENAI)
        if denied is not None:
            return denied
        mine = [b for b in self.batches.values() if b.protocol == OPENAI]
        mine.sort(key=lambda b: b.created_at, reverse=True)
        page, has_more = _page(mine, limit=req.query.get("limit"), after=req.query.get("after"), before=None)
        for b in page:
            self._advance(b)
        data = [self._openai_obj(b) for b in page]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": has_more})


def _base(req: web.Request) -> str:
    return f"{req.scheme}://{req.host}"


def _page(items: list[_Batch], *, limit: str | None, after: str | None, before: str | None
          ) -> tuple[list[_Batch], bool]:
    """One page of ``items`` (newest first): those after the ``after`` id, or before the ``before`` id."""
    n = max(1, min(int(limit or 20), 1000))
    ids = [b.id for b in items]
    if after and after in ids:
        items = items[ids.index(after) + 1:]
    elif before and before in ids:
        items = items[:ids.index(before)][-n:]
        return items, False
    return items[:n], len(items) > n
