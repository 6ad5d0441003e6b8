"""Prompt templates of job steps: ``{{ reference }}`` placeholders, parsed once, rendered per instance.

References (anything else is refused when the template is loaded):

* ``input.a.b[0]`` — a value of the job's input (``[revision]`` indexes by the instance's
  revision); a trailing ``?`` makes it optional (renders as nothing when absent), otherwise the
  input must have it, which is checked at submit;
* ``item`` (the fan-out item, or ``item.field``) and ``item_index`` (0-based) — fan-out steps only;
* ``revision`` (0 first, then 1, 2, ...) and ``feedback`` (the validator's answer that sent the step
  back; empty at revision 0);
* ``steps.NAME.output`` (a step's answer, its latest revision; ``steps.NAME.output.field`` reads its
  JSON) and ``steps.NAME.outputs`` (every answer of a fan-out step, numbered, in item order).

Strings render as they are; any other value as compact JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+|revision)\]")
_ROOT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
REVISION = "$revision"
#: Reference kinds.
INPUT, ITEM, ITEM_INDEX, REV, FEEDBACK, OUTPUT, OUTPUTS = (
    "input", "item", "item_index", "revision", "feedback", "output", "outputs")


class BadReference(ValueError):
    """A placeholder that is not a reference this module knows (the message says why)."""


class MissingValue(LookupError):
    """A reference whose value is absent (the message names it)."""


@dataclass(frozen=True, slots=True)
class Ref:
    kind: str
    text: str
    step: str | None = None
    path: tuple[str | int, ...] = ()
    optional: bool = False


def parse_ref(text: str) -> Ref:
    raw = text.strip()
    optional = raw.endswith("?")
    expr = raw[:-1].rstrip() if optional else raw
    m = _ROOT.match(expr)
    if not m:
        raise BadReference(f"{{{{ {raw} }}}} is not a reference")
    root, pos, path = m.group(0), m.end(), []
    while pos < len(expr):
        s = _SEGMENT.match(expr, pos)
        if not s:
            raise BadReference(f"{{{{ {raw} }}}}: cannot read {expr[pos:]!r} (use .name, [N] or [revision])")
        if s.group(1) is not None:
            path.append(s.group(1))
        else:
            path.append(REVISION if s.group(2) == "revision" else int(s.group(2)))
        pos = s.end()
    if root == "input":
        if not path:
            raise BadReference(f"{{{{ {raw} }}}}: name a field of the input (input.NAME)")
        return Ref(INPUT, raw, path=tuple(path), optional=optional)
    if optional:
        raise BadReference(f"{{{{ {raw} }}}}: only input references may be optional ('?')")
    if root == "item":
        return Ref(ITEM, raw, path=tuple(path))
    if root in ("item_index", "revision", "feedback"):
        if path:
            raise BadReference(f"{{{{ {raw} }}}}: {root} has no fields")
        return Ref(root, raw)
    if root == "steps":
        if len(path) < 2 or not isinstance(path[0], str) or path[1] not in ("output", "outputs"):
            raise BadReference(f"{{{{ {raw} }}}}: write steps.NAME.output or steps.NAME.outputs")
        if path[1] == "outputs" and len(path) > 2:
            raise BadReference(f"{{{{ {raw} }}}}: steps.NAME.outputs has no fields")
        return Ref(OUTPUT if path[1] == "output" else OUTPUTS, raw, step=path[0], path=tuple(path[2:]))
    raise BadReference(f"{{{{ {raw} }}}}: unknown name {root!r} (input, item, item_index, revision, feedback, steps)")


def parse_prompt(template: str) -> list[Ref]:
    """Every reference of a prompt template (raises :class:`BadReference`)."""
    if "{{" in _PLACEHOLDER.sub("", template):
        raise BadReference("an opening '{{' has no closing '}}'")
    return [parse_ref(m.group(1)) for m in _PLACEHOLDER.finditer(template)]


def lookup(value: Any, path: Sequence[str | int], *, revision: int, what: str) -> Any:
    """``value`` followed along ``path`` (raises :class:`MissingValue` naming ``what``)."""
    for seg in path:
        key = revision if seg == REVISION else seg
        if isinstance(key, int):
            if not isinstance(value, list) or not -len(value) <= key < len(value):
                raise MissingValue(f"{what}: no item [{key}]")
            value = value[key]
        else:
            if not isinstance(value, Mapping) or key not in value:
                raise MissingValue(f"{what}: no field {key!r}")
            value = value[key]
    return value


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_json_output(text: str | None, *, step: str) -> Any:
    """A step's answer read as JSON (a fenced ```json block is unwrapped)."""
    body = (text or "").strip()
    if body.startswith("```"):
        body = body.strip("`")
        body = body[4:] if body.startswith("json") else body
    try:
        return json.loads(body)
    except ValueError as exc:
        raise MissingValue(f"steps.{step}.output is not JSON ({exc})") from None


@dataclass(frozen=True, slots=True)
class Context:
    """What one step instance's prompt is rendered with."""

    input: Mapping[str, Any]
    outputs: Mapping[str, str | None]
    #: Every answer of each fan-out step, in item order (``None`` for an item without an answer).
    fanout_outputs: Mapping[str, Sequence[str | None]]
    item: Any = None
    item_index: int = 0
    revision: int = 0
    feedback: str = ""


def value_of(ref: Ref, ctx: Context) -> str:
    if ref.kind == INPUT:
        try:
            return as_text(lookup(ctx.input, ref.path, revision=ctx.revision, what=ref.text))
        except MissingValue:
            if ref.optional:
                return ""
            raise
    if ref.kind == ITEM:
        return as_text(lookup(ctx.item, ref.path, revision=ctx.revision, what=ref.text))
    if ref.kind == ITEM_INDEX:
        return str(ctx.item_index)
    if ref.kind == REV:
        return str(ctx.revision)
    if ref.kind == FEEDBACK:
        return ctx.feedback
    if ref.kind == OUTPUTS:
        parts = ctx.fanout_outputs.get(ref.step) or ()
        return "\n\n".join(f"[{i + 1}] {o}" for i, o in enumerate(parts) if o is not None)
    text = ctx.outputs.get(ref.step)
    if not ref.path:
        return text or ""
    data = parse_json_output(text, step=ref.step)
    return as_text(lookup(data, ref.path, revision=ctx.revision, what=ref.text))


def render(template: str, ctx: Context) -> str:
    """The prompt of one instance (raises :class:`MissingValue` for an absent required value)."""
    return _PLACEHOLDER.sub(lambda m: value_of(parse_ref(m.group(1)), ctx), template)
