"""Bad input is refused with a clear, typed error naming the field."""

import pytest

from config.catalog import load_catalog
from tars_tasks.errors import InvalidRequest, TarsError
from tars_tasks.routing import route
from tars_tasks.schemas import parse_priority, validate_spec

CAT = load_catalog()


def _route(**fields):
    spec = validate_spec({"role": "researcher", "prompt": "hi", **fields})
    return route(spec, catalog=CAT, max_prompt_chars=100)


def test_roles_route_to_their_tiers_and_an_explicit_tier_overrides():
    assert _route(role="researcher").tier == "haiku"
    assert _route(role="engineer").tier == "sonnet"
    assert _route(role="writer", tier="opus").queue == "tars.opus"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"role": "astronaut"}, "role", "unknown role 'astronaut'"),
        ({"tier": "gpt"}, "tier", "unknown tier 'gpt'"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"prompt": "x" * 101}, "prompt", "limit is 100"),
        ({"priority": -1}, "priority", "out of range"),
        ({"priority": 10}, "priority", "out of range"),
        ({"priority": "urgent"}, "priority", "unknown priority"),
        ({"priority": True}, "priority", "priority"),
        ({"idempotency_key": "has space"}, "idempotency_key", "idempotency_key"),
        ({"idempotency_key": ""}, "idempotency_key", "idempotency_key"),
        ({"idempotency_key": "k" * 201}, "idempotency_key", "idempotency_key"),
        ({"tenant": "a/b"}, "tenant", "tenant"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"prompt": 42}, "prompt", "string"),
    ],
)
def test_bad_input_raises_invalid_request_naming_the_field(fields, field, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        _route(**fields)
    assert info.value.field == field
    assert isinstance(info.value, TarsError)


def test_priority_names_and_numbers():
    assert [parse_priority(p) for p in ("low", "normal", "HIGH", 0, 9, "7")] == [0, 5, 9, 0, 9, 7]


def test_a_non_mapping_request_is_refused():
    with pytest.raises(InvalidRequest, match="expected a mapping"):
        validate_spec(["researcher", "hi"], index=3)  # type: ignore[arg-type]
