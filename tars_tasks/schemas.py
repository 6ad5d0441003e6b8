"""What a producer may submit, checked before anything is recorded or queued.

:func:`validate_spec` is the one entry point for a request's fields: ``TarsClient.submit`` /
``submit_many``, the module-level ``tars_tasks.submit`` / ``submit_many``, the coordinator and any
other way in (a plain-Celery message's kwargs) go through it, so every way in accepts and refuses
exactly the same input. :func:`validate_requests` checks the container of a ``submit_many`` call
and :func:`validate_run_id` the form of its ``run_id``; whether the run exists is the
coordinator's check (it needs the database).

Every refusal is an :class:`~tars_tasks.errors.InvalidRequest` naming the field, quoting the bad
value only as a short :func:`~tars_tasks.errors.excerpt`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from itertools import islice
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, model_validator

from config.catalog import Catalog
from config.keys import PRIORITY_MAX, PRIORITY_MIN, TIERS
from config.request_limits import (
    BATCH_COMPLETION_WINDOW_S,
    DEADLINE_MAX_S,
    MESSAGE_ROLES,
    MESSAGES_MAX,
    METADATA_KEY_MAX_CHARS,
    METADATA_MAX_KEYS,
    METADATA_USER_ID,
    METADATA_VALUE_MAX_CHARS,
    RESPONSE_FORMAT_TEXT,
    RESPONSE_FORMATS,
    STOP_MAX,
    STOP_MAX_CHARS,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    USER_ID_MAX_CHARS,
)
from tars_tasks.db.models import Request
from tars_tasks.errors import InvalidRequest, excerpt, type_name

PRIORITY_NAMES: dict[str, int] = {"low": 0, "normal": 5, "high": 9}
FIELDS: tuple[str, ...] = ("role", "prompt", "priority", "tenant", "idempotency_key", "tier", "system", "messages",
                           "max_tokens", "temperature", "stop", "response_format", "metadata", "cache", "lane",
                           "deadline")
#: The lanes a request may take: its own call now, or a provider batch at the batch price (within 24 h).
LANE_INTERACTIVE = "interactive"
LANE_BATCH = "batch"
LANES: tuple[str, ...] = (LANE_INTERACTIVE, LANE_BATCH)
#: The units of a ``deadline`` string, in seconds (largest first).
DEADLINE_UNITS: dict[str, int] = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
#: The fields that describe the model request itself (the rest route and identify it).
MODEL_FIELDS: tuple[str, ...] = ("system", "messages", "max_tokens", "temperature", "stop", "response_format",
                                 "metadata")
DEFAULT_TENANT = "default"

_columns = Request.__table__.c
#: Column sizes of ``requests`` (characters, as Postgres ``varchar(n)`` counts them).
ROLE_MAX_CHARS: int = _columns.role.type.length
TIER_MAX_CHARS: int = _columns.tier_requested.type.length
TENANT_MAX_CHARS: int = _columns.tenant.type.length
KEY_MAX_CHARS: int = _columns.idempotency_key.type.length
RUN_ID_MAX_CHARS: int = _columns.run_id.type.length

# re.fullmatch, never "$": "$" also matches before a trailing newline.
_TENANT_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._\-]{{0,{TENANT_MAX_CHARS - 1}}}")
_KEY_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:\-]{{0,{KEY_MAX_CHARS - 1}}}")
_RUN_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:\-]{{0,{RUN_ID_MAX_CHARS - 1}}}")
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_USER_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:\-]{{0,{USER_ID_MAX_CHARS - 1}}}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# ASCII digits only ("\\d" would also take other scripts' digits), then letters: the unit, checked apart
_DEADLINE_RE = re.compile(r"([0-9]+)([A-Za-z]*)")


class _Required:
    def __repr__(self) -> str:
        return "<required>"


#: Default of a required keyword argument of ``submit``: leaving it out raises
#: :class:`InvalidRequest` naming the field, exactly as a mapping without it does.
REQUIRED: Final[Any] = _Required()


class RequestSpec(BaseModel):
    """One unit of agent work as a producer describes it. The accepted input, exactly:

    * ``role`` (required): a string naming a role of the model catalog (``researcher``,
      ``analyst``, ``validator``, ``engineer``, ``writer`` by default), at most 50 characters.
    * ``prompt`` (required unless ``messages`` is given): the new user turn, a string with at least
      one non-whitespace character and at most ``TARS_MAX_PROMPT_CHARS`` (default 200,000)
      characters. Any Unicode text is kept exactly as given (newlines, tabs, other control
      characters such as ESC or form feed included) except NUL (U+0000), which Postgres ``text``
      cannot store, and lone surrogates (U+D800..U+DFFF), which are not text (they cannot be
      encoded as UTF-8). The same holds for every text below.
    * ``priority`` (default ``"normal"``): an ``int`` 0..9 (not a bool; 9 is served first), or one
      of the strings ``low`` (0), ``normal`` (5), ``high`` (9) in any letter case, or a one-digit
      string ``"0"``..``"9"``. No surrounding whitespace; stored as the integer.
    * ``tenant`` (default ``"default"``): 1-100 ASCII letters, digits, ``.``, ``_``, ``-``,
      starting with a letter or digit (a trailing newline is refused, not ignored).
    * ``idempotency_key`` (default ``None``): ``None`` or 1-200 ASCII letters, digits, ``.``, ``_``,
      ``:``, ``-``, starting with a letter or digit. A key already used by the same tenant returns
      the earlier request instead of making a new one.
    * ``tier`` (default ``None``: the role's tier): ``None`` or a tier of the catalog (``haiku``,
      ``sonnet``, ``opus``), overriding the role's routing.

    The model request beyond the prompt (each ``None`` or left out: the role's default from the
    catalog, if it has one):

    * ``system``: the system prompt, a string; ``""`` means no system prompt at all (not even the
      role's). Whitespace only is refused.
    * ``messages``: earlier turns of a multi-turn conversation, a non-empty list (or tuple) of at
      most 1,000 mappings ``{"role": "user" | "assistant", "content": ...}`` with exactly those two
      keys; ``content`` is non-blank text, or a non-empty list of text blocks
      ``{"type": "text", "text": "..."}`` (nothing else). The first turn is a user turn; the
      ``prompt``, if given, is appended as the last user turn; without a prompt the last turn
      must be a user turn (the one the model answers). No ``system`` role: use ``system``.
    * ``max_tokens``: an ``int`` >= 1 (not a bool), at most the tier's ``max_output_tokens``
      (64,000 by default); the output limit sent to the model. Default: the role's, else the
      tier's ``output_tokens`` upper bound.
    * ``temperature``: a number 0..1 (an ``int`` or a finite ``float``, not a bool; the range both
      APIs accept). Default: the role's, else the provider's own.
    * ``stop``: one stop sequence (a string) or a list of at most 4, each 1-200 characters and not
      only whitespace; ``[]`` means none (not even the role's).
    * ``response_format``: ``"text"`` or ``"json"`` (one JSON object: OpenAI's JSON mode, and for
      both providers an instruction appended to the system prompt).
    * ``metadata``: the producer's own labels, a mapping of at most 16 string keys (1-64
      characters, no control characters) to string values (at most 512 characters), stored with
      the request and returned with its result. Only ``metadata["user_id"]`` reaches the
      provider, as the end-user id (Anthropic ``metadata.user_id``, OpenAI ``safety_identifier``):
      1-64 ASCII letters, digits, ``.``, ``_``, ``:``, ``-`` (an opaque id, never a name).
    * ``cache``: ``None`` (default), ``True`` or ``False`` (a bool, nothing else). The exact response
      cache answers a request it has seen before (same model, canonical request and scope) at
      submit: by default only a request that does not sample (``temperature`` 0); ``True`` lets a
      sampled one be served and fill it too; ``False`` never touches the cache.
    * ``lane``: ``"interactive"`` (default) or ``"batch"``: the request accepts a delay of up to the
      provider's batch window (24 h) and is sent through the provider's batch API at its batch
      price (docs/COST_CONTROLS.md, "Batch lane"). Only for a tier whose provider has one
      (``anthropic``, ``openai``).
    * ``deadline``: ``None`` (default) or how long the producer accepts to wait for the answer: a
      string ``<whole number><unit>`` with unit ``s``, ``m``, ``h`` or ``d`` (any case; no spaces,
      signs or fractions: ``"24h"``, ``"90m"``, ``"2d"``, ``"3600s"``), a string of digits, an
      ``int`` (seconds; not a bool), a whole-valued finite ``float`` or a ``timedelta`` of whole
      seconds; more than 0 and at most 366 days. Stored as seconds. Without ``lane``, a deadline
      of at least the providers' batch window (``BATCH_COMPLETION_WINDOW_S``, 24 h) puts the
      request on the batch lane and a shorter one keeps it interactive. An explicit ``lane``
      wins where it can keep the promise: ``"interactive"`` with any deadline stays interactive
      (it answers sooner); ``"batch"`` with a deadline shorter than 24 h is refused (a batch is
      only promised within 24 h).

    The texts a producer gives (``prompt``, ``system``, every message) together are at most
    ``TARS_MAX_PROMPT_CHARS`` characters (the role's default system prompt is not counted).

    Strings must be ``str`` (a ``str`` subclass such as a ``StrEnum`` member is taken as its plain
    value); ``bytes``, numbers for strings, ``None`` for ``prompt``/``priority``/``tenant``, and
    fields not named above are refused. A request is a mapping of these fields (any ``Mapping``,
    or the keyword arguments of ``submit``); ``submit_many`` takes a non-empty iterable of at most
    ``TARS_MAX_REQUESTS_PER_CALL`` (default 10,000) of them, not a single mapping, string or bytes;
    its ``run_id`` is ``None`` or the id of an existing row of ``runs``.

    Constructing a ``RequestSpec`` checks everything that does not need the catalog;
    :func:`validate_spec` checks the rest (role and tier known, lengths, ``max_tokens`` within
    the tier's limit). A spec holds what the producer gave; the role's defaults are filled in
    when the request is recorded (:func:`request_columns`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    role: str
    prompt: str | None = None
    priority: int = PRIORITY_NAMES["normal"]
    tenant: str = DEFAULT_TENANT
    idempotency_key: str | None = None
    #: Explicit tier, overriding the role's routing (the only way to reach opus by default).
    tier: str | None = None
    system: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] | None = None
    response_format: str | None = None
    metadata: dict[str, str] | None = None
    #: The response cache (tars_tasks/cache.py): None = the default (served from cache when not
    #: sampled), False = never from cache and never filling it, True = also when sampled.
    cache: bool | None = None
    #: ``interactive`` or ``batch`` (the providers' batch APIs, at the batch price); the lane the
    #: request takes, ``deadline`` taken into account.
    lane: str = LANE_INTERACTIVE
    #: How long the producer accepts to wait for the answer, in seconds (None: not said).
    deadline: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> dict[str, Any]:
        return _check_fields(data)


# --- the checks -------------------------------------------------------------------------------


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f"{field} must be a string, got {type_name(value)} {excerpt(value)}"
                       if value is not None else f"{field} must be a string, got None")
    return str.__str__(value)  # a str subclass (a StrEnum member) as its plain value


def _bounded(field: str, value: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise _invalid(field, f"{field} has {len(value)} characters; the limit is {max_chars}: {excerpt(value)}")
    return value


def _name(field: str, value: Any, max_chars: int) -> str:
    """A short name (role, tier): a string without control characters or surrogates."""
    v = _bounded(field, _text(field, value), max_chars)
    if not v:
        raise _invalid(field, f"{field} is empty")
    bad = _CONTROL_OR_SURROGATE.search(v)
    if bad:
        raise _invalid(field, f"{field} contains {_char(bad.group())} at position {bad.start()}: {excerpt(v)}")
    return v


def _char(c: str) -> str:
    kind = "a lone surrogate" if "\ud800" <= c <= "\udfff" else "NUL" if c == "\x00" else "a control character"
    return f"{kind} (U+{ord(c):04X})"


def _pattern(field: str, value: Any, pattern: re.Pattern[str], max_chars: int, what: str) -> str:
    v = _bounded(field, _text(field, value), max_chars)
    if pattern.fullmatch(v) is None:
        raise _invalid(field, f"{field} must be 1-{max_chars} characters of {what}, starting with a letter or "
                              f"digit; got {excerpt(v)}")
    return v


def _storable_text(field: str, value: Any, *, where: str | None = None) -> str:
    """Any text Postgres can store and UTF-8 can encode (no NUL, no lone surrogate)."""
    what = where or field
    v = _text(field, value) if where is None else _text_in(field, where, value)
    if "\x00" in v:
        raise _invalid(field, f"{what} contains NUL (U+0000) at position {v.index(chr(0))}, which Postgres "
                              f"text cannot store: {excerpt(v)}")
    bad = _SURROGATE.search(v)
    if bad:
        raise _invalid(field, f"{what} contains {_char(bad.group())} at position {bad.start()}; text must be "
                              f"valid Unicode: {excerpt(v)}")
    return v


def _text_in(field: str, where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f"{where} must be a string, got {type_name(value)} {excerpt(value)}"
                       if value is not None else f"{where} must be a string, got None")
    return str.__str__(value)


def _prompt(value: Any) -> str:
    v = _storable_text("prompt", value)
    if not v.strip():
        raise _invalid("prompt", "prompt is empty" if not v else f"prompt is empty (only whitespace): {excerpt(v)}")
    return v


def _system(value: Any) -> str | None:
    if value is None:
        return None
    v = _storable_text("system", value)
    if v and not v.strip():
        raise _invalid("system", f"system is only whitespace: {excerpt(v)}; leave it out for the role's default "
                                 "or give \"\" for no system prompt")
    return v


def _content(where: str, value: Any) -> str | list[dict[str, str]]:
    """A turn's content: non-blank text, or a non-empty list of ``{"type": "text", "text": ...}`` blocks."""
    if isinstance(value, str):
        v = _storable_text("messages", value, where=where)
        if not v.strip():
            raise _invalid("messages", f"{where} is empty" + (f" (only whitespace): {excerpt(v)}" if v else ""))
        return v
    if isinstance(value, Mapping) or not isinstance(value, list | tuple):
        raise _invalid("messages", f"{where} must be text or a list of text blocks, got "
                                   f"{type_name(value)} {excerpt(value)}")
    if not value:
        raise _invalid("messages", f"{where} is an empty list of blocks")
    blocks: list[dict[str, str]] = []
    for j, block in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(block, Mapping) or set(block) != {"type", "text"} or block.get("type") != "text":
            raise _invalid("messages", f"{at} must be a text block {{\"type\": \"text\", \"text\": ...}}, got "
                                       f"{excerpt(block)}")
        blocks.append({"type": "text", "text": _storable_text("messages", block["text"], where=f"{at}.text")})
    if not any(b["text"].strip() for b in blocks):
        raise _invalid("messages", f"{where} has no text (only whitespace)")
    return blocks


def _messages(value: Any) -> tuple[dict[str, Any], ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, list | tuple):
        raise _invalid("messages", f"messages must be a list of {{\"role\", \"content\"}} mappings, got "
                                   f"{type_name(value)} {excerpt(value)}")
    if not value:
        raise _invalid("messages", "messages is empty: leave it out, or give at least one turn")
    if len(value) > MESSAGES_MAX:
        raise _invalid("messages", f"messages has {len(value)} turns; the limit is {MESSAGES_MAX}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _invalid("messages", f"{where} must be a mapping {{\"role\", \"content\"}}, got "
                                       f"{type_name(m)} {excerpt(m)}")
        keys = set(m)
        if keys != {"role", "content"}:
            extra = sorted(map(repr, keys - {"role", "content"}))
            missing = sorted({"role", "content"} - keys)
            raise _invalid("messages", f"{where} must have exactly the keys role and content"
                                       + (f"; unknown {excerpt(', '.join(extra), limit=40)}" if extra else "")
                                       + (f"; missing {', '.join(missing)}" if missing else ""))
        role = m["role"]
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            hint = "; give the system prompt as system" if role == "system" else ""
            raise _invalid("messages", f"{where}.role must be 'user' or 'assistant', got {excerpt(role)}{hint}")
        out.append({"role": str.__str__(role), "content": _content(f"{where}.content", m["content"])})
    if out[0]["role"] != "user":
        raise _invalid("messages", "messages[0] must be a user turn (the conversation starts with the user)")
    return tuple(out)


def _max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("max_tokens", f"max_tokens must be an integer >= 1, got {type_name(value)} {excerpt(value)}")
    if value < 1:
        raise _invalid("max_tokens", f"max_tokens must be >= 1, got {excerpt(int(value))}")
    return int(value)


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid("temperature", f"temperature must be a number {TEMPERATURE_MIN:g}..{TEMPERATURE_MAX:g}, "
                                      f"got {type_name(value)} {excerpt(value)}")
    v = float(value)
    if not math.isfinite(v) or not TEMPERATURE_MIN <= v <= TEMPERATURE_MAX:
        raise _invalid("temperature", f"temperature {excerpt(value)} is out of range "
                                      f"{TEMPERATURE_MIN:g}..{TEMPERATURE_MAX:g} (the range both APIs accept)")
    return v


def _stop(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if isinstance(items, Mapping) or not isinstance(items, list | tuple):
        raise _invalid("stop", f"stop must be a string or a list of at most {STOP_MAX} strings, got "
                               f"{type_name(value)} {excerpt(value)}")
    if len(items) > STOP_MAX:
        raise _invalid("stop", f"stop has {len(items)} sequences; the limit is {STOP_MAX}")
    out = []
    for i, item in enumerate(items):
        where = "stop" if isinstance(value, str) else f"stop[{i}]"
        v = _storable_text("stop", item, where=where)
        if not v.strip() or len(v) > STOP_MAX_CHARS:
            raise _invalid("stop", f"{where} must be 1-{STOP_MAX_CHARS} characters, not only whitespace; "
                                   f"got {excerpt(v)}")
        out.append(v)
    return tuple(out)


def _response_format(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in RESPONSE_FORMATS:
        raise _invalid("response_format", f"response_format must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, "
                                          f"got {type_name(value)} {excerpt(value)}")
    return str.__str__(value)


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _invalid("metadata", f"metadata must be a mapping of strings to strings, got "
                                   f"{type_name(value)} {excerpt(value)}")
    if len(value) > METADATA_MAX_KEYS:
        raise _invalid("metadata", f"metadata has {len(value)} keys; the limit is {METADATA_MAX_KEYS}")
    out: dict[str, str] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= METADATA_KEY_MAX_CHARS or _CONTROL_OR_SURROGATE.search(key):
            raise _invalid("metadata", f"metadata keys must be 1-{METADATA_KEY_MAX_CHARS} characters without control "
                                       f"characters, got {excerpt(key, limit=40)}")
        k = str.__str__(key)
        where = f"metadata[{excerpt(k, limit=40)}]"
        text = _storable_text("metadata", v, where=where)
        if len(text) > METADATA_VALUE_MAX_CHARS:
            raise _invalid("metadata", f"{where} has {len(text)} characters; the limit is {METADATA_VALUE_MAX_CHARS}")
        if k == METADATA_USER_ID and _USER_ID_RE.fullmatch(text) is None:
            raise _invalid("metadata", f"metadata['user_id'] is sent to the provider as the end-user id: 1-"
                                       f"{USER_ID_MAX_CHARS} ASCII letters, digits, '.', '_', ':', '-' (an opaque "
                                       f"id, never a name); got {excerpt(text)}")
        out[k] = text
    return out


def _cache(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _invalid("cache", f"cache must be true, false or None, got {type_name(value)} {excerpt(value)}")


def _lane(value: Any) -> str:
    if isinstance(value, str) and str.__str__(value) in LANES:
        return str.__str__(value)
    raise _invalid("lane", f"lane must be one of {', '.join(LANES)}, got {type_name(value)} {excerpt(value)}")


def _bad_deadline(message: str) -> InvalidRequest:
    return _invalid("deadline", message)


def parse_deadline(value: Any) -> int | None:
    """A ``deadline`` as whole seconds (None stays None): ``"24h"``, ``"90m"``, ``"2d"``, ``"3600s"``
    (units ``s``/``m``/``h``/``d`` in any case), a string of digits, an ``int``, a whole-valued finite
    ``float`` or a ``timedelta`` of whole seconds; more than 0 and at most ``DEADLINE_MAX_S``.
    Anything else is one :class:`InvalidRequest` (field ``deadline``) and nothing else is raised."""
    if value is None:
        return None
    usage = "a duration such as 24h, 90m, 2d or 3600s, or a number of seconds"
    if isinstance(value, str):
        text = str.__str__(value)
        m = _DEADLINE_RE.fullmatch(text)
        if m is None:
            if text[:1] == "-" and _DEADLINE_RE.fullmatch(text[1:]):
                raise _bad_deadline(f"deadline must be more than 0, got {excerpt(text)}")
            raise _bad_deadline(f"deadline must be {usage}; got {excerpt(text)}")
        digits, unit = m.groups()
        if unit and unit.lower() not in DEADLINE_UNITS:
            raise _bad_deadline(f"deadline {excerpt(text)} has an unknown unit {excerpt(unit, limit=20)}: "
                                f"use s, m, h or d")
        digits = digits.lstrip("0") or "0"
        if len(digits) > len(str(DEADLINE_MAX_S)):  # int() of a huge string is slow and may refuse
            raise _bad_deadline(f"deadline {excerpt(text)} is more than {format_deadline(DEADLINE_MAX_S)}")
        seconds = int(digits) * DEADLINE_UNITS[unit.lower() or "s"]
    elif isinstance(value, timedelta):
        seconds = value.days * 86_400 + value.seconds
        if value.microseconds:
            raise _bad_deadline(f"deadline must be whole seconds, got {excerpt(value)}")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_deadline(f"deadline must be {usage}; got {type_name(value)} {excerpt(value)}")
    elif isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _bad_deadline(f"deadline must be a whole number of seconds, got {excerpt(value)}")
    else:
        seconds = int(value)
    if seconds <= 0:
        raise _bad_deadline(f"deadline must be more than 0, got {excerpt(value)}")
    if seconds > DEADLINE_MAX_S:
        raise _bad_deadline(f"deadline {excerpt(value)} is more than {format_deadline(DEADLINE_MAX_S)}")
    return seconds


def format_deadline(seconds: int) -> str:
    """Whole seconds in the largest unit that divides them exactly (``parse_deadline`` reads it back)."""
    for unit, size in DEADLINE_UNITS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: 's' divides every integer")


def batch_window_label() -> str:
    """The batch window as people say it (``24h``)."""
    w = BATCH_COMPLETION_WINDOW_S
    return f"{w // 3600}h" if w % 3600 == 0 else format_deadline(w)


def resolve_lane(lane: str | None, deadline: int | None) -> str:
    """The lane a request takes from its checked ``lane`` (None: not given) and ``deadline`` (seconds).

    No lane: batch if the deadline is at least the batch window, else interactive. An explicit lane
    wins where it keeps the deadline: interactive always does; batch only within the window."""
    if lane is None:
        batch = deadline is not None and deadline >= BATCH_COMPLETION_WINDOW_S
        return LANE_BATCH if batch else LANE_INTERACTIVE
    if lane == LANE_BATCH and deadline is not None and deadline < BATCH_COMPLETION_WINDOW_S:
        window = batch_window_label()
        raise _bad_deadline(f"deadline {format_deadline(deadline)} is shorter than the providers' batch window "
                            f"({window}): lane 'batch' cannot promise it; leave out lane (a deadline under {window} "
                            f"runs interactively) or give a deadline of at least {window}")
    return lane


def parse_priority(value: Any) -> int:
    """``"low" | "normal" | "high"`` (any case), ``"0"``..``"9"`` or an ``int`` 0..9 (9 is served first)."""
    names = "/".join(PRIORITY_NAMES)
    if isinstance(value, str):
        name = value.lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        if len(value) == 1 and value in "0123456789":
            return int(value)
        raise _invalid("priority", f"unknown priority {excerpt(value)}: use an integer "
                                   f"{PRIORITY_MIN}..{PRIORITY_MAX} or {names}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("priority", f"priority must be an integer {PRIORITY_MIN}..{PRIORITY_MAX} or {names}, "
                                   f"got {type_name(value)} {excerpt(value)}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise _invalid("priority", f"priority {excerpt(int(value))} is out of range {PRIORITY_MIN}..{PRIORITY_MAX}")
    return int(value)


def _field_name(key: Any) -> str:
    if isinstance(key, str) and 0 < len(key) <= 40 and key.isprintable():
        return key
    return excerpt(key, limit=40)


def _check_fields(data: Any) -> dict[str, Any]:
    """The catalog-free checks of one request's fields; returns them typed, defaults filled in."""
    if not isinstance(data, Mapping):
        raise _invalid("requests", f"expected a mapping of request fields, got {type_name(data)} {excerpt(data)}")
    for key in data:
        if not isinstance(key, str) or key not in FIELDS:
            raise _invalid(_field_name(key), f"unknown field {excerpt(key, limit=40)}: the fields are "
                                             + ", ".join(FIELDS))
    if "role" not in data:
        raise _invalid("role", "role is required")
    if "prompt" not in data and data.get("messages") is None:
        raise _invalid("prompt", "prompt is required (or give the conversation as messages)")
    role = _name("role", data["role"], ROLE_MAX_CHARS)
    prompt = _prompt(data["prompt"]) if "prompt" in data else None
    messages = _messages(data.get("messages"))
    if prompt is None and messages is not None and messages[-1]["role"] != "user":
        raise _invalid("messages", f"the last turn (messages[{len(messages) - 1}]) is an assistant turn and there "
                                   "is no prompt: end with a user turn, or give the new turn as prompt")
    key = data.get("idempotency_key")
    tier = data.get("tier")
    deadline = parse_deadline(data.get("deadline"))
    return {
        "role": role,
        "prompt": prompt,
        "priority": parse_priority(data.get("priority", "normal")),
        "tenant": _pattern("tenant", data.get("tenant", DEFAULT_TENANT), _TENANT_RE, TENANT_MAX_CHARS,
                           "ASCII letters, digits, '.', '_', '-'"),
        "idempotency_key": None if key is None else _pattern(
            "idempotency_key", key, _KEY_RE, KEY_MAX_CHARS, "ASCII letters, digits, '.', '_', ':', '-'"),
        "tier": None if tier is None else _name("tier", tier, TIER_MAX_CHARS),
        "system": _system(data.get("system")),
        "messages": messages,
        "max_tokens": _max_tokens(data.get("max_tokens")),
        "temperature": _temperature(data.get("temperature")),
        "stop": _stop(data.get("stop")),
        "response_format": _response_format(data.get("response_format")),
        "metadata": _metadata(data.get("metadata")),
        "cache": _cache(data.get("cache")),
        "lane": resolve_lane(_lane(data["lane"]) if "lane" in data else None, deadline),
        "deadline": deadline,
    }


def message_text(content: str | list[dict[str, str]]) -> str:
    """The text of one turn's content (blocks joined)."""
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


def given_chars(fields: Mapping[str, Any]) -> int:
    """Characters of text a producer gave: prompt, system and every turn."""
    n = len(fields.get("prompt") or "") + len(fields.get("system") or "")
    return n + sum(len(message_text(m["content"])) for m in fields.get("messages") or ())


def with_role_defaults(spec: RequestSpec, *, catalog: Catalog) -> dict[str, Any]:
    """The model fields of ``spec`` with the role's defaults filled in where the producer left one out."""
    d = catalog.defaults_for(spec.role)
    out = {name: getattr(spec, name) for name in MODEL_FIELDS}
    for name in ("system", "max_tokens", "temperature", "stop", "response_format"):
        if out[name] is None:
            out[name] = getattr(d, name)
    if out["response_format"] is None:
        out["response_format"] = RESPONSE_FORMAT_TEXT
    return out


def validate_spec(
    data: RequestSpec | Mapping[str, Any],
    *,
    catalog: Catalog,
    max_prompt_chars: int,
    index: int | None = None,
) -> RequestSpec:
    """Turn one request's fields into a :class:`RequestSpec`, checked exactly as ``submit`` checks them.

    ``catalog`` decides which roles and tiers exist, ``max_prompt_chars`` is the deployment's
    ``TARS_MAX_PROMPT_CHARS``. A ``RequestSpec`` passed in is checked again (it may have been made
    with ``model_construct``). Raises :class:`InvalidRequest`; with ``index`` its message starts
    ``request #index:`` and ``exc.index`` is set.
    """
    try:
        if isinstance(data, RequestSpec):
            data = {f: getattr(data, f) for f in FIELDS if not (f == "prompt" and data.prompt is None)}
        fields = _check_fields(data)
        if fields["role"] not in catalog.roles:
            raise _invalid("role", f"unknown role {excerpt(fields['role'])}: known roles are "
                                   + ", ".join(sorted(catalog.roles)))
        tier = fields["tier"] or catalog.roles[fields["role"]]
        if tier not in TIERS or tier not in catalog.tiers:
            raise _invalid("tier", f"unknown tier {excerpt(tier)}: tiers are "
                                   + ", ".join(t for t in TIERS if t in catalog.tiers))
        if len(fields["prompt"] or "") > max_prompt_chars:
            raise _invalid("prompt", f"prompt has {len(fields['prompt'])} characters; the limit is "
                                     f"{max_prompt_chars} (TARS_MAX_PROMPT_CHARS)")
        total = given_chars(fields)
        if total > max_prompt_chars:
            field = "messages" if fields["messages"] else "system"
            raise _invalid(field, f"prompt, system and messages have {total} characters together; the limit is "
                                  f"{max_prompt_chars} (TARS_MAX_PROMPT_CHARS)")
        cap = catalog.spec(tier).max_output_tokens
        max_tokens = fields["max_tokens"]
        if max_tokens is not None and max_tokens > cap:
            raise _invalid("max_tokens", f"max_tokens {max_tokens} is more than tier {tier}'s model "
                                         f"{catalog.spec(tier).model} can give ({cap}, max_output_tokens)")
    except InvalidRequest as exc:
        if index is None:
            raise
        raise InvalidRequest(f"request #{index}: {exc}", field=exc.field, index=index) from None
    return RequestSpec.model_construct(**fields)


def request_columns(spec: RequestSpec, *, catalog: Catalog) -> dict[str, Any]:
    """The ``requests`` columns of a spec ``validate_spec`` returned, the role's defaults filled in
    (row id, tiers, status and times apart): what the worker will send is what is stored."""
    m = with_role_defaults(spec, catalog=catalog)
    return {
        "tenant": spec.tenant, "idempotency_key": spec.idempotency_key, "role": spec.role,
        "priority": spec.priority, "prompt": spec.prompt, "system": m["system"],
        "messages": None if m["messages"] is None else [dict(t) for t in m["messages"]],
        "max_tokens": m["max_tokens"], "temperature": m["temperature"],
        "stop": None if m["stop"] is None else list(m["stop"]), "response_format": m["response_format"],
        "metadata": None if m["metadata"] is None else dict(m["metadata"]),
        "deadline_s": spec.deadline,
    }


def validate_requests(requests: Any, *, max_requests: int) -> list[Any]:
    """The ``requests`` argument of ``submit_many`` as a list: a non-empty iterable of at most
    ``max_requests`` items (each item is checked by :func:`validate_spec`). A single mapping, a
    string or bytes is refused rather than iterated; a generator is consumed at most one past the cap.
    """
    if isinstance(requests, Mapping):
        raise _invalid("requests", "requests must be an iterable of request mappings, not one mapping: "
                                   "use submit(**fields) or submit_many([fields])")
    if isinstance(requests, str | bytes | bytearray | memoryview) or not isinstance(requests, Iterable):
        raise _invalid("requests", f"requests must be an iterable of request mappings, got "
                                   f"{type_name(requests)} {excerpt(requests)}")
    items = requests if isinstance(requests, list) else list(islice(_iterate(requests), max_requests + 1))
    if not items:
        raise _invalid("requests", "requests is empty: submit_many needs at least one request")
    if len(items) > max_requests:
        raise _invalid("requests", f"more than {max_requests} requests in one call (TARS_MAX_REQUESTS_PER_CALL); "
                                   "submit them in several calls")
    return items


def _iterate(requests: Iterable[Any]) -> Iterator[Any]:
    try:
        it = iter(requests)
    except TypeError:  # claims Iterable (has __iter__) but is not
        raise _invalid("requests", f"requests must be an iterable of request mappings, got "
                                   f"{type_name(requests)}") from None
    yield from it


def validate_tenant(tenant: Any) -> str:
    """A tenant name as ``submit`` accepts it (1-100 ASCII letters, digits, '.', '_', '-')."""
    return _pattern("tenant", tenant, _TENANT_RE, TENANT_MAX_CHARS, "ASCII letters, digits, '.', '_', '-'")


def validate_run_id(run_id: Any) -> str | None:
    """``None`` or a well-formed run id (1-36 ASCII letters, digits, '.', '_', ':', '-'); whether the
    run exists is checked against ``runs`` by the coordinator."""
    if run_id is None:
        return None
    v = _bounded("run_id", _text("run_id", run_id), RUN_ID_MAX_CHARS)
    if _RUN_ID_RE.fullmatch(v) is None:
        raise _invalid("run_id", f"run_id must be the id of a run (1-{RUN_ID_MAX_CHARS} ASCII letters, digits, "
                                 f"'.', '_', ':', '-'); got {excerpt(v)}")
    return v
