"""The fault suite with a small N: every case of tests/faults/cases.py must leave every request
terminal once — succeeded, or failed with a reason — and every row's totals equal to its calls.
``bench/faults.py --cases all --n 1000`` runs the same cases at N = 1000."""

from __future__ import annotations

import pytest

from tests.faults import cases

pytestmark = pytest.mark.integration


def _holds(a) -> None:
    assert a.pending == 0, f"{a.pending} request(s) left pending: {a}"
    assert a.failed_without_reason == 0, a
    assert a.totals_equal, f"{a.totals_mismatched} request row(s) whose totals differ from their api_calls: {a}"
    assert a.terminal == a.submitted, a


def test_a_worker_sigkilled_mid_call_under_default_settings_loses_nothing(ctx):
    a = cases.case_sigkill_mid_call(ctx, 200)
    _holds(a)
    assert a.succeeded == a.submitted and a.duplicates == 0
    assert a.unknown_attempts > 0  # the killed calls stay on the bill


def test_a_whole_worker_killed_loses_nothing(ctx):
    a = cases.case_kill_whole_worker(ctx, 150)
    _holds(a)
    assert a.succeeded == a.submitted and a.duplicates == 0


def test_sigterm_neither_loses_nor_repeats(ctx):
    a = cases.case_sigterm(ctx, 150)
    _holds(a)
    assert a.succeeded == a.submitted and a.duplicates == 0 and a.unknown_attempts == 0


def test_redis_down_at_submit_is_always_broker_unavailable(ctx):
    a = cases.case_redis_down_at_submit(ctx, 20)
    assert a.notes["refused_broker_unavailable"] == 20, a.notes
    assert a.extra_rows == 0  # nothing was recorded for requests nobody will run


def test_every_message_delivered_twice_is_recorded_once_and_billed_twice(ctx):
    a = cases.case_duplicate_delivery(ctx, 100)
    _holds(a)
    assert a.succeeded == a.submitted and a.extra_rows == 0


def test_a_poison_request_fails_with_a_reason_and_the_rest_succeed(ctx):
    a = cases.case_poison(ctx, 100)
    _holds(a)
    assert a.notes["failed_as_poison"] == a.failed_with_reason == 1


def test_plain_celery_messages_are_run_or_dead_lettered_never_dropped(ctx):
    a = cases.case_foreign_messages(ctx, 60)
    _holds(a)
    assert a.succeeded == a.submitted  # every well-formed plain message was recorded and run
    assert a.dead_letters >= a.notes["bad_messages_sent"]


def test_invalid_input_is_refused_before_anything_is_queued(ctx):
    a = cases.case_invalid_input(ctx, 40)
    assert a.notes["invalid_request"] == 40, a.notes
    assert a.extra_rows == 0 and a.notes["queued"] == 0


def test_the_admission_bound_holds_fleet_wide_under_four_producers(ctx):
    a = cases.case_overload(ctx, 400)
    _holds(a)
    assert a.notes["peak_queue_depth"] <= a.notes["bound"], a.notes
    assert a.notes["refused_overloaded"] > 0 and a.notes["accepted"] > 0


def test_a_row_postgres_refuses_fails_only_its_own_request(ctx):
    a = cases.case_unwritable_row(ctx, 100)
    _holds(a)
    assert a.notes["failed_unwritable"] == a.failed_with_reason == a.notes["expected_unwritable"]
    assert a.succeeded == a.submitted - a.notes["expected_unwritable"]


def test_the_fleet_state_redis_going_away_strands_nothing(ctx):
    a = cases.case_fleet_state_redis_down(ctx, 150)
    _holds(a)
    assert a.duplicates == 0
