"""Job templates refused with clear messages, and the scheduler's decisions (pure logic)."""

from __future__ import annotations

import json

import pytest

from config.catalog import load_catalog
from tars_tasks.errors import InvalidRequest
from tars_tasks.jobs import plan
from tars_tasks.jobs.template import check_input, load_templates, parse_template

CATALOG = load_catalog()


def _t(steps, **kw):
    return parse_template("t", {"steps": steps, **kw}, catalog=CATALOG)


def _refused(steps, **kw) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        _t(steps, **kw)
    assert "\n" not in str(exc.value)
    return exc.value


def test_the_shipped_templates_load():
    ts = load_templates(catalog=CATALOG)
    assert {"research-write-validate", "plan-implement-review"} <= set(ts)
    rwv = ts["research-write-validate"]
    assert [s.name for s in rwv.steps] == ["research", "write", "validate"]
    assert rwv.step("research").max_items == 3 and rwv.step("validate").max_revisions == 1


@pytest.mark.parametrize("steps, field, words", [
    ([{"name": "a", "role": "poet", "prompt": "x"}], "steps.a.role", "unknown role 'poet'"),
    ([{"name": "a", "role": "writer", "prompt": "x", "after": ["b"]}, {"name": "b", "role": "writer", "prompt": "y",
      "after": ["a"]}], "steps.a.after", "cycle"),
    ([{"name": "a", "role": "writer", "prompt": "x", "after": ["a"]}], "steps.a.after", "cycle"),
    ([{"name": "a", "role": "writer", "prompt": "x", "after": ["nope"]}], "steps.a.after", "missing reference"),
    ([{"name": "a", "role": "writer", "prompt": "{{ steps.b.output }}"}, {"name": "b", "role": "writer",
      "prompt": "y"}], "steps.a.prompt", "missing reference"),
    ([{"name": "a", "role": "writer", "prompt": "{{ steps.zz.output }}"}], "steps.a.prompt", "missing reference"),
    ([{"name": "a", "role": "writer", "prompt": "{{ item }}", "for_each": "topics"}], "steps.a.for_each",
     "bad fan-out source"),
    ([{"name": "p", "role": "analyst", "prompt": "x"},
      {"name": "a", "role": "writer", "prompt": "{{ item }}", "for_each": "steps.p.output.parts"}],
     "steps.a.for_each", "bad fan-out source"),
    ([{"name": "a", "role": "writer", "prompt": "{{ item }}"}], "steps.a.prompt", "only for a step with for_each"),
    ([{"name": "a", "role": "writer", "prompt": "{{ bogus }}"}], "steps.a.prompt", "unknown name"),
    ([{"name": "a", "role": "writer", "prompt": "x"}, {"name": "v", "role": "validator", "prompt": "y",
      "revises": "a"}], "steps.v.revises", "missing reference"),
    ([{"name": "a", "role": "writer", "prompt": "x", "for_each": "input.l"},
      {"name": "b", "role": "writer", "prompt": "y", "after": ["a"], "quorum": 11}], "steps.b.quorum", "never come"),
    ([{"name": "a", "role": "writer", "prompt": "x", "colour": "red"}], "steps.a.colour", "unknown key"),
    ([{"name": "a", "role": "writer", "prompt": "x", "lane": "overnight"}], "steps.a.lane",
     "must be one of interactive, batch"),
])
def test_template_errors_are_one_line_and_name_the_field(steps, field, words):
    exc = _refused(steps)
    assert exc.field == field, str(exc)
    assert words in str(exc)


def test_the_input_must_hold_what_the_template_uses():
    t = load_templates(catalog=CATALOG)["research-write-validate"]
    with pytest.raises(InvalidRequest, match="missing reference") as exc:
        check_input(t, {"topics": ["a"]}, max_chars=10_000)
    assert exc.value.field == "input.question"
    with pytest.raises(InvalidRequest, match="bad fan-out source"):
        check_input(t, {"question": "q", "topics": "a"}, max_chars=10_000)
    with pytest.raises(InvalidRequest, match="bad fan-out source"):
        check_input(t, {"question": "q", "topics": []}, max_chars=10_000)
    with pytest.raises(InvalidRequest, match="JSON object"):
        check_input(t, ["q"], max_chars=10_000)


# --- the scheduler -------------------------------------------------------------------------


def _done(new, result="answer", status=plan.SUCCEEDED):
    return [plan.Instance(n.step, n.item, n.revision, status, result=result, item_value=n.item_value) for n in new]


RWV = load_templates(catalog=CATALOG)["research-write-validate"]
INPUT = {"question": "q", "topics": ["t1", "t2", "t3", "t4"]}


def test_fan_out_is_capped_and_fan_in_waits_for_every_item():
    first = plan.advance(RWV, INPUT, [])
    assert [(n.step, n.item) for n in first.new] == [("research", i) for i in range(3)]  # max_items = 3 of 4
    assert "t2" in first.new[1].prompt
    two_done = [*_done(first.new[:2]), plan.Instance("research", 2, 0, plan.QUEUED)]
    assert plan.advance(RWV, INPUT, two_done).new == []
    all_done = [plan.Instance("research", n.item, 0, plan.SUCCEEDED, result=f"notes {n.item}") for n in first.new]
    nxt = plan.advance(RWV, INPUT, all_done)
    assert [(n.step, n.revision) for n in nxt.new] == [("write", 0)]
    assert all(f"[{i + 1}] notes {i}" in nxt.new[0].prompt for i in range(3))
    assert plan.advance(RWV, INPUT, all_done).new == nxt.new  # the same state gives the same plan


def _run(template, job_input, verdicts):
    """Drive a job to its end; validator answers come from ``verdicts`` in order."""
    instances, answers = [], iter(verdicts)
    for _ in range(50):
        p = plan.advance(template, job_input, instances)
        for n in p.new:
            result = next(answers) if template.step(n.step).revises else f"{n.step} answer"
            instances.append(plan.Instance(n.step, n.item, n.revision, plan.SUCCEEDED, result=result))
        if p.verdict is not None:
            return p.verdict, instances
    raise AssertionError("no verdict")


REJECT, ACCEPT = json.dumps({"valid": False, "problems": ["short"]}), json.dumps({"valid": True})


def test_a_rejection_sends_the_step_back_once_with_the_feedback():
    verdict, insts = _run(RWV, INPUT, [REJECT, ACCEPT])
    assert verdict.status == plan.SUCCEEDED
    assert [(i.step, i.revision) for i in insts if i.step != "research"] == [
        ("write", 0), ("validate", 0), ("write", 1), ("validate", 1)]
    assert verdict.result == "write answer"


def test_the_revision_cap_holds_and_then_the_job_fails_not_validated():
    verdict, insts = _run(RWV, INPUT, [REJECT] * 10)
    assert sum(i.step == "write" for i in insts) == 2 and sum(i.step == "validate" for i in insts) == 2
    assert verdict.status == plan.FAILED and verdict.failure_reason == plan.REASON_NOT_VALIDATED


def test_a_failed_step_fails_the_job_with_its_reason_unless_it_continues():
    first = plan.advance(RWV, INPUT, [])
    insts = [*_done(first.new[:2]),
             plan.Instance("research", 2, 0, plan.FAILED, failure_reason="rate_limited", error="429")]
    p = plan.advance(RWV, INPUT, insts)
    assert p.verdict.status == plan.FAILED and p.new == []
    assert "research[2]" in p.verdict.error and "rate_limited" in p.verdict.error
    data = RWV.to_data()
    data["steps"][0]["on_failure"] = "continue"
    cont = parse_template("c", data, catalog=CATALOG)
    p = plan.advance(cont, INPUT, insts)
    assert p.verdict is None and [n.step for n in p.new] == ["write"]
    assert "[3]" not in p.new[0].prompt


def test_a_quorum_starts_early_and_fails_only_when_it_cannot_be_reached():
    t = _t([{"name": "r", "role": "researcher", "prompt": "{{ item }}", "for_each": "input.l"},
            {"name": "w", "role": "writer", "prompt": "{{ steps.r.outputs }}", "after": ["r"], "quorum": 2}])
    inp = {"l": ["a", "b", "c"]}
    q = plan.Instance
    one = [q("r", 0, 0, plan.SUCCEEDED, "x"), q("r", 1, 0, plan.FAILED), q("r", 2, 0, plan.QUEUED)]
    assert plan.advance(t, inp, one).new == [] and plan.advance(t, inp, one).verdict is None
    two = [*one[:2], q("r", 2, 0, plan.SUCCEEDED, "z")]
    assert [n.step for n in plan.advance(t, inp, two).new] == ["w"]
    lost = [*one[:2], q("r", 2, 0, plan.FAILED)]
    assert plan.advance(t, inp, lost).verdict.failure_reason == plan.REASON_QUORUM


def test_a_fan_out_from_a_json_answer_and_a_bad_one():
    t = load_templates(catalog=CATALOG)["plan-implement-review"]
    inp = {"task": "build it"}
    first = plan.advance(t, inp, [])
    good = [plan.Instance("plan", 0, 0, plan.SUCCEEDED, json.dumps({"parts": ["p1", "p2", "p3", "p4", "p5"]}))]
    assert [n.item_value for n in plan.advance(t, inp, good).new] == ["p1", "p2", "p3", "p4"]
    bad = _done(first.new, result="not json")
    p = plan.advance(t, inp, bad)
    assert p.verdict.failure_reason == plan.REASON_FANOUT and "not JSON" in p.verdict.error
