"""Nothing reads a reason out of error text: every reason is a code (``failure_reason``,
``api_calls.outcome``) written where it is known. The error text is for people.

A static check over the packages' sources: no string operation (``startswith``, ``split``, a
regex, ``LIKE``, ``in`` ...) is applied to anything named ``error`` (a row's column, a record's
field, a dict's ``"error"`` key). The old offenders — loadgen's regex over the caller's error
text and ``dead-letter list --reason``'s ``error ILIKE`` — fail it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tars_tasks", "workers", "loadgen", "config", "migrations/env.py")
TEXT_OPS = frozenset({"startswith", "endswith", "like", "ilike", "notlike", "notilike", "contains", "regexp_match",
                      "split", "rsplit", "partition", "rpartition", "removeprefix", "removesuffix", "find", "rfind",
                      "index", "match", "search", "fullmatch", "findall", "finditer", "sub", "subn"})
ERROR_NAMES = frozenset({"error", "error_text", "b_error"})


def _names_error(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in ERROR_NAMES:
            return True
        if isinstance(n, ast.Attribute) and n.attr in ERROR_NAMES:
            return True
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and n.slice.value in ERROR_NAMES:
            return True
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args
                and isinstance(n.args[0], ast.Constant) and n.args[0].value in ERROR_NAMES):
            return True
    return False


def offences(source: str, *, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TEXT_OPS:
            if _names_error(node.func.value) or any(_names_error(a) for a in node.args):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)[:100]}")
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            if any(_names_error(c) for c in node.comparators):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def _sources():
    for pkg in PACKAGES:
        base = ROOT / pkg
        for path in [base] if base.is_file() else sorted(base.rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_no_module_reads_a_reason_out_of_error_text():
    found = [o for name, src in _sources() for o in offences(src, name=name)]
    assert found == [], "reasons are codes (failure_reason, outcome), not parsed from error text:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    '_REASON_RE.match(error.strip())',                      # loadgen/records.py before
    'q.where(t.error.ilike(f"%{reason}%"))',                # dead_letter_cli.py before
    'row["error"].startswith("enqueue failed")',
    '"rate_limited" in outcome.error',
    're.sub(r"x", "", r.get("error"))',
    'kind = e.error.split(":")[0]',
])
def test_the_check_catches_the_ways_error_text_gets_parsed(snippet):
    assert offences(snippet, name="x"), snippet


def test_the_check_leaves_codes_and_the_making_of_error_text_alone():
    ok = ('reason = row.failure_reason\n'
          'error = f"{reason} after {n} attempt(s): {exc}"\n'
          'q = q.where(t.failure_reason == reason)\n'
          'text = storable(error)[:2000]\n')
    assert offences(ok, name="x") == []
