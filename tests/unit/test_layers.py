"""The one-way layers of docs/ARCHITECTURE.md, checked with import-linter (contracts in pyproject.toml).

import-linter (grimp) reads every ``import`` statement, function-level ones included, so an
import hidden inside a function breaks the contract like any other; the tests below prove that
on a copy of the tree with one such import planted.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("tars_tasks", "workers", "config", "migrations", "loadgen")
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
#: The package root is the public facade (``submit``, ``TarsClient``, errors): it imports only
#: the floor eagerly, everything else on first use (tests/cli/test_bad_settings.py).
FACADE = "tars_tasks"


def _contracts(root: Path = ROOT) -> list[dict]:
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layers() -> list[list[str]]:
    (layers,) = [c["layers"] for c in _contracts() if c["id"] == "layers"]
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in layers]


def _modules(root: Path = ROOT) -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.append(".".join(parts))
    return out


def _imports_nothing(mod: str) -> bool:
    path = ROOT.joinpath(*mod.split("."), "__init__.py")
    if not path.exists():
        return False
    tree = ast.parse(path.read_text())
    return not any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(tree))


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_layering_contracts_hold():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout, res.stdout


def test_every_module_is_in_exactly_one_layer():
    """A new module must be given its place (in pyproject.toml) — an unplaced one is unchecked."""
    layers = _layers()
    unplaced, twice = [], []
    for mod in _modules():
        if mod == FACADE:
            continue
        homes = [i for i, layer in enumerate(layers) for m in layer if mod == m or mod.startswith(m + ".")]
        if not homes and _imports_nothing(mod):
            continue  # a package whose __init__ only names it (its modules are placed one by one)
        if not homes:
            unplaced.append(mod)
        elif len(homes) > 1:
            twice.append(mod)
    assert not unplaced, f"modules in no layer (add them to [tool.importlinter] in pyproject.toml): {unplaced}"
    assert not twice, f"modules in several layers: {twice}"


def test_the_facade_imports_only_the_floor_eagerly():
    """``tars_tasks/__init__.py``: module-level imports of errors and schemas only (not the app)."""
    tree = ast.parse((ROOT / "tars_tasks" / "__init__.py").read_text())
    eager = {n.module for n in tree.body
             if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith(PACKAGES)}
    assert eager <= {"tars_tasks.errors", "tars_tasks.schemas"}, eager


# --- the checker catches what it must (a copy of the tree with one bad import planted) ----------


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(root: Path, module: str, code: str) -> None:
    path = root / Path(*module.split(".")).with_suffix(".py")
    if not path.exists():
        path = root / Path(*module.split(".")) / "__init__.py"
    path.write_text(path.read_text() + "\n\n" + code + "\n")


@pytest.mark.parametrize(("module", "code", "broken"), [
    # the producer side reaching into a worker, hidden in a function (as 75 imports once were)
    ("tars_tasks.coordinator", "def _hidden():\n    from workers.agent import get_agent\n    return get_agent",
     "tars_tasks.coordinator -> workers.agent"),
    # a worker importing operations
    ("workers.maintenance", "def _hidden():\n    import tars_tasks.status\n    return tars_tasks.status",
     "workers.maintenance -> tars_tasks.status"),
    # config reaching up into the core
    ("config.catalog", "def _hidden():\n    from tars_tasks.db import models\n    return models",
     "config.catalog -> tars_tasks.db.models"),
    # a migration importing the application's models
    ("migrations.env", "from tars_tasks.db.models import Base  # noqa",
     "migrations.env -> tars_tasks.db.models"),
    # the mock LLM depending on TARS
    ("loadgen.mock_llm.server", "def _hidden():\n    from tars_tasks.errors import TarsError\n    return TarsError",
     "loadgen.mock_llm.server -> tars_tasks.errors"),
])
def test_a_planted_upward_import_breaks_the_contract(tree_copy, module, code, broken):
    _plant(tree_copy, module, code)
    res = _lint(tree_copy)
    assert res.returncode != 0, res.stdout
    assert broken in res.stdout, res.stdout
