"""Job templates: data (TOML), checked when loaded and again, against the job's input, at submit.

A template is a list of named steps. Each step has a ``role`` (so a tier and a system prompt from
the catalog), a ``prompt`` template (:mod:`tars_tasks.jobs.render`) and the steps it comes
``after``. Optional per step:

* ``for_each``: run once per item of a list — ``input.NAME`` or ``steps.NAME.output[.field]`` (an
  earlier step's answer read as JSON; that step must be in ``after``) — at most ``max_items``
  (default 10; items beyond are dropped and the job records how many);
* ``quorum``: start once this many answers of the steps in ``after`` have succeeded (default: wait
  for all of them). With a quorum, a failed item of a fan-out step only fails the job if the
  quorum can no longer be reached;
* ``lane`` and ``deadline``: the step's request's, parsed and combined exactly as ``submit`` does
  (``tars_tasks.schemas.parse_deadline`` / ``resolve_lane``; a deadline of at least 24 h takes
  the batch lane);
* ``on_failure = "continue"``: a failed instance of this step does not fail the job (its answer is
  left out of later prompts); the default ``"fail"`` fails the job with the step's reason;
* ``revises = "STEP"`` and ``max_revisions = N``: this step validates ``STEP`` (one of its
  ``after`` steps, not fanned out). An answer that is a JSON object with ``"valid": false`` sends
  ``STEP`` back with the answer as its ``{{ feedback }}``, at most N times; then ``on_exhausted``
  decides: ``"fail"`` (default, reason ``not_validated``) or ``"accept"``. Steps that come after
  ``STEP`` see its last revision, and only once the validator has accepted it.

The template's ``output`` (default: its last step) names the step whose answer is the job's result.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from config.catalog import Catalog
from tars_tasks.errors import InvalidRequest, excerpt
from tars_tasks.jobs import render
from tars_tasks.schemas import LANE_INTERACTIVE, LANES, parse_deadline, resolve_lane

#: Bounds of a template.
MAX_STEPS = 50
MAX_ITEMS_CAP = 100
MAX_REVISIONS_CAP = 10
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")
TEMPLATE_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,99}")
DEFAULT_TEMPLATES_PATH = Path(__file__).resolve().parents[2] / "config" / "jobs.toml"

_STEP_KEYS = {"name", "role", "prompt", "after", "for_each", "max_items", "quorum", "on_failure", "revises",
              "max_revisions", "on_exhausted", "tier", "lane", "deadline"}
_TEMPLATE_KEYS = {"description", "steps", "output"}


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    role: str
    prompt: str
    after: tuple[str, ...] = ()
    for_each: str | None = None
    max_items: int = 10
    quorum: int | None = None
    on_failure: str = "fail"
    revises: str | None = None
    max_revisions: int = 0
    on_exhausted: str = "fail"
    tier: str | None = None
    #: ``interactive``, or ``batch``: the step's request goes through the providers' batch lane
    #: (half price, answered within the batch window; docs/COST_CONTROLS.md). The lane the step
    #: takes, its ``deadline`` taken into account exactly as ``submit`` does.
    lane: str = LANE_INTERACTIVE
    #: How long the job accepts to wait for the step's answer, in seconds (None: not said).
    deadline: int | None = None

    @property
    def fans_out(self) -> bool:
        return self.for_each is not None

    def refs(self) -> list[render.Ref]:
        return render.parse_prompt(self.prompt)

    def source(self) -> render.Ref | None:
        return None if self.for_each is None else render.parse_ref(self.for_each)


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    description: str
    #: In an order where every step comes after its ``after`` steps.
    steps: tuple[StepDef, ...]
    output: str

    def step(self, name: str) -> StepDef:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, StepDef]:
        return {s.name: s for s in self.steps}

    def validator_of(self, name: str) -> StepDef | None:
        return next((s for s in self.steps if s.revises == name), None)

    def consumers(self, name: str) -> list[StepDef]:
        return [s for s in self.steps if name in s.after]

    def to_data(self) -> dict[str, Any]:
        """What is stored with a job (and what :func:`parse_template` reads back)."""
        return {"description": self.description, "output": self.output,
                "steps": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
                          for s in self.steps]}


def _bad(template: str, message: str, *, field: str) -> InvalidRequest:
    return InvalidRequest(f"template {template!r}: {message}", field=field)


def _int(tname: str, where: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(tname, f"{where} must be a whole number from {low} to {high}, not {excerpt(str(value))}",
                   field=where)
    return value


def _str(tname: str, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(tname, f"{where} must be a non-empty string", field=where)
    return value


def _choice(tname: str, where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(tname, f"{where} must be one of {', '.join(choices)}, not {excerpt(str(value))}", field=where)
    return value


def _lane_and_deadline(tname: str, at: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A step's ``lane`` and ``deadline``, resolved by the same rules (and refused with the same
    words) as a request's (``tars_tasks.schemas.parse_deadline`` / ``resolve_lane``)."""
    lane = None if data.get("lane") is None else _choice(tname, f"{at}.lane", data["lane"], LANES)
    try:
        deadline = parse_deadline(data.get("deadline"))
        return {"lane": resolve_lane(lane, deadline), "deadline": deadline}
    except InvalidRequest as exc:
        raise _bad(tname, f"{at}: {exc}", field=f"{at}.deadline") from None


def _step(tname: str, i: int, data: Any, *, catalog: Catalog) -> StepDef:
    if not isinstance(data, Mapping):
        raise _bad(tname, f"steps[{i}] must be a table", field=f"steps[{i}]")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _bad(tname, f"steps[{i}].name must be 1-40 lowercase letters, digits, '_' or '-' (starting with a "
                          f"letter), not {excerpt(str(name))}", field=f"steps[{i}].name")
    at = f"steps.{name}"
    unknown = sorted(set(data) - _STEP_KEYS)
    if unknown:
        raise _bad(tname, f"{at}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_STEP_KEYS))})",
                   field=f"{at}.{unknown[0]}")
    role = data.get("role")
    if role not in catalog.roles:
        raise _bad(tname, f"{at}: unknown role {excerpt(str(role))}: known roles are "
                          + ", ".join(sorted(catalog.roles)), field=f"{at}.role")
    tier = data.get("tier")
    if tier is not None and tier not in catalog.tiers:
        raise _bad(tname, f"{at}: unknown tier {excerpt(str(tier))}: tiers are " + ", ".join(catalog.tiers),
                   field=f"{at}.tier")
    after = data.get("after", [])
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after) or len(set(after)) != len(after):
        raise _bad(tname, f"{at}.after must be a list of distinct step names", field=f"{at}.after")
    quorum = data.get("quorum")
    if quorum is not None and quorum != "all":
        quorum = _int(tname, f"{at}.quorum", quorum, low=1, high=MAX_ITEMS_CAP * MAX_STEPS)
    else:
        quorum = None
    step = StepDef(
        name=name, role=role, prompt=_str(tname, f"{at}.prompt", data.get("prompt")), after=tuple(after),
        for_each=None if data.get("for_each") is None else _str(tname, f"{at}.for_each", data.get("for_each")),
        max_items=_int(tname, f"{at}.max_items", data.get("max_items", 10), low=1, high=MAX_ITEMS_CAP),
        quorum=quorum,
        on_failure=_choice(tname, f"{at}.on_failure", data.get("on_failure", "fail"), ("fail", "continue")),
        revises=None if data.get("revises") is None else _str(tname, f"{at}.revises", data.get("revises")),
        max_revisions=_int(tname, f"{at}.max_revisions", data.get("max_revisions", 0), low=0,
                           high=MAX_REVISIONS_CAP),
        on_exhausted=_choice(tname, f"{at}.on_exhausted", data.get("on_exhausted", "fail"), ("fail", "accept")),
        tier=tier,
        **_lane_and_deadline(tname, at, data),
    )
    try:
        step.refs()
    except render.BadReference as exc:
        raise _bad(tname, f"{at}.prompt: {exc}", field=f"{at}.prompt") from None
    return step


def _order(tname: str, steps: list[StepDef]) -> list[StepDef]:
    """Steps in dependency order, or InvalidRequest naming a missing reference or a cycle."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        for a in s.after:
            if a not in by_name:
                raise _bad(tname, f"steps.{s.name}.after: missing reference: no step named {excerpt(str(a))}",
                           field=f"steps.{s.name}.after")
            if a == s.name:
                raise _bad(tname, f"cycle: step {s.name!r} comes after itself", field=f"steps.{s.name}.after")
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*path[path.index(name):], name]
            raise _bad(tname, "cycle: " + " → ".join(cycle) + " (each comes after the next)",
                       field=f"steps.{name}.after")
        state[name] = "visiting"
        for a in by_name[name].after:
            visit(a, [*path, name])
        state[name] = "done"
        order.append(by_name[name])

    for s in steps:
        visit(s.name, [])
    return order


def _ancestors(t: dict[str, StepDef], name: str) -> set[str]:
    out, todo = set(), list(t[name].after)
    while todo:
        a = todo.pop()
        if a not in out:
            out.add(a)
            todo.extend(t[a].after)
    return out


def _check_refs(tname: str, steps: list[StepDef]) -> None:
    by_name = {s.name: s for s in steps}
    revised = {s.revises for s in steps if s.revises}
    for s in steps:
        at = f"steps.{s.name}"
        before = _ancestors(by_name, s.name)
        for ref in s.refs():
            where = f"{at}.prompt"
            if ref.kind in (render.ITEM, render.ITEM_INDEX) and not s.fans_out:
                raise _bad(tname, f"{where}: {{{{ {ref.text} }}}} is only for a step with for_each", field=where)
            if ref.kind == render.FEEDBACK and s.name not in revised:
                raise _bad(tname, f"{where}: {{{{ feedback }}}} is only for a step some validator revises",
                           field=where)
            if ref.kind in (render.OUTPUT, render.OUTPUTS):
                if ref.step not in by_name:
                    raise _bad(tname, f"{where}: missing reference: {{{{ {ref.text} }}}} names no step",
                               field=where)
                if ref.step not in before:
                    raise _bad(tname, f"{where}: missing reference: {{{{ {ref.text} }}}} names step "
                                      f"{ref.step!r}, which {s.name!r} does not come after", field=where)
                fans = by_name[ref.step].fans_out
                if ref.kind == render.OUTPUT and fans:
                    raise _bad(tname, f"{where}: step {ref.step!r} runs once per item: use "
                                      f"steps.{ref.step}.outputs", field=where)
                if ref.kind == render.OUTPUTS and not fans:
                    raise _bad(tname, f"{where}: step {ref.step!r} has one answer: use steps.{ref.step}.output",
                               field=where)
        if s.fans_out:
            where = f"{at}.for_each"
            try:
                src = s.source()
            except render.BadReference as exc:
                raise _bad(tname, f"{where}: bad fan-out source: {exc}", field=where) from None
            if src.kind == render.INPUT:
                if src.optional:
                    raise _bad(tname, f"{where}: bad fan-out source: it cannot be optional", field=where)
            elif src.kind == render.OUTPUT:
                if src.step not in s.after:
                    raise _bad(tname, f"{where}: bad fan-out source: step {src.step!r} is not in "
                                      f"{s.name!r}'s after list", field=where)
                if by_name[src.step].fans_out:
                    raise _bad(tname, f"{where}: bad fan-out source: step {src.step!r} runs once per item; "
                                      "fan out from a step with one answer", field=where)
            else:
                raise _bad(tname, f"{where}: bad fan-out source {excerpt(repr(s.for_each))}: use input.NAME or "
                                  "steps.NAME.output[.field]", field=where)
        if s.quorum is not None:
            if not s.after:
                raise _bad(tname, f"{at}.quorum: a step with no after steps has nothing to wait for",
                           field=f"{at}.quorum")
            most = sum(by_name[a].max_items if by_name[a].fans_out else 1 for a in s.after)
            if s.quorum > most:
                raise _bad(tname, f"{at}.quorum: {s.quorum} answers can never come: its after steps give at most "
                                  f"{most}", field=f"{at}.quorum")
        if s.revises is not None:
            where = f"{at}.revises"
            if s.revises not in s.after:
                raise _bad(tname, f"{where}: missing reference: {s.revises!r} must be one of {s.name!r}'s after "
                                  "steps", field=where)
            if by_name[s.revises].fans_out or s.fans_out:
                raise _bad(tname, f"{where}: a validator and the step it revises cannot fan out", field=where)
            if by_name[s.revises].on_failure != "fail":
                raise _bad(tname, f"{where}: step {s.revises!r} is revised, so it cannot have on_failure = "
                                  "'continue'", field=where)
            if s.max_revisions < 1:
                raise _bad(tname, f"{at}.max_revisions must be at least 1 for a step that revises another",
                           field=f"{at}.max_revisions")
            others = [v.name for v in steps if v.revises == s.revises and v is not s]
            if others:
                raise _bad(tname, f"{where}: step {s.revises!r} is already revised by {others[0]!r}", field=where)
        elif s.max_revisions:
            raise _bad(tname, f"{at}.max_revisions needs revises", field=f"{at}.max_revisions")


def parse_template(name: str, data: Any, *, catalog: Catalog) -> Template:
    """Check a template's structure and graph (roles, references, cycles, fan-out sources)."""
    if not isinstance(name, str) or not TEMPLATE_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"template name must be 1-100 lowercase letters, digits, '.', '_' or '-', not "
                             f"{excerpt(str(name))}", field="template")
    if not isinstance(data, Mapping):
        raise _bad(name, "must be a table with a list of steps", field="template")
    unknown = sorted(set(data) - _TEMPLATE_KEYS)
    if unknown:
        raise _bad(name, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TEMPLATE_KEYS))})",
                   field=unknown[0])
    raw = data.get("steps")
    if not isinstance(raw, list) or not raw:
        raise _bad(name, "has no steps", field="steps")
    if len(raw) > MAX_STEPS:
        raise _bad(name, f"has {len(raw)} steps; the limit is {MAX_STEPS}", field="steps")
    steps = [_step(name, i, s, catalog=catalog) for i, s in enumerate(raw)]
    seen: set[str] = set()
    for s in steps:
        if s.name in seen:
            raise _bad(name, f"two steps are named {s.name!r}", field=f"steps.{s.name}.name")
        seen.add(s.name)
    ordered = _order(name, steps)
    _check_refs(name, ordered)
    output = data.get("output", ordered[-1].name)
    if output not in seen:
        raise _bad(name, f"output: missing reference: no step named {excerpt(str(output))}", field="output")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _bad(name, "description must be a string", field="description")
    return Template(name=name, description=description, steps=tuple(ordered), output=output)


def check_input(template: Template, job_input: Any, *, max_chars: int) -> dict[str, Any]:
    """The job's input if every required ``input.`` reference resolves and fan-out sources are lists."""
    if not isinstance(job_input, Mapping) or not all(isinstance(k, str) for k in job_input):
        raise InvalidRequest("input must be a JSON object (a mapping with string keys)", field="input")
    try:
        size = len(json.dumps(job_input, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"input is not JSON-serialisable: {exc}", field="input") from None
    if size > max_chars:
        raise InvalidRequest(f"input has {size} characters as JSON; the limit is {max_chars} (TARS_MAX_PROMPT_CHARS)",
                             field="input")
    data = dict(job_input)
    for s in template.steps:
        for ref in s.refs():
            if ref.kind != render.INPUT or ref.optional:
                continue
            revisions = range(s.max_revisions + 1) if render.REVISION in ref.path else (0,)
            for r in revisions:
                try:
                    render.lookup(data, ref.path, revision=r, what=ref.text)
                except render.MissingValue as exc:
                    field = "input." + ".".join(str(p) for p in ref.path if isinstance(p, str))
                    raise InvalidRequest(f"template {template.name!r} step {s.name!r}: missing reference "
                                         f"{{{{ {ref.text} }}}}: {exc}", field=field) from None
        src = s.source()
        if src is not None and src.kind == render.INPUT:
            try:
                items = render.lookup(data, src.path, revision=0, what=src.text)
            except render.MissingValue as exc:
                raise InvalidRequest(f"template {template.name!r} step {s.name!r}: bad fan-out source "
                                     f"{s.for_each}: {exc}", field=s.for_each) from None
            if not isinstance(items, list) or not items:
                raise InvalidRequest(f"template {template.name!r} step {s.name!r}: bad fan-out source "
                                     f"{s.for_each}: it must be a non-empty list, not "
                                     f"{excerpt(json.dumps(items)[:80])}", field=s.for_each)
    return data


def load_templates(path: Path | None = None, *, catalog: Catalog) -> dict[str, Template]:
    """Every template of a TOML file (``[templates.NAME]`` tables), each checked."""
    path = Path(path) if path is not None else DEFAULT_TEMPLATES_PATH
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"job templates {path}: {exc}", field="template") from None
    tables = data.get("templates", {})
    return {name: parse_template(name, t, catalog=catalog) for name, t in tables.items()}


def resolve(template: str | Mapping[str, Any], *, catalog: Catalog, path: Path | None = None,
            name: str | None = None) -> Template:
    """A template given by name (from the templates file) or inline as a mapping."""
    if isinstance(template, Mapping):
        return parse_template(name or "inline", template, catalog=catalog)
    if not isinstance(template, str):
        raise InvalidRequest("template must be a template name or a mapping", field="template")
    templates = load_templates(path, catalog=catalog)
    if template not in templates:
        raise InvalidRequest(f"unknown template {excerpt(str(template))}: known templates are "
                             + (", ".join(sorted(templates)) or "(none)"), field="template")
    return templates[template]
