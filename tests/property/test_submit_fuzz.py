"""Property: every producer call either records exactly what was submitted or raises InvalidRequest.

Hypothesis generates calls to ``TarsClient.submit`` / ``submit_many``, the module-level
``tars_tasks.submit`` / ``submit_many`` and ``Coordinator.submit_many`` against the real
Postgres and Redis of the test session (no workers): valid requests, near misses of valid
ones (a trailing newline, a NUL, a lone surrogate, one character too many), arbitrary text
(controls, surrogates, huge strings), wrong types and wrong containers.

A small reference model below (written from the contract in ``RequestSpec``'s docstring, not
from the implementation) says which fields of a call are invalid. For every call:

* nothing the model calls invalid -> the call returns, and every returned handle's row exists
  with exactly the submitted values (or, for a repeated idempotency key, is the earlier row);
  the table grew by the number of new rows and the queues by the same number of messages;
* something invalid -> ``InvalidRequest`` naming one of the invalid fields, with a short,
  printable, UTF-8-encodable message; no row was written and no message queued;
* any other exception escaping is a failure.

Each test runs once per kind of fault (none, one field, an unknown field, the run id, a
non-mapping request, the container, or faults anywhere), so that every check is exercised and
one fault does not hide another. Deterministic (``derandomize=True``, no example database);
2,360 calls in all (``PER_FAULT``), about 35 s.
"""

from __future__ import annotations

import re
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from config.catalog import load_catalog
from config.keys import TIERS, priority_list, queue_for_tier
from tars_tasks.db.models import Request, Run
from tars_tasks.errors import InvalidRequest
from tests.helpers import make_settings, waiting_messages

CATALOG = load_catalog()
ROLES: dict[str, str] = dict(CATALOG.roles)
TIER_NAMES = [t for t in TIERS if t in CATALOG.tiers]
FIELDS = ("role", "prompt", "priority", "tenant", "idempotency_key", "tier")
OPTIONAL_DEFAULTS: dict[str, Any] = {"priority": 5, "tenant": "default", "idempotency_key": None, "tier": None}

#: Limits of the fuzzed client (small, so "one too many" is cheap to generate).
MAX_PROMPT = 300
CAP = 12
#: An InvalidRequest message longer than this is not "a short excerpt".
MESSAGE_MAX = 300

# --- the reference model of the contract ------------------------------------------------------

TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
PRIORITY_WORDS = {"low": 0, "normal": 5, "high": 9}
UNKNOWN = "<an unknown field>"


def _has_surrogate(s: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in s)


def priority_of(v: Any) -> int | None:
    """The integer a valid priority means, or None if the contract does not allow it."""
    if type(v) is int and 0 <= v <= 9:
        return v
    if type(v) is str:
        if v.lower() in PRIORITY_WORDS:
            return PRIORITY_WORDS[v.lower()]
        if len(v) == 1 and v in "0123456789":
            return int(v)
    return None


VALID: dict[str, Callable[[Any], bool]] = {
    "role": lambda v: type(v) is str and v in ROLES,
    "prompt": lambda v: (type(v) is str and "\x00" not in v and not _has_surrogate(v) and v.strip() != ""
                         and len(v) <= MAX_PROMPT),
    "priority": lambda v: priority_of(v) is not None,
    "tenant": lambda v: type(v) is str and TENANT_RE.fullmatch(v) is not None,
    "idempotency_key": lambda v: v is None or (type(v) is str and KEY_RE.fullmatch(v) is not None),
    "tier": lambda v: v is None or (type(v) is str and v in TIER_NAMES),
}


def item_errors(item: Any) -> set[str]:
    """The fields of one request the contract refuses (empty: the request is valid)."""
    if not isinstance(item, Mapping):
        return {"requests"}
    errs = {UNKNOWN for k in item if not (type(k) is str and k in FIELDS)}
    for f in ("role", "prompt"):
        if f not in item or not VALID[f](item[f]):
            errs.add(f)
    errs |= {f for f in OPTIONAL_DEFAULTS if f in item and not VALID[f](item[f])}
    return errs


def expected_row(item: Mapping[str, Any], run_id: str | None) -> dict[str, Any]:
    m = {**OPTIONAL_DEFAULTS, **item}
    return {"role": m["role"], "prompt": m["prompt"], "priority": priority_of(m["priority"]),
            "tenant": m["tenant"], "idempotency_key": m["idempotency_key"],
            "tier_requested": m["tier"] or ROLES[m["role"]], "run_id": run_id, "status": "queued"}


# --- strategies ------------------------------------------------------------------------------

SPECIAL_CHARS = "\x00\n\r\t\x0b\x0c\x1b\x7f\x85\u2028\u2029\ufeff\uffff\ud800\udbff\udc00\udfff \u00a0é€😀"
nasty_chars = st.one_of(
    st.characters(),                       # any code point Hypothesis likes (no surrogates)
    st.characters(categories=["Cs"]),      # lone surrogates
    st.characters(categories=["Cc"]),      # C0/C1 controls, NUL included
    st.sampled_from(SPECIAL_CHARS),
)
nasty_text = st.text(alphabet=nasty_chars, max_size=30)
huge_text = st.builds(lambda c, n: c * n, st.sampled_from(["a", "k", " ", "\x00", "é", "\ud800", "\n"]),
                      st.sampled_from([37, 51, 101, 201, MAX_PROMPT + 1, 200_001]))
junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30), st.floats(),
    st.binary(max_size=12), st.just(b"researcher"), st.just(b"high"), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.tuples(st.text(max_size=3)),
    st.builds(object), st.just(uuid.uuid4()), st.just(5.0),
)
prompt_chars = st.one_of(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                         st.sampled_from("\n\t\r\x0c\x1b\x7f\x85 é😀"))
VALID_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "role": st.sampled_from(sorted(ROLES)),
    "prompt": st.one_of(
        st.text(alphabet=prompt_chars, min_size=1, max_size=60).filter(lambda s: s.strip() != ""),
        st.just("p" * MAX_PROMPT), st.just("line one\nline two\ttabbed\r\n"),
    ),
    "priority": st.one_of(st.integers(0, 9), st.sampled_from(["low", "normal", "high", "LOW", "High", "NORMAL"]),
                          st.sampled_from(list("0123456789"))),
    "tenant": st.one_of(st.from_regex(TENANT_RE, fullmatch=True), st.just("t" * 100), st.just("default")),
    "idempotency_key": st.one_of(st.none(), st.from_regex(KEY_RE, fullmatch=True), st.sampled_from(["k1", "k2", "a:b"]),
                                 st.just("k" * 200)),
    "tier": st.one_of(st.none(), st.sampled_from(TIER_NAMES)),
}
STRING_MUTATIONS: list[Callable[[str], str]] = [
    lambda s: s + "\n", lambda s: "\n" + s, lambda s: s + "\udfff", lambda s: "\udc80" + s, lambda s: s + "\r\n",
    lambda s: s + "\x00", lambda s: "\x00" + s,
    lambda s: s[:1] + "\ud800" + s[1:], lambda s: s + " ", lambda s: " " + s, lambda s: s + "\t", lambda s: s.upper(),
    lambda s: s + "é", lambda s: s + "\x1b", lambda s: s + "\x7f", lambda s: (s * 300)[:201] + "\n", lambda s: "",
    lambda s: s * 60,
]
INT_NEAR_MISSES = [-1, 10, 10**20, -(10**20), True, False, True, False, 5.0, float("nan"), "10", "-1", "²", "٣",
                   "5 ", " high", "urgent", b"5", None]


def near_miss(name: str) -> st.SearchStrategy[Any]:
    base = VALID_VALUES[name].map(lambda v: v if isinstance(v, str) else "haiku" if name == "tier" else "k1")
    if name == "priority":
        base = st.sampled_from(["low", "normal", "high", "5"])
        return st.one_of(st.sampled_from(INT_NEAR_MISSES),
                         st.tuples(base, st.sampled_from(STRING_MUTATIONS)).map(lambda t: t[1](t[0])))
    return st.tuples(base, st.sampled_from(STRING_MUTATIONS)).map(lambda t: t[1](t[0]))


_ABSENT = object()


@st.composite
def bad_value(draw, name: str) -> Any:
    """A value that is probably wrong for the field: a near miss, nasty text, a huge string, junk or
    nothing at all (the model decides; junk such as ``None`` for ``tier`` may still be valid)."""
    kind = draw(st.integers(0, 6))
    return draw([near_miss(name), near_miss(name), near_miss(name), nasty_text, huge_text, junk,
                 st.just(_ABSENT)][kind])


@st.composite
def mixed_value(draw, name: str) -> Any:
    """Mostly valid, sometimes :func:`bad_value` (for calls with faults anywhere)."""
    return draw(VALID_VALUES[name]) if draw(st.integers(0, 3)) < 3 else draw(bad_value(name))


unknown_str_key = st.one_of(st.sampled_from(["colour", "run_id", "Role", "prompt ", "requests", "tiers"]),
                            nasty_text, huge_text).filter(lambda k: k not in FIELDS and k != "self")
unknown_key = st.one_of(unknown_str_key, st.integers(), st.none(), st.just(b"role"), st.tuples(st.integers()))

#: What a call gets wrong: nothing (None), exactly one thing, or anything anywhere ("chaos"). Each
#: test runs once per fault: one fault at a time keeps every check visible (with several, the
#: first one found hides the rest), and a fixed share per fault keeps rare ones from going unseen.
FIELD_FAULTS = [*FIELDS, "unknown_key", "run_id"]
SUBMIT_FAULTS = [None, *FIELD_FAULTS, "chaos"]
SUBMIT_MANY_FAULTS = [None, *FIELD_FAULTS, "item", "container", "chaos"]


@st.composite
def request_mapping(draw, *, fault: str | None, str_keys_only: bool = False) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name in FIELDS:
        if fault == "chaos":
            v = draw(mixed_value(name))
        elif fault == name:
            v = draw(bad_value(name))
        else:
            v = draw(VALID_VALUES[name])
        if v is not _ABSENT and (name in ("role", "prompt") or fault == name or draw(st.integers(0, 3)) > 0):
            out[name] = v
    if fault == "unknown_key" or (fault == "chaos" and draw(st.integers(0, 5)) == 5):
        out[draw(unknown_str_key if str_keys_only else unknown_key)] = draw(st.one_of(nasty_text, junk))
    return out


@st.composite
def request_item(draw, *, fault: str | None) -> Any:
    if fault == "item":
        return draw(st.one_of(junk, nasty_text, st.lists(st.tuples(st.sampled_from(FIELDS), st.text(max_size=3)),
                                                         max_size=2)))
    fields = draw(request_mapping(fault=fault))
    return types.MappingProxyType(fields) if draw(st.integers(0, 9)) == 9 else fields  # any Mapping is a request


@dataclass(frozen=True)
class RequestsArg:
    """A ``requests`` argument: how to build it (generators are single-use) and the model's verdict."""

    kind: str
    items: list[Any]

    def build(self) -> Any:
        return {
            "list": lambda: list(self.items), "tuple": lambda: tuple(self.items),
            "generator": lambda: (x for x in self.items), "iterator": lambda: iter(list(self.items)),
            "empty": lambda: [], "too_many": lambda: list(self.items), "none": lambda: None,
            "str": lambda: "role=researcher prompt=hi", "bytes": lambda: b'[{"role": "researcher"}]',
            "int": lambda: 3, "mapping": lambda: self.items[0], "set": lambda: {1, 2},
        }[self.kind]()

    def errors(self) -> set[str]:
        if self.kind in ("list", "tuple", "generator", "iterator"):
            return set().union(*(item_errors(i) for i in self.items))
        return {"requests"}


@st.composite
def requests_arg(draw, *, fault: str | None) -> RequestsArg:
    if fault == "container":
        kind = draw(st.sampled_from(["empty", "too_many", "none", "str", "bytes", "int", "mapping", "set",
                                     "empty", "too_many"]))
        if kind == "too_many":
            return RequestsArg(kind, [{"role": "researcher", "prompt": f"n{i}"} for i in range(CAP + 1)])
        if kind == "mapping":
            return RequestsArg(kind, [draw(request_mapping(fault=None))])
        return RequestsArg(kind, [])
    kind = draw(st.sampled_from(["list", "list", "list", "tuple", "generator", "iterator"]))
    n = draw(st.integers(1, 4))
    bad = draw(st.integers(0, n - 1))  # the one request that carries the fault
    per_item = [fault if fault == "chaos" or i == bad else None for i in range(n)]
    return RequestsArg(kind, [draw(request_item(fault=f)) for f in per_item])


# --- the harness: call, then check the outcome against the model and the services ---------------

QUEUE_KEYS = [priority_list(queue_for_tier(t), p) for t in TIERS for p in range(10)]
_bad_run_ids = st.one_of(st.uuids().map(str), st.sampled_from(["RUN\n", " RUN", "RUNx"]), nasty_text, huge_text, junk)
#: For "chaos" calls: mostly no run, else the real one or a bad one.
_run_id_values = st.integers(0, 9).flatmap(
    lambda k: st.none() if k < 6 else st.just("RUN") if k < 8 else _bad_run_ids)


@dataclass
class Harness:
    client: Any
    engine: Any
    redis: Any
    run_id: str
    calls: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"recorded": 0, "refused": 0})

    def draw_run_id(self, data: st.DataObject, *, fault: str | None) -> Any:
        strategy = {"run_id": _bad_run_ids, "chaos": _run_id_values}.get(fault, st.sampled_from([None, "RUN"]))
        v = data.draw(strategy, label="run_id")
        if isinstance(v, str) and v.strip("\n x") == "RUN":
            return v.replace("RUN", self.run_id)
        return v

    def run_id_errors(self, run_id: Any) -> set[str]:
        return set() if run_id is None or (type(run_id) is str and run_id == self.run_id) else {"run_id"}

    def _snapshot(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM requests")).scalar_one()
        return rows, waiting_messages(self.redis)  # queued or staged for dispatch

    def _rows(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        t = Request.__table__.c
        cols = [t.id, t.role, t.prompt, t.priority, t.tenant, t.idempotency_key, t.tier_requested, t.run_id,
                t.status]
        with self.engine.connect() as conn:
            return {r.id: r._asdict() for r in conn.execute(select(*cols).where(t.id.in_(list(ids))))}

    def _existing_keys(self, items: list[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
        keys = {i.get("idempotency_key") for i in items} - {None}
        if not keys:
            return {}
        t = Request.__table__.c
        with self.engine.connect() as conn:
            q = select(t.tenant, t.idempotency_key, t.id).where(t.idempotency_key.in_(keys))
            return {(r.tenant, r.idempotency_key): r.id for r in conn.execute(q)}

    def check(self, call: Callable[[], Any], *, items: list[Any], errors: set[str], run_id: Any) -> None:
        """Make one call and hold its outcome against the model (``errors``) and the services."""
        valid = not errors
        existing = self._existing_keys(items) if valid else {}
        before = self._snapshot()
        self.calls += 1
        try:
            result = call()
        except InvalidRequest as exc:
            self.outcomes["refused"] += 1
            msg, fld = str(exc), exc.field
            assert not valid, f"a valid call was refused: {msg[:500]!r}"
            assert self._snapshot() == before, "an InvalidRequest call wrote a row or queued a message"
            assert len(msg) <= MESSAGE_MAX, f"message of {len(msg)} characters: {msg[:200]!r}..."
            assert "\x00" not in msg and msg.isprintable(), f"unprintable message {msg[:200]!r}"
            msg.encode("utf-8")
            assert isinstance(fld, str) and 0 < len(fld) <= 100 and fld.isprintable(), f"field {fld!r}"
            assert UNKNOWN in errors or fld in errors, f"{fld!r} named, the bad ones are {sorted(errors)}: {msg!r}"
            return
        self.outcomes["recorded"] += 1
        assert valid, f"invalid call (bad: {sorted(errors)}) was accepted: {result!r}"[:2000]
        handles = result if isinstance(result, list) else [result]
        assert len(handles) == len(items)
        expected_new: dict[str, dict[str, Any]] = {}
        seen = dict(existing)
        for item, h in zip(items, handles, strict=True):
            want = expected_row(item, run_id)
            pair = (want["tenant"], want["idempotency_key"])
            if want["idempotency_key"] is not None and pair in seen:
                assert not h.created and h.id == seen[pair], "a repeated idempotency key made a new request"
                continue
            assert h.created and h.id not in expected_new
            assert (h.tier, h.priority) == (want["tier_requested"], want["priority"])
            expected_new[h.id] = want
            if want["idempotency_key"] is not None:
                seen[pair] = h.id
        rows = self._rows([h.id for h in handles])
        for rid, want in expected_new.items():
            got = {k: v for k, v in rows[rid].items() if k != "id"}
            assert got == want, f"row {rid} differs from what was submitted"
        for h in handles:
            assert h.id in rows
        after = self._snapshot()
        assert after == (before[0] + len(expected_new), before[1] + len(expected_new))


@pytest.fixture
def harness(fleet_env, redis, db):
    from tars_tasks.client import TarsClient

    settings_ = make_settings(fleet_env, max_queue_depth=0, max_prompt_chars=MAX_PROMPT, max_requests_per_call=CAP)
    client = TarsClient(settings=settings_)
    run_id = str(uuid.uuid4())
    with db.begin() as conn:
        conn.execute(Run.__table__.insert().values(id=run_id, name="fuzz", scenario=None, config={},
                                                   started_at=datetime.now(UTC)))
    yield Harness(client=client, engine=db, redis=redis, run_id=run_id)
    client.close()


def _fuzz(max_examples: int):
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


#: Examples (= calls) per fault: 10*60 + 12*70 + 22*20 + 12*40 = 2,360 calls in all.
PER_FAULT = {"client.submit": 60, "client.submit_many": 70, "module": 20, "coordinator": 40}
_ids = {"ids": lambda f: f or "valid"}


def _submit_call(h: Harness, fn: Callable[..., Any], data: st.DataObject, fault: str | None) -> None:
    kwargs = data.draw(request_mapping(fault=fault, str_keys_only=True), label="kwargs")
    kwargs.pop("run_id", None)
    run_id = h.draw_run_id(data, fault=fault)
    if run_id is not None or data.draw(st.booleans(), label="pass run_id=None"):
        kwargs["run_id"] = run_id
    item = {k: v for k, v in kwargs.items() if k != "run_id"}
    h.check(lambda: fn(**kwargs), items=[item], errors=item_errors(item) | h.run_id_errors(run_id), run_id=run_id)


def _submit_many_call(h: Harness, fn: Callable[..., Any], data: st.DataObject, fault: str | None,
                      **extra: Any) -> None:
    arg = data.draw(requests_arg(fault=fault), label="requests")
    run_id = h.draw_run_id(data, fault=fault)
    h.check(lambda: fn(arg.build(), run_id=run_id, **extra), items=arg.items,
            errors=arg.errors() | h.run_id_errors(run_id), run_id=run_id)


def _exercised(h: Harness, fault: str | None, examples: int) -> None:
    """Every example made its call, and the fault (if any) was refused at least once."""
    assert h.calls >= examples
    if fault is None:
        assert h.outcomes["recorded"] == h.calls
    elif fault != "chaos":
        assert h.outcomes["refused"] > 0


@pytest.mark.parametrize("fault", SUBMIT_FAULTS, **_ids)
def test_client_submit_records_exactly_what_was_submitted_or_raises_invalid_request(harness, fault):
    @_fuzz(PER_FAULT["client.submit"])
    @given(st.data())
    def one_call(data):
        _submit_call(harness, harness.client.submit, data, fault)

    one_call()
    _exercised(harness, fault, PER_FAULT["client.submit"])


@pytest.mark.parametrize("fault", SUBMIT_MANY_FAULTS, **_ids)
def test_client_submit_many_records_exactly_what_was_submitted_or_raises_invalid_request(harness, fault):
    @_fuzz(PER_FAULT["client.submit_many"])
    @given(st.data())
    def one_call(data):
        _submit_many_call(harness, harness.client.submit_many, data, fault)

    one_call()
    _exercised(harness, fault, PER_FAULT["client.submit_many"])


@pytest.mark.parametrize(("function", "fault"), [("submit", f) for f in SUBMIT_FAULTS]
                         + [("submit_many", f) for f in SUBMIT_MANY_FAULTS])
def test_module_level_submit_and_submit_many_record_or_raise_invalid_request(harness, monkeypatch, function, fault):
    import tars_tasks

    monkeypatch.setattr(tars_tasks, "_default_client", harness.client)
    call = _submit_many_call if function == "submit_many" else _submit_call

    @_fuzz(PER_FAULT["module"])
    @given(st.data())
    def one_call(data):
        call(harness, getattr(tars_tasks, function), data, fault)

    one_call()
    _exercised(harness, fault, PER_FAULT["module"])


@pytest.mark.parametrize("fault", SUBMIT_MANY_FAULTS, **_ids)
def test_coordinator_submit_many_records_or_raises_invalid_request(harness, fault):
    @_fuzz(PER_FAULT["coordinator"])
    @given(st.data())
    def one_call(data):
        _submit_many_call(harness, harness.client.coordinator.submit_many, data, fault, reply_to=None)

    one_call()
    _exercised(harness, fault, PER_FAULT["coordinator"])


# --- the cases the outside check of issue #8 reported, as fixed examples ----------------------------

ISSUE_8_CASES = [
    ("nul in prompt", lambda c, run: c.submit(role="researcher", prompt="a\x00b"), "prompt"),
    ("lone surrogate in prompt", lambda c, run: c.submit(role="researcher", prompt="a\ud800b"), "prompt"),
    ("nul in tenant", lambda c, run: c.submit(role="researcher", prompt="p", tenant="acme\x00"), "tenant"),
    ("trailing newline fills the tenant column",
     lambda c, run: c.submit(role="researcher", prompt="p", tenant="t" * 100 + "\n"), "tenant"),
    ("trailing newline fills the key column",
     lambda c, run: c.submit(role="researcher", prompt="p", idempotency_key="k" * 200 + "\n"), "idempotency_key"),
    ("unknown run_id", lambda c, run: c.submit(role="researcher", prompt="p", run_id=str(uuid.uuid4())), "run_id"),
    ("malformed run_id", lambda c, run: c.submit(role="researcher", prompt="p", run_id=run + "\n"), "run_id"),
    ("submit_many(None)", lambda c, run: c.submit_many(None), "requests"),
    ("submit_many of a str", lambda c, run: c.submit_many("researcher"), "requests"),
    ("submit_many of a generator of ints", lambda c, run: c.submit_many(i for i in range(3)), "requests"),
    ("submit_many([])", lambda c, run: c.submit_many([]), "requests"),
    ("a 200 kB role", lambda c, run: c.submit(role="r" * 200_000, prompt="p"), "role"),
    ("a 200 kB unknown priority", lambda c, run: c.submit(role="researcher", prompt="p", priority="9" * 200_000),
     "priority"),
    ("bytes for a prompt", lambda c, run: c.submit(role="researcher", prompt=b"hi"), "prompt"),
    ("a bool priority", lambda c, run: c.submit(role="researcher", prompt="p", priority=True), "priority"),
    ("an unknown keyword", lambda c, run: c.submit(role="researcher", prompt="p", colour="red"), "colour"),
    ("no role", lambda c, run: c.submit(prompt="p"), "role"),
]


@pytest.mark.parametrize(("call", "field"), [c[1:] for c in ISSUE_8_CASES], ids=[c[0] for c in ISSUE_8_CASES])
def test_the_inputs_issue_8_found_are_refused_naming_the_field_with_nothing_written(harness, call, field):
    before = harness._snapshot()
    with pytest.raises(InvalidRequest) as info:
        call(harness.client, harness.run_id)
    assert info.value.field == field
    assert len(str(info.value)) <= MESSAGE_MAX and str(info.value).isprintable()
    assert harness._snapshot() == before == (0, 0)


def test_a_run_id_is_recorded_when_the_run_exists(harness):
    h = harness.client.submit(role="researcher", prompt="p", run_id=harness.run_id)
    assert harness._rows([h.id])[h.id]["run_id"] == harness.run_id


def test_looking_up_a_run_with_postgres_unreachable_is_database_unavailable(fleet_env):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import DatabaseUnavailable
    from tests.helpers import free_port

    dead = f"postgresql://postgres@127.0.0.1:{free_port(low=22000, high=22999)}/nowhere"
    client = TarsClient(settings=make_settings({**fleet_env, "TARS_DATABASE_URL": dead}))
    try:
        with pytest.raises(DatabaseUnavailable, match="could not look up run"):
            client.coordinator.check_run(str(uuid.uuid4()))
        with pytest.raises(InvalidRequest):  # the form is checked before anything is asked of Postgres
            client.coordinator.check_run("no such\nrun")
    finally:
        client.close()
