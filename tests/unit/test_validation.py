"""Bad input is refused with a clear, typed error naming the field, quoting the value only as an excerpt."""

import enum
import itertools
import types
import uuid

import pydantic
import pytest

from config.catalog import load_catalog
from tars_tasks.db.models import Request
from tars_tasks.errors import EXCERPT_CHARS, InvalidRequest, TarsError, excerpt
from tars_tasks.routing import route
from tars_tasks.schemas import (
    KEY_MAX_CHARS,
    ROLE_MAX_CHARS,
    RUN_ID_MAX_CHARS,
    TENANT_MAX_CHARS,
    TIER_MAX_CHARS,
    RequestSpec,
    parse_priority,
    validate_requests,
    validate_run_id,
    validate_spec,
)

CAT = load_catalog()
MAX_PROMPT = 100
#: A refusal's message stays one short line, whatever the value was.
MESSAGE_MAX = 300

#: A fixed UUID: parametrize ids must be the same in every xdist worker.
FIXED_UUID = uuid.UUID("5f0c6c8e-3d2a-4b7e-9a51-2f7e8d1c4b60")


def _spec(**fields):
    return validate_spec({"role": "researcher", "prompt": "hi", **fields}, catalog=CAT, max_prompt_chars=MAX_PROMPT)


def _route(**fields):
    return route(_spec(**fields), catalog=CAT)


def _refused(fields, *, field):
    with pytest.raises(InvalidRequest) as info:
        validate_spec(fields, catalog=CAT, max_prompt_chars=MAX_PROMPT)
    exc = info.value
    assert exc.field == field, str(exc)
    assert isinstance(exc, TarsError) and isinstance(exc, ValueError)
    msg = str(exc)
    assert len(msg) <= MESSAGE_MAX and msg.isprintable(), msg
    msg.encode("utf-8")  # no lone surrogate leaks into the message
    return msg


def _bad(field, value):
    return _refused({"role": "researcher", "prompt": "hi", field: value}, field=field)


# --- what is accepted, exactly ---------------------------------------------------------------


def test_roles_route_to_their_tiers_and_an_explicit_tier_overrides():
    assert _route(role="researcher").tier == "haiku"
    assert _route(role="engineer").tier == "sonnet"
    assert _route(role="writer", tier="opus").queue == "tars.opus"


def test_defaults_fill_in_the_optional_fields():
    spec = validate_spec({"role": "analyst", "prompt": "x"}, catalog=CAT, max_prompt_chars=10)
    assert (spec.priority, spec.tenant, spec.idempotency_key, spec.tier) == (5, "default", None, None)
    assert _spec(idempotency_key=None, tier=None).idempotency_key is None


@pytest.mark.parametrize(
    "prompt",
    ["line one\nline two\ttabbed\r\n", "\x1b[31mred\x1b[0m terminal output", "page\x0cbreak", "é😀 ünïcode",
     "\uffff\ufeff\u2028", " leading and trailing whitespace kept \n", "p" * MAX_PROMPT, "\x7f\x85\x9f"],
)
def test_a_prompt_keeps_any_text_but_nul_and_lone_surrogates_exactly_as_given(prompt):
    assert _spec(prompt=prompt).prompt == prompt


@pytest.mark.parametrize(
    ("fields", "value"),
    [({"tenant": "t" * TENANT_MAX_CHARS}, "t" * TENANT_MAX_CHARS), ({"tenant": "a.b_c-9"}, "a.b_c-9"),
     ({"idempotency_key": "k" * KEY_MAX_CHARS}, "k" * KEY_MAX_CHARS), ({"idempotency_key": "a:b.c_d-1"}, "a:b.c_d-1")],
)
def test_tenants_and_keys_up_to_their_column_size_are_accepted(fields, value):
    assert value in _spec(**fields).model_dump().values()


def test_priority_names_digits_and_integers():
    assert [parse_priority(p) for p in ("low", "normal", "HIGH", "High", 0, 9, "7", "0")] == [0, 5, 9, 9, 0, 9, 7, 0]

    class Level(enum.IntEnum):
        URGENT = 9

    assert _spec(priority=Level.URGENT).priority == 9 and type(_spec(priority=Level.URGENT).priority) is int


def test_a_str_subclass_is_taken_as_its_plain_value():
    class Role(enum.StrEnum):
        RESEARCHER = "researcher"

    spec = _spec(role=Role.RESEARCHER, tenant=Role.RESEARCHER)
    assert type(spec.role) is str and spec.role == "researcher" and type(spec.tenant) is str


def test_any_mapping_is_a_request_and_a_request_spec_is_checked_again():
    spec = validate_spec(types.MappingProxyType({"role": "writer", "prompt": "p"}), catalog=CAT, max_prompt_chars=10)
    assert spec.role == "writer"
    assert validate_spec(spec, catalog=CAT, max_prompt_chars=10) == spec
    forged = RequestSpec.model_construct(role="writer", prompt="p", priority=5, tenant="bad\n",
                                         idempotency_key=None, tier=None)
    with pytest.raises(InvalidRequest, match="tenant") as info:
        validate_spec(forged, catalog=CAT, max_prompt_chars=10)
    assert info.value.field == "tenant"


def test_constructing_a_request_spec_applies_the_same_checks():
    assert RequestSpec(role="writer", prompt="p", priority="high").priority == 9
    with pytest.raises(pydantic.ValidationError, match="NUL"):
        RequestSpec(role="writer", prompt="a\x00b")
    with pytest.raises(pydantic.ValidationError, match="tenant"):
        RequestSpec(role="writer", prompt="p", tenant="acme\n")


def test_the_limits_are_the_column_sizes_of_requests():
    c = Request.__table__.c
    assert (ROLE_MAX_CHARS, TIER_MAX_CHARS, TENANT_MAX_CHARS, KEY_MAX_CHARS, RUN_ID_MAX_CHARS) == (
        c.role.type.length, c.tier_requested.type.length, c.tenant.type.length, c.idempotency_key.type.length,
        c.run_id.type.length) == (50, 20, 100, 200, 36)


# --- what is refused, and how ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"role": "astronaut"}, "role", "unknown role 'astronaut'"),
        ({"tier": "gpt"}, "tier", "unknown tier 'gpt'"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": "   \n\t"}, "prompt", "prompt is empty"),
        ({"prompt": "x" * (MAX_PROMPT + 1)}, "prompt", "limit is 100"),
        ({"priority": -1}, "priority", "out of range"),
        ({"priority": 10}, "priority", "out of range"),
        ({"priority": "urgent"}, "priority", "unknown priority"),
        ({"priority": True}, "priority", "got bool"),
        ({"idempotency_key": "has space"}, "idempotency_key", "idempotency_key"),
        ({"idempotency_key": ""}, "idempotency_key", "idempotency_key"),
        ({"idempotency_key": "k" * 201}, "idempotency_key", "201 characters; the limit is 200"),
        ({"tenant": "a/b"}, "tenant", "tenant"),
        ({"tenant": ""}, "tenant", "tenant"),
        ({"tenant": "t" * 101}, "tenant", "101 characters; the limit is 100"),
        ({"colour": "red"}, "colour", "unknown field 'colour'"),
        ({"prompt": 42}, "prompt", "prompt must be a string, got int 42"),
    ],
)
def test_bad_input_raises_invalid_request_naming_the_field(fields, field, message):
    msg = _refused({"role": "researcher", "prompt": "hi", **fields}, field=field)
    assert message in msg


@pytest.mark.parametrize("field", ["role", "prompt", "tenant", "idempotency_key", "tier"])
@pytest.mark.parametrize("bad", ["\x00", "\ud800", "\udfff"])
def test_nul_and_lone_surrogates_are_refused_in_every_text_field(field, bad):
    value = {"role": "researcher", "prompt": "hi", "tenant": "acme", "idempotency_key": "k1", "tier": "haiku"}[field]
    msg = _bad(field, value[:2] + bad + value[2:])
    assert "\\x00" in msg or "\\ud" in msg  # the character is shown escaped


@pytest.mark.parametrize("field", ["role", "tenant", "idempotency_key", "tier"])
@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x0b"])
def test_control_characters_are_refused_in_names_and_keys(field, control):
    value = {"role": "researcher", "tenant": "acme", "idempotency_key": "k1", "tier": "haiku"}[field]
    _bad(field, value + control)
    _bad(field, control + value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tenant", "acme\n"), ("tenant", "t" * 100 + "\n"), ("idempotency_key", "k1\n"),
     ("idempotency_key", "k" * 200 + "\n"), ("role", "researcher\n"), ("tier", "haiku\n"), ("priority", "high\n"),
     ("priority", "5\n"), ("tenant", "acme\r\n")],
)
def test_a_trailing_newline_is_refused_not_ignored(field, value):
    _bad(field, value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("role", "r" * 51), ("tier", "t" * 21), ("tenant", "t" * 101), ("idempotency_key", "k" * 201),
     ("prompt", "p" * (MAX_PROMPT + 1)), ("role", "r" * 200_000), ("tenant", "t" * 200_000),
     ("idempotency_key", "\x00" * 200_000), ("tier", "é" * 200_000), ("prompt", "p" * 200_000),
     ("priority", "h" * 200_000)],
)
def test_over_long_values_are_refused_with_a_short_message(field, value):
    assert len(_bad(field, value)) <= MESSAGE_MAX


@pytest.mark.parametrize("field", ["role", "prompt", "tenant"])
@pytest.mark.parametrize("value", [None, b"researcher", 5, 5.0, ["researcher"], {"a": 1}, FIXED_UUID, True, object()])
def test_a_string_field_refuses_every_other_type(field, value):
    msg = _bad(field, value)
    assert "must be a string" in msg


@pytest.mark.parametrize("field", ["idempotency_key", "tier"])
@pytest.mark.parametrize("value", [b"k1", 5, False, ["k1"]])
def test_an_optional_string_field_takes_none_or_a_string_only(field, value):
    _bad(field, value)


@pytest.mark.parametrize(
    "value", [None, True, False, 5.0, float("nan"), "", " 5", "5 ", "10", "-1", "٣", "²", "high\n", b"high", [5],
              10**100, -(10**100)],
)
def test_priority_refuses_everything_but_0_to_9_and_the_names(value):
    _bad("priority", value)


@pytest.mark.parametrize(
    ("key", "field"),
    [("colour", "colour"), ("Role", "Role"), ("prompt ", "prompt "), (5, "5"), (None, "None"), (b"role", "b'role'"),
     ("x" * 10_000, None), ("\x00", "'\\x00'")],
)
def test_unknown_fields_are_refused_naming_them_briefly(key, field):
    with pytest.raises(InvalidRequest, match="unknown field") as info:
        validate_spec({"role": "researcher", "prompt": "hi", key: 1}, catalog=CAT, max_prompt_chars=MAX_PROMPT)
    assert len(str(info.value)) <= MESSAGE_MAX
    assert info.value.field == field if field is not None else len(info.value.field) <= 40


@pytest.mark.parametrize("missing", ["role", "prompt"])
def test_role_and_prompt_are_required(missing):
    fields = {"role": "researcher", "prompt": "hi"}
    del fields[missing]
    assert f"{missing} is required" in _refused(fields, field=missing)


@pytest.mark.parametrize("item", [["researcher", "hi"], "researcher", b"{}", None, 5, [("role", "researcher")]])
def test_a_non_mapping_request_is_refused(item):
    with pytest.raises(InvalidRequest, match="request #3: expected a mapping") as info:
        validate_spec(item, index=3, catalog=CAT, max_prompt_chars=MAX_PROMPT)  # type: ignore[arg-type]
    assert (info.value.field, info.value.index) == ("requests", 3)


def test_an_index_prefixes_the_message_and_is_kept_on_the_error():
    with pytest.raises(InvalidRequest, match=r"^request #7: tenant") as info:
        validate_spec({"role": "researcher", "prompt": "hi", "tenant": "x y"}, catalog=CAT, max_prompt_chars=10,
                      index=7)
    assert (info.value.field, info.value.index) == ("tenant", 7)


# --- the container and the run id ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "message"),
    [(None, "got None"), ("researcher", "got str"), (b"[]", "got bytes"), (bytearray(b"x"), "got bytearray"),
     (5, "got int"), ({"role": "researcher", "prompt": "hi"}, "not one mapping"), ([], "empty"), ((), "empty"),
     (iter([]), "empty"), ((x for x in []), "empty")],
)
def test_submit_many_takes_a_non_empty_iterable_of_mappings(requests, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        validate_requests(requests, max_requests=10)
    assert info.value.field == "requests"


def test_a_generator_is_consumed_at_most_one_past_the_cap():
    counter = itertools.count()
    with pytest.raises(InvalidRequest, match="more than 10 requests in one call") as info:
        validate_requests(({"n": next(counter)} for _ in itertools.repeat(None)), max_requests=10)
    assert info.value.field == "requests"
    assert next(counter) == 11  # 11 items taken from an endless generator, not all of it
    assert len(validate_requests(({"n": i} for i in range(10)), max_requests=10)) == 10
    items = [{"role": "researcher", "prompt": "p"}]
    assert validate_requests(items, max_requests=1) is items
    assert validate_requests(tuple(items), max_requests=1) == items


@pytest.mark.parametrize("run_id", [None, str(FIXED_UUID), "run-2026.01:a_b"])
def test_a_well_formed_run_id(run_id):
    assert validate_run_id(run_id) == run_id


@pytest.mark.parametrize(
    "run_id", ["", "x" * 37, str(FIXED_UUID) + "\n", " abc", "a b", "a\x00", "\ud800", 5, FIXED_UUID, b"abc",
               True, ["abc"]],
)
def test_a_malformed_run_id_is_refused(run_id):
    with pytest.raises(InvalidRequest, match="run_id") as info:
        validate_run_id(run_id)
    assert info.value.field == "run_id" and len(str(info.value)) <= MESSAGE_MAX


# --- excerpts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["a" * 200_000, "ab\x00c\n", "\ud800x", b"\x00" * 500, None, 10**100, list(range(1000)),
              {"k": "v" * 10_000}, object(), "é😀", "\x85\u2028", "x" * EXCERPT_CHARS],
)
def test_an_excerpt_is_short_printable_and_encodable(value):
    e = excerpt(value)
    assert 0 < len(e) <= EXCERPT_CHARS and e.isprintable()
    e.encode("utf-8")


def test_an_excerpt_escapes_and_marks_the_cut():
    assert excerpt("acme\n") == "'acme\\n'"
    assert excerpt("a\x00b") == "'a\\x00b'"
    assert excerpt("a" * 1000).endswith("...") and excerpt("short") == "'short'"

    class Hostile:
        def __repr__(self):
            raise RuntimeError("no repr for you")

    class Loud:
        def __repr__(self):
            return "\x00" * 1000

    assert excerpt(Hostile()).startswith("<Hostile")
    assert "\x00" not in excerpt(Loud()) and len(excerpt(Loud())) <= EXCERPT_CHARS


