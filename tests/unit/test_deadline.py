"""``deadline``: how long a producer accepts to wait, parsed strictly, choosing the lane.

A deadline of at least the providers' batch window (24 h) takes the batch lane, a shorter one stays
interactive; an explicit ``interactive`` lane wins, an explicit ``batch`` lane with a deadline the
batch APIs cannot promise is refused. Every way in (``submit``'s fields, a plain-Celery message, a
job template step) goes through the same parser and the same words.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.catalog import load_catalog
from tars_tasks.errors import InvalidRequest
from tars_tasks.jobs.template import parse_template
from tars_tasks.messages import RunRequestMessage
from tars_tasks.schemas import request_columns, validate_spec

CAT = load_catalog()
DAY = 86_400
MESSAGE_MAX = 300
UNITS = {"s": 1, "m": 60, "h": 3_600, "d": DAY}


def _spec(**fields):
    return validate_spec({"role": "researcher", "prompt": "hi", **fields}, catalog=CAT, max_prompt_chars=1000)


def _refused(**fields) -> str:
    with pytest.raises(InvalidRequest) as info:
        _spec(**fields)
    msg = str(info.value)
    assert info.value.field == "deadline", msg
    assert len(msg) <= MESSAGE_MAX and msg.isprintable() and "\n" not in msg, msg
    return msg


def _parse(value):
    from tars_tasks.schemas import parse_deadline

    return parse_deadline(value)


# --- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    ("24h", DAY), ("90m", 5_400), ("2d", 2 * DAY), ("3600s", 3_600), ("3600", 3_600), ("1H", 3_600),
    ("0024h", DAY), (3_600, 3_600), (3_600.0, 3_600), (timedelta(hours=24), DAY), ("366d", 366 * DAY),
])
def test_a_deadline_is_a_duration_or_a_number_of_seconds(value, seconds):
    assert _spec(deadline=value).deadline == seconds


@pytest.mark.parametrize("value, words", [
    ("1x", "deadline '1x' has an unknown unit 'x': use s, m, h or d"),
    ("24hours", "unknown unit 'hours'"),
    ("-5", "deadline must be more than 0, got '-5'"),
    ("-1h", "deadline must be more than 0"),
    (-5, "deadline must be more than 0, got -5"),
    (0, "deadline must be more than 0"),
    ("0h", "deadline must be more than 0"),
    (timedelta(seconds=-1), "deadline must be more than 0"),
    ("", "deadline must be a duration such as 24h, 90m, 2d or 3600s, or a number of seconds; got ''"),
    ("soon", "deadline must be a duration such as 24h"),
    ("1.5h", "deadline must be a duration such as 24h"),
    (" 1h", "deadline must be a duration such as 24h"),
    ("1h\n", "deadline must be a duration such as 24h"),
    ("1 h", "deadline must be a duration such as 24h"),
    ("\u0661h", "deadline must be a duration such as 24h"),  # an Arabic-Indic digit is not a digit here
    ("h", "deadline must be a duration such as 24h"),
    (True, "got bool True"),
    (b"24h", "got bytes"),
    ([24], "got list"),
    (0.5, "deadline must be a whole number of seconds, got 0.5"),
    (float("nan"), "deadline must be a whole number of seconds"),
    (float("inf"), "deadline must be a whole number of seconds"),
    (timedelta(seconds=1.5), "deadline must be whole seconds"),
    ("367d", "deadline '367d' is more than 366d"),
    ("9" * 5_000 + "d", "is more than 366d"),  # no int() of a 5,000-digit string
    (10 ** 30, "is more than 366d"),
])
def test_anything_else_is_one_line_naming_deadline(value, words):
    assert words in _refused(deadline=value)


def test_none_is_no_deadline():
    spec = _spec(deadline=None)
    assert spec.deadline is None and spec.lane == "interactive"


@given(seconds=st.integers(min_value=1, max_value=366 * DAY), unit=st.sampled_from(sorted(UNITS)),
       upper=st.booleans())
def test_every_valid_duration_round_trips(seconds, unit, upper):
    from tars_tasks.schemas import format_deadline

    assert _parse(seconds) == seconds == _parse(str(seconds)) == _parse(float(seconds))
    assert _parse(format_deadline(seconds)) == seconds
    whole = seconds - seconds % UNITS[unit] or UNITS[unit]
    text = f"{whole // UNITS[unit]}{unit.upper() if upper else unit}"
    assert _parse(text) == whole
    assert _parse(timedelta(seconds=whole)) == whole


@given(st.one_of(st.text(), st.text(alphabet="0123456789smhdSMHDx-+. \n", max_size=30)))
def test_arbitrary_text_is_a_deadline_or_the_one_validation_error(text):
    try:
        seconds = _parse(text)
    except InvalidRequest as exc:
        msg = str(exc)
        assert exc.field == "deadline" and msg.startswith("deadline ") and len(msg) <= MESSAGE_MAX, msg
        assert msg.isprintable(), msg
    else:
        assert isinstance(seconds, int) and 0 < seconds <= 366 * DAY


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(), st.lists(st.integers()),
                 st.timedeltas(), st.dictionaries(st.text(), st.integers())))
def test_arbitrary_values_are_a_deadline_or_the_one_validation_error(value):
    try:
        seconds = _parse(value)
    except InvalidRequest as exc:
        assert exc.field == "deadline" and len(str(exc)) <= MESSAGE_MAX and str(exc).isprintable()
    else:
        assert seconds is None or 0 < seconds <= 366 * DAY


# --- the lane it chooses ------------------------------------------------------------------------


@pytest.mark.parametrize("fields, lane", [
    ({"deadline": "24h"}, "batch"),
    ({"deadline": "2d"}, "batch"),
    ({"deadline": DAY}, "batch"),
    ({"deadline": DAY - 1}, "interactive"),
    ({"deadline": "1h"}, "interactive"),
    ({"lane": "interactive", "deadline": "24h"}, "interactive"),  # an explicit interactive lane wins
    ({"lane": "interactive", "deadline": "1h"}, "interactive"),
    ({"lane": "batch", "deadline": "24h"}, "batch"),
    ({"lane": "batch", "deadline": "30d"}, "batch"),
    ({"lane": "batch"}, "batch"),
    ({}, "interactive"),
])
def test_a_deadline_of_at_least_the_batch_window_takes_the_batch_lane(fields, lane):
    spec = _spec(**fields)
    assert spec.lane == lane
    assert validate_spec(spec, catalog=CAT, max_prompt_chars=1000) == spec  # checked again: the same
    assert request_columns(spec, catalog=CAT)["deadline_s"] == spec.deadline


def test_the_batch_window_is_the_providers_24_hours():
    from config.request_limits import BATCH_COMPLETION_WINDOW_S

    assert BATCH_COMPLETION_WINDOW_S == 24 * 3600


def test_an_explicit_batch_lane_with_a_deadline_it_cannot_promise_is_refused():
    msg = _refused(lane="batch", deadline="1h")
    assert msg == ("deadline 1h is shorter than the providers' batch window (24h): lane 'batch' cannot promise "
                   "it; leave out lane (a deadline under 24h runs interactively) or give a deadline of at least 24h")
    assert "shorter than the providers' batch window" in _refused(lane="batch", deadline=DAY - 1)


# --- every way in: the same parser, the same words ----------------------------------------------


def test_a_plain_celery_message_may_carry_a_deadline():
    m = RunRequestMessage.decode(args=(), kwargs={"role": "researcher", "prompt": "hi", "deadline": "24h"},
                                 task_id="6f1c1a8e-2d4b-4c1e-9a57-0e0c4bb0a001", delivery_priority=None)
    assert m.spec["deadline"] == "24h"
    spec = validate_spec(m.spec, catalog=CAT, max_prompt_chars=1000)  # what the worker's _adopt does
    assert (spec.lane, spec.deadline) == ("batch", DAY)


def _step(**extra):
    return parse_template("t", {"steps": [{"name": "a", "role": "writer", "prompt": "x", **extra}]},
                          catalog=CAT).step("a")


def test_a_job_step_takes_a_deadline_as_a_request_does():
    assert (_step(deadline="24h").lane, _step(deadline="24h").deadline) == ("batch", DAY)
    assert (_step(deadline="1h").lane, _step(deadline="1h").deadline) == ("interactive", 3_600)
    assert _step(lane="interactive", deadline="2d").lane == "interactive"
    assert _step().deadline is None and _step().lane == "interactive"
    stored = parse_template("t", parse_template("t", {"steps": [{"name": "a", "role": "writer", "prompt": "x",
                                                                   "deadline": "24h"}]}, catalog=CAT).to_data(),
                            catalog=CAT)
    assert (stored.step("a").lane, stored.step("a").deadline) == ("batch", DAY)


@pytest.mark.parametrize("extra", [{"deadline": "1x"}, {"deadline": 0}, {"lane": "batch", "deadline": "1h"}])
def test_a_job_step_refuses_a_deadline_with_the_words_submit_uses(extra):
    with pytest.raises(InvalidRequest) as info:
        _step(**extra)
    words = _refused(**extra)
    assert str(info.value) == f"template 't': steps.a: {words}"
    assert info.value.field == "steps.a.deadline" and "\n" not in str(info.value)
