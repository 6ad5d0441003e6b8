"""The model request beyond the prompt — system, messages, max_tokens, temperature, stop,
response_format, metadata — is validated by ``validate_spec`` like every other field: a clear
``InvalidRequest`` naming the field, a short printable message, no traceback; valid input is kept
exactly, and the role's defaults fill in what the producer left out when the request is recorded."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.catalog import load_catalog
from config.request_limits import JSON_INSTRUCTION
from tars_tasks.errors import InvalidRequest
from tars_tasks.messages import SPEC_FIELDS
from tars_tasks.schemas import FIELDS, MODEL_FIELDS, RequestSpec, request_columns, validate_spec
from workers.providers.request import ModelRequest

CAT = load_catalog()
MAX = 500
MESSAGE_MAX = 300


def _ok(**fields):
    return validate_spec({"role": "researcher", **fields}, catalog=CAT, max_prompt_chars=MAX)


def _refused(*, field: str, **fields) -> str:
    with pytest.raises(InvalidRequest) as info:
        validate_spec({"role": "researcher", **fields}, catalog=CAT, max_prompt_chars=MAX)
    exc = info.value
    assert exc.field == field, f"{exc.field}: {exc}"
    msg = str(exc)
    assert len(msg) <= MESSAGE_MAX and msg.isprintable(), msg
    msg.encode("utf-8")
    assert "Traceback" not in msg
    return msg


def _turns(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"turn {i} from the {r}"} for i, r in enumerate(roles)]


# --- accepted, exactly ---------------------------------------------------------------------------


def test_every_model_field_is_kept_as_given():
    spec = _ok(prompt="And now?", system="Be brief.", messages=_turns("user", "assistant"), max_tokens=300,
               temperature=0.25, stop=["END", "\n\nHuman:"], response_format="json",
               metadata={"user_id": "u-42", "ticket": "OPS-7"})
    assert spec.system == "Be brief." and spec.max_tokens == 300 and spec.temperature == 0.25
    assert spec.messages == tuple(_turns("user", "assistant")) and spec.prompt == "And now?"
    assert spec.stop == ("END", "\n\nHuman:") and spec.response_format == "json"
    assert spec.metadata == {"user_id": "u-42", "ticket": "OPS-7"}


def test_a_conversation_may_be_given_as_messages_alone_ending_with_a_user_turn():
    spec = _ok(messages=_turns("user", "assistant", "user"))
    assert spec.prompt is None
    req = ModelRequest.from_fields(**{f: getattr(spec, f) for f in ("prompt", "messages", "system")})
    assert [t["role"] for t in req.turns] == ["user", "assistant", "user"]


def test_the_prompt_is_appended_as_the_last_user_turn():
    spec = _ok(prompt="third", messages=_turns("user", "assistant"))
    req = ModelRequest.from_fields(prompt=spec.prompt, messages=spec.messages)
    assert req.turns[-1] == {"role": "user", "content": "third"} and len(req.turns) == 3


def test_text_blocks_are_accepted_as_content():
    blocks = [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]
    spec = _ok(messages=[{"role": "user", "content": blocks}])
    assert spec.messages[0]["content"] == blocks


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5, 0.999])
def test_temperature_takes_ints_and_floats_in_range(value):
    assert _ok(prompt="hi", temperature=value).temperature == float(value)


def test_one_stop_string_is_one_sequence_and_an_empty_list_is_none():
    assert _ok(prompt="hi", stop="STOP").stop == ("STOP",)
    assert _ok(prompt="hi", stop=[]).stop == ()


def test_an_empty_system_means_no_system_prompt_not_even_the_roles():
    spec = _ok(prompt="hi", system="")
    assert request_columns(spec, catalog=CAT)["system"] == ""
    assert ModelRequest.from_fields(prompt="hi", system="").system_text() is None


def test_a_request_spec_passed_in_is_checked_again_and_validation_is_idempotent():
    spec = _ok(prompt="hi", messages=_turns("user", "assistant"), stop="X", metadata={"a": "b"})
    assert validate_spec(spec, catalog=CAT, max_prompt_chars=MAX) == spec
    bad = RequestSpec.model_construct(**{**spec.__dict__, "temperature": 7.0})
    with pytest.raises(InvalidRequest) as info:
        validate_spec(bad, catalog=CAT, max_prompt_chars=MAX)
    assert info.value.field == "temperature"


# --- role defaults -------------------------------------------------------------------------------


def test_the_roles_defaults_fill_in_what_the_request_leaves_out_when_it_is_recorded():
    spec = _ok(prompt="check this")
    assert spec.system is None  # the spec holds what the producer gave
    cols = request_columns(validate_spec({"role": "validator", "prompt": "check this"}, catalog=CAT,
                                         max_prompt_chars=MAX), catalog=CAT)
    d = CAT.defaults_for("validator")
    assert cols["system"] == d.system and cols["max_tokens"] == d.max_tokens == 512
    assert cols["temperature"] == 0.0 and cols["response_format"] == "json"
    req = ModelRequest.from_fields(prompt="check this", system=cols["system"], response_format="json")
    assert req.system_text().endswith(JSON_INSTRUCTION)


def test_a_requests_own_fields_win_over_the_roles_defaults():
    spec = validate_spec({"role": "writer", "prompt": "p", "system": "Mine.", "max_tokens": 50, "temperature": 1,
                          "response_format": "text", "stop": []}, catalog=CAT, max_prompt_chars=MAX)
    cols = request_columns(spec, catalog=CAT)
    assert (cols["system"], cols["max_tokens"], cols["temperature"], cols["response_format"], cols["stop"]) == (
        "Mine.", 50, 1.0, "text", [])


def test_every_seed_role_has_a_system_prompt_and_an_output_limit():
    for role in ("researcher", "analyst", "engineer", "writer", "validator"):
        d = CAT.defaults_for(role)
        assert d.system and d.system.strip() and d.max_tokens
        assert d.max_tokens >= CAT.spec(CAT.roles[role]).output_tokens[1]  # the defaults cap no simulated answer


def test_a_plain_celery_message_may_carry_every_field_submit_takes():
    assert SPEC_FIELDS == set(FIELDS)
    assert set(MODEL_FIELDS) <= set(FIELDS)


# --- refused ---------------------------------------------------------------------------------------

CASES = [
    # (field, fields, part of the message)
    ("prompt", {}, "prompt is required"),
    ("prompt", {"messages": None}, "prompt is required"),
    ("system", {"prompt": "p", "system": 5}, "system must be a string"),
    ("system", {"prompt": "p", "system": b"sys"}, "system must be a string"),
    ("system", {"prompt": "p", "system": "   \n"}, "only whitespace"),
    ("system", {"prompt": "p", "system": "a\x00b"}, "NUL"),
    ("system", {"prompt": "p", "system": "a\ud800b"}, "lone surrogate"),
    ("system", {"prompt": "p", "system": "s" * (MAX + 1)}, "TARS_MAX_PROMPT_CHARS"),
    ("messages", {"messages": "hello"}, "messages must be a list"),
    ("messages", {"messages": {"role": "user", "content": "x"}}, "messages must be a list"),
    ("messages", {"messages": []}, "messages is empty"),
    ("messages", {"messages": ["hello"]}, "messages[0] must be a mapping"),
    ("messages", {"messages": [{"role": "user"}]}, "missing content"),
    ("messages", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "unknown"),
    ("messages", {"messages": [{"role": "system", "content": "x"}]}, "give the system prompt as system"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}]}, "'user' or 'assistant'"),
    ("messages", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content is empty"),
    ("messages", {"messages": [{"role": "user", "content": "  "}]}, "only whitespace"),
    ("messages", {"messages": [{"role": "user", "content": 7}]}, "text or a list of text blocks"),
    ("messages", {"messages": [{"role": "user", "content": []}]}, "empty list of blocks"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "text block"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]}, "no text"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\x00"}]}]}, "NUL"),
    ("messages", {"messages": [{"role": "user", "content": "a\udfff"}]}, "lone surrogate"),
    ("messages", {"messages": _turns("assistant", "user")}, "messages[0] must be a user turn"),
    ("messages", {"messages": _turns("user", "assistant")}, "end with a user turn"),
    ("messages", {"messages": [{"role": "user", "content": "m" * (MAX + 1)}]}, "TARS_MAX_PROMPT_CHARS"),
    ("messages", {"prompt": "p" * 300, "messages": [{"role": "user", "content": "m" * 201}]}, "together"),
    ("messages", {"messages": _turns(*["user"] * 1001)}, "the limit is 1000"),
    ("max_tokens", {"prompt": "p", "max_tokens": 0}, ">= 1"),
    ("max_tokens", {"prompt": "p", "max_tokens": -5}, ">= 1"),
    ("max_tokens", {"prompt": "p", "max_tokens": True}, "integer"),
    ("max_tokens", {"prompt": "p", "max_tokens": 10.0}, "integer"),
    ("max_tokens", {"prompt": "p", "max_tokens": "100"}, "integer"),
    ("max_tokens", {"prompt": "p", "max_tokens": 64_001}, "max_output_tokens"),
    ("temperature", {"prompt": "p", "temperature": 1.5}, "out of range"),
    ("temperature", {"prompt": "p", "temperature": -0.1}, "out of range"),
    ("temperature", {"prompt": "p", "temperature": math.nan}, "out of range"),
    ("temperature", {"prompt": "p", "temperature": math.inf}, "out of range"),
    ("temperature", {"prompt": "p", "temperature": False}, "number"),
    ("temperature", {"prompt": "p", "temperature": "0.5"}, "number"),
    ("stop", {"prompt": "p", "stop": ["a", "b", "c", "d", "e"]}, "the limit is 4"),
    ("stop", {"prompt": "p", "stop": ""}, "not only whitespace"),
    ("stop", {"prompt": "p", "stop": [" \n"]}, "not only whitespace"),
    ("stop", {"prompt": "p", "stop": ["x" * 201]}, "1-200 characters"),
    ("stop", {"prompt": "p", "stop": [3]}, "must be a string"),
    ("stop", {"prompt": "p", "stop": {"a": 1}}, "string or a list"),
    ("stop", {"prompt": "p", "stop": ["a\x00"]}, "NUL"),
    ("response_format", {"prompt": "p", "response_format": "JSON"}, "one of"),
    ("response_format", {"prompt": "p", "response_format": {"type": "json_object"}}, "one of"),
    ("metadata", {"prompt": "p", "metadata": ["a"]}, "mapping"),
    ("metadata", {"prompt": "p", "metadata": {f"k{i}": "v" for i in range(17)}}, "the limit is 16"),
    ("metadata", {"prompt": "p", "metadata": {"": "v"}}, "keys must be"),
    ("metadata", {"prompt": "p", "metadata": {"k" * 65: "v"}}, "keys must be"),
    ("metadata", {"prompt": "p", "metadata": {"a\nb": "v"}}, "keys must be"),
    ("metadata", {"prompt": "p", "metadata": {1: "v"}}, "keys must be"),
    ("metadata", {"prompt": "p", "metadata": {"k": 1}}, "must be a string"),
    ("metadata", {"prompt": "p", "metadata": {"k": "v" * 513}}, "the limit is 512"),
    ("metadata", {"prompt": "p", "metadata": {"k": "\x00"}}, "NUL"),
    ("metadata", {"prompt": "p", "metadata": {"user_id": "jane@example.com"}}, "opaque id"),
    ("metadata", {"prompt": "p", "metadata": {"user_id": "u" * 65}}, "opaque id"),
]


@pytest.mark.parametrize(("field", "fields", "says"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_bad_model_field_is_refused_naming_it(field, fields, says):
    assert says in _refused(field=field, **fields)


def test_a_bad_field_in_submit_many_names_the_request():
    with pytest.raises(InvalidRequest, match=r"request #2: temperature") as info:
        validate_spec({"role": "researcher", "prompt": "p", "temperature": 3}, catalog=CAT, max_prompt_chars=MAX,
                      index=2)
    assert (info.value.field, info.value.index) == ("temperature", 2)


def test_the_default_system_prompt_is_not_counted_against_the_producers_limit():
    # A prompt of exactly the limit is accepted for a role whose default system prompt is long.
    spec = validate_spec({"role": "researcher", "prompt": "p" * MAX}, catalog=CAT, max_prompt_chars=MAX)
    assert request_columns(spec, catalog=CAT)["system"]


# --- property: whatever the input, accepted and kept, or refused naming a bad field ---------------

text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30).filter(lambda s: s.strip())
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text})
anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 70_000), st.floats(allow_nan=True),
                     st.text(max_size=8), st.binary(max_size=4), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
valid = {
    "system": st.one_of(st.just(""), text),
    "messages": st.lists(turn, min_size=1, max_size=4).map(lambda ts: [{"role": "user", "content": "first"}, *ts]),
    "max_tokens": st.integers(1, 64_000),
    "temperature": st.one_of(st.integers(0, 1), st.floats(0, 1)),
    "stop": st.one_of(text, st.lists(text, max_size=4)),
    "response_format": st.sampled_from(["text", "json"]),
    "metadata": st.dictionaries(st.text(alphabet="abcdefgh_", min_size=1, max_size=10), text, max_size=5),
}


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.sampled_from(sorted(valid)), st.data())
def test_any_single_model_field_is_kept_exactly_or_refused_naming_it(name, data):
    value = data.draw(st.one_of(valid[name], anything), label=name)
    fields = {"role": "researcher", "prompt": "p", name: value}
    try:
        spec = validate_spec(fields, catalog=CAT, max_prompt_chars=10_000)
    except InvalidRequest as exc:
        assert exc.field == name, (exc.field, str(exc))
        assert len(str(exc)) <= MESSAGE_MAX and str(exc).isprintable()
        return
    got = getattr(spec, name)
    if value is None:
        assert got is None
    elif name == "stop":
        assert got == ((value,) if isinstance(value, str) else tuple(value))
    elif name == "messages":
        assert list(got) == value
    elif name == "temperature":
        assert got == float(value) and not isinstance(value, bool)
    else:
        assert got == value and type(value) is not bool
