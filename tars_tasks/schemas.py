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

import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, model_validator

from config.catalog import Catalog
from config.keys import TIERS
from tars_tasks.celery_app import PRIORITY_MAX, PRIORITY_MIN
from tars_tasks.db.models import Request
from tars_tasks.errors import InvalidRequest, excerpt, type_name

PRIORITY_NAMES: dict[str, int] = {"low": 0, "normal": 5, "high": 9}
FIELDS: tuple[str, ...] = ("role", "prompt", "priority", "tenant", "idempotency_key", "tier")
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
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    * ``prompt`` (required): a string with at least one non-whitespace character and at most
      ``TARS_MAX_PROMPT_CHARS`` (default 200,000) characters. Any Unicode text is kept exactly as
      given (newlines, tabs, other control characters such as ESC or form feed included) except
      NUL (U+0000), which Postgres ``text`` cannot store, and lone surrogates (U+D800..U+DFFF),
      which are not text (they cannot be encoded as UTF-8).
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

    Strings must be ``str`` (a ``str`` subclass such as a ``StrEnum`` member is taken as its plain
    value); ``bytes``, numbers for strings, ``None`` for a field that has a default, and fields not
    named above are refused. A request is a mapping of these fields (any ``Mapping``, or the
    keyword arguments of ``submit``); ``submit_many`` takes a non-empty iterable of at most
    ``TARS_MAX_REQUESTS_PER_CALL`` (default 10,000) of them, not a single mapping, string or bytes;
    its ``run_id`` is ``None`` or the id of an existing row of ``runs``.

    Constructing a ``RequestSpec`` checks everything that does not need the catalog;
    :func:`validate_spec` checks the rest (role and tier known, prompt length).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    role: str
    prompt: str
    priority: int = PRIORITY_NAMES["normal"]
    tenant: str = DEFAULT_TENANT
    idempotency_key: str | None = None
    #: Explicit tier, overriding the role's routing (the only way to reach opus by default).
    tier: str | None = None

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


def _prompt(value: Any) -> str:
    v = _text("prompt", value)
    if "\x00" in v:
        raise _invalid("prompt", f"prompt contains NUL (U+0000) at position {v.index(chr(0))}, which Postgres "
                                 f"text cannot store: {excerpt(v)}")
    bad = _SURROGATE.search(v)
    if bad:
        raise _invalid("prompt", f"prompt contains {_char(bad.group())} at position {bad.start()}; text must be "
                                 f"valid Unicode: {excerpt(v)}")
    if not v.strip():
        raise _invalid("prompt", "prompt is empty" if not v else f"prompt is empty (only whitespace): {excerpt(v)}")
    return v


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
    for required in ("role", "prompt"):
        if required not in data:
            raise _invalid(required, f"{required} is required")
    key = data.get("idempotency_key")
    tier = data.get("tier")
    return {
        "role": _name("role", data["role"], ROLE_MAX_CHARS),
        "prompt": _prompt(data["prompt"]),
        "priority": parse_priority(data.get("priority", "normal")),
        "tenant": _pattern("tenant", data.get("tenant", DEFAULT_TENANT), _TENANT_RE, TENANT_MAX_CHARS,
                           "ASCII letters, digits, '.', '_', '-'"),
        "idempotency_key": None if key is None else _pattern(
            "idempotency_key", key, _KEY_RE, KEY_MAX_CHARS, "ASCII letters, digits, '.', '_', ':', '-'"),
        "tier": None if tier is None else _name("tier", tier, TIER_MAX_CHARS),
    }


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
            data = {f: getattr(data, f) for f in FIELDS}
        fields = _check_fields(data)
        if fields["role"] not in catalog.roles:
            raise _invalid("role", f"unknown role {excerpt(fields['role'])}: known roles are "
                                   + ", ".join(sorted(catalog.roles)))
        tier = fields["tier"] or catalog.roles[fields["role"]]
        if tier not in TIERS or tier not in catalog.tiers:
            raise _invalid("tier", f"unknown tier {excerpt(tier)}: tiers are "
                                   + ", ".join(t for t in TIERS if t in catalog.tiers))
        if len(fields["prompt"]) > max_prompt_chars:
            raise _invalid("prompt", f"prompt has {len(fields['prompt'])} characters; the limit is "
                                     f"{max_prompt_chars} (TARS_MAX_PROMPT_CHARS)")
    except InvalidRequest as exc:
        if index is None:
            raise
        raise InvalidRequest(f"request #{index}: {exc}", field=exc.field, index=index) from None
    return RequestSpec.model_construct(**fields)


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
