"""The public API (``TarsClient``, ``submit``, the results, the errors) is typed and ships
``py.typed``: mypy checks it (config in pyproject.toml, ``[tool.mypy]``), and a user's typed code
gets its mistakes reported."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.helpers import ROOT

USER_CODE = '''
from decimal import Decimal

import tars_tasks
from tars_tasks import InvalidRequest, TarsClient, TarsError
from tars_tasks.client import RequestHandle, RequestResult

def good(client: TarsClient) -> Decimal | None:
    handle: RequestHandle = client.submit(role="researcher", prompt="hi", priority="high", max_tokens=10)
    result: RequestResult = handle.wait(timeout=5.0)
    many: list[RequestHandle] = tars_tasks.submit_many([{"role": "writer", "prompt": "x"}])
    one: RequestHandle = tars_tasks.submit(role="writer", prompt="x")
    assert issubclass(InvalidRequest, TarsError) and many and one
    return result.cost_usd

def bad(client: TarsClient) -> None:
    client.submit(role=1, prompt="hi")  # BAD
    handle = client.submit(role="r", prompt="p")
    handle.wait(timeout="soon")  # BAD
    result: int = handle.wait()  # BAD
    tars_tasks.submit(role="r", prompt=b"bytes")  # BAD
'''


def _mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_public_api_type_checks():
    res = _mypy()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success" in res.stdout


def test_a_users_typed_code_gets_exactly_its_mistakes_reported(tmp_path):
    path = tmp_path / "user_code.py"
    path.write_text(USER_CODE)
    res = _mypy("--follow-imports=silent", str(path))
    flagged = {int(m.group(1)) for m in re.finditer(r"user_code\.py:(\d+): error", res.stdout)}
    expected = {i for i, line in enumerate(USER_CODE.splitlines(), 1) if line.endswith("# BAD")}
    assert flagged == expected, res.stdout


def test_py_typed_is_shipped():
    assert (ROOT / "tars_tasks" / "py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["tars_tasks"]
