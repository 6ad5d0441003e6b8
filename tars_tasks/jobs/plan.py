"""What a job does next, from what its step instances have done: a pure function (no I/O).

:func:`advance` is called with the job's template, input and every step instance so far (with its
request's status and answer), each time one of them finishes. It returns the instances to create
now, and the job's verdict once it has one. It only ever adds instances that do not exist yet, so
calling it twice on the same state adds nothing the second time — the scheduler's part of
"exactly-once scheduling" (the unique keys are the other).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tars_tasks.jobs import render
from tars_tasks.jobs.template import StepDef, Template

QUEUED, SUCCEEDED, FAILED = "queued", "succeeded", "failed"
#: Phases of a step as its consumers see it.
ABSENT, PENDING, OK, BROKEN = "absent", "pending", "ok", "failed"

REASON_STEP_FAILED = "step_failed"
REASON_NOT_VALIDATED = "not_validated"
REASON_QUORUM = "quorum_not_reached"
REASON_FANOUT = "bad_fanout_source"
REASON_RENDER = "render_failed"
REASON_STUCK = "stuck"


@dataclass(frozen=True, slots=True)
class Instance:
    step: str
    item: int
    revision: int
    status: str
    result: str | None = None
    failure_reason: str | None = None
    error: str | None = None
    item_value: Any = None


@dataclass(frozen=True, slots=True)
class NewInstance:
    step: str
    item: int
    revision: int
    prompt: str
    item_value: Any = None


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # succeeded / failed
    result: str | None = None
    failure_reason: str | None = None
    error: str | None = None
    failed_step: str | None = None


@dataclass(slots=True)
class Plan:
    new: list[NewInstance] = field(default_factory=list)
    verdict: Verdict | None = None


def rejected(answer: str | None) -> bool:
    """A validator's answer sends its step back iff it is a JSON object with ``"valid": false``."""
    try:
        data = render.parse_json_output(answer, step="validator")
    except render.MissingValue:
        return False
    return isinstance(data, Mapping) and data.get("valid") is False


@dataclass(frozen=True, slots=True)
class _Phase:
    phase: str
    succeeded: int = 0
    pending: int = 0
    reason: str | None = None
    error: str | None = None


class _Job:
    def __init__(self, template: Template, job_input: Mapping[str, Any], instances: Sequence[Instance]) -> None:
        self.t = template
        self.input = job_input
        self.by: dict[str, dict[int, dict[int, Instance]]] = {}
        for i in instances:
            self.by.setdefault(i.step, {}).setdefault(i.item, {})[i.revision] = i

    def latest(self, step: str) -> dict[int, Instance]:
        return {item: revs[max(revs)] for item, revs in sorted(self.by.get(step, {}).items())}

    def at(self, step: str, item: int, revision: int) -> Instance | None:
        return self.by.get(step, {}).get(item, {}).get(revision)

    def _failed(self, s: StepDef, inst: Instance) -> _Phase:
        where = s.name if not s.fans_out else f"{s.name}[{inst.item}]"
        why = inst.failure_reason or "failed"
        return _Phase(BROKEN, reason=REASON_STEP_FAILED,
                      error=f"step {where} (revision {inst.revision}) failed: {why}: {inst.error or ''}".rstrip(": "))

    def phase(self, s: StepDef) -> _Phase:
        latest = self.latest(s.name)
        if not latest:
            return _Phase(ABSENT)
        if s.fans_out:
            insts = list(latest.values())
            ok = sum(i.status == SUCCEEDED for i in insts)
            pending = sum(i.status == QUEUED for i in insts)
            failed = [i for i in insts if i.status == FAILED]
            consumers = self.t.consumers(s.name)
            tolerated = s.on_failure == "continue" or (consumers and all(c.quorum for c in consumers))
            if failed and not tolerated:
                return self._failed(s, failed[0])
            return _Phase(PENDING if pending else OK, succeeded=ok, pending=pending)
        inst = latest[0]
        if inst.status == QUEUED:
            return _Phase(PENDING, pending=1)
        if inst.status == FAILED:
            return _Phase(OK) if s.on_failure == "continue" else self._failed(s, inst)
        if s.revises is not None and rejected(inst.result):
            if inst.revision < s.max_revisions:
                return _Phase(PENDING)
            if s.on_exhausted == "fail":
                return _Phase(BROKEN, reason=REASON_NOT_VALIDATED, error=(
                    f"step {s.name} rejected revision {inst.revision} of step {s.revises} "
                    f"(max_revisions={s.max_revisions}): {(inst.result or '')[:500]}"))
        v = self.t.validator_of(s.name)
        if v is not None:
            vi = self.at(v.name, 0, inst.revision)
            if vi is None or vi.status == QUEUED:
                return _Phase(PENDING, succeeded=1)
            if vi.status == SUCCEEDED and rejected(vi.result) and vi.revision < v.max_revisions:
                return _Phase(PENDING, succeeded=1)
        return _Phase(OK, succeeded=1)

    # --- rendering ----------------------------------------------------------------------------

    def context(self, *, item: Any = None, item_index: int = 0, revision: int = 0,
                feedback: str = "") -> render.Context:
        outputs, fanout = {}, {}
        for s in self.t.steps:
            latest = self.latest(s.name)
            if s.fans_out:
                fanout[s.name] = [i.result if i.status == SUCCEEDED else None for i in latest.values()]
            elif latest:
                i = latest[0]
                outputs[s.name] = i.result if i.status == SUCCEEDED else None
        return render.Context(input=self.input, outputs=outputs, fanout_outputs=fanout, item=item,
                              item_index=item_index, revision=revision, feedback=feedback)

    def items(self, s: StepDef) -> list[Any]:
        src = s.source()
        if src.kind == render.INPUT:
            value = render.lookup(self.input, src.path, revision=0, what=src.text)
        else:
            answer = self.context().outputs.get(src.step)
            value = render.lookup(render.parse_json_output(answer, step=src.step), src.path, revision=0,
                                  what=src.text)
        if not isinstance(value, list) or not value:
            raise render.MissingValue(f"{s.for_each} is not a non-empty list: {json.dumps(value)[:200]}")
        return value[: s.max_items]


def _ready(job: _Job, s: StepDef, phases: dict[str, _Phase]) -> tuple[bool, Verdict | None]:
    """Whether ``s`` (no instance yet) can start; a verdict if it never can."""
    if s.quorum is not None:
        got = sum(phases[d].succeeded for d in s.after)
        if got >= s.quorum:
            return True, None
        waiting = any(phases[d].phase in (ABSENT, PENDING) for d in s.after)
        if waiting:
            return False, None
        return False, Verdict(FAILED, failure_reason=REASON_QUORUM, failed_step=s.name,
                              error=f"step {s.name} needs {s.quorum} answers from {', '.join(s.after)}; "
                                    f"only {got} succeeded")
    for d in s.after:
        if d == s.revises:
            w = job.latest(d).get(0)
            if w is None or w.status != SUCCEEDED:
                return False, None
        elif phases[d].phase != OK:
            return False, None
    return True, None


def advance(template: Template, job_input: Mapping[str, Any], instances: Sequence[Instance]) -> Plan:
    job = _Job(template, job_input, instances)
    plan = Plan()
    phases = {s.name: job.phase(s) for s in template.steps}
    broken = next((s for s in template.steps if phases[s.name].phase == BROKEN), None)
    if broken is not None:
        p = phases[broken.name]
        plan.verdict = Verdict(FAILED, failure_reason=p.reason, error=p.error, failed_step=broken.name)
        return plan
    try:
        for s in template.steps:
            if phases[s.name].phase == ABSENT:
                ready, verdict = _ready(job, s, phases)
                if verdict is not None:
                    plan.verdict = verdict
                    return plan
                if not ready:
                    continue
                if s.fans_out:
                    try:
                        items = job.items(s)
                    except render.MissingValue as exc:
                        plan.verdict = Verdict(FAILED, failure_reason=REASON_FANOUT, failed_step=s.name,
                                               error=f"step {s.name}: bad fan-out source: {exc}")
                        return plan
                    for n, item in enumerate(items):
                        prompt = render.render(s.prompt, job.context(item=item, item_index=n))
                        plan.new.append(NewInstance(s.name, n, 0, prompt, item_value=item))
                else:
                    plan.new.append(NewInstance(s.name, 0, 0, render.render(s.prompt, job.context())))
                continue
            if s.revises is not None:
                _revise(job, s, plan)
    except render.MissingValue as exc:
        plan.verdict = Verdict(FAILED, failure_reason=REASON_RENDER, error=f"prompt not rendered: {exc}")
        plan.new = []
        return plan
    if plan.new:
        return plan
    sinks = [s for s in template.steps if not template.consumers(s.name)]
    if all(phases[s.name].phase == OK for s in sinks):
        plan.verdict = Verdict(SUCCEEDED, result=_result(job, template.step(template.output)))
    elif not any(phases[s.name].pending for s in template.steps):
        plan.verdict = Verdict(FAILED, failure_reason=REASON_STUCK,
                               error="no step is running and none can start (a template the checks let through?)")
    return plan


def _revise(job: _Job, v: StepDef, plan: Plan) -> None:
    """A validator's next move: send its step back, or validate the step's new revision."""
    vi = job.latest(v.name).get(0)
    w = job.latest(v.revises).get(0)
    if vi is None or w is None:
        return
    if vi.status == SUCCEEDED and rejected(vi.result) and vi.revision < v.max_revisions and w.revision == vi.revision:
        ws = job.t.step(v.revises)
        prompt = render.render(ws.prompt, job.context(revision=vi.revision + 1,
                                                      feedback=f"Feedback from {v.name}: {vi.result}"))
        plan.new.append(NewInstance(ws.name, 0, vi.revision + 1, prompt))
    elif w.revision > vi.revision and w.status == SUCCEEDED:
        plan.new.append(NewInstance(v.name, 0, w.revision, render.render(v.prompt, job.context(revision=w.revision))))


def _result(job: _Job, s: StepDef) -> str | None:
    latest = job.latest(s.name)
    if s.fans_out:
        return json.dumps([i.result if i.status == SUCCEEDED else None for i in latest.values()], ensure_ascii=False)
    inst = latest.get(0)
    return None if inst is None or inst.status != SUCCEEDED else inst.result
