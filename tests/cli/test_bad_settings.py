"""A bad ``TARS_*`` value is a one-line error where the settings are used, never at import time.

Before: ``import tars_tasks`` built the Celery app, which read the settings, so with
``TARS_LEASE_TTL_S=-1`` even ``tars --help`` died with a pydantic traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cli.test_first_contact import one_line_error
from tests.helpers import ROOT

TARS = str(Path(sys.executable).with_name("tars"))

#: (variable, value, what the one line must say)
BAD_SETTINGS = [
    ("TARS_LEASE_TTL_S", "-1", "TARS_LEASE_TTL_S"),
    ("TARS_WORKER_CONCURRENCY", "many", "TARS_WORKER_CONCURRENCY"),
    ("TARS_BREAKER_OPEN_POLICY", "panic", "TARS_BREAKER_OPEN_POLICY"),
    ("TARS_DB_STATEMENT_TIMEOUT_S", "500", "db_io_timeout_s"),  # a rule across two settings
]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env.update({"XDG_DATA_HOME": str(tmp / "data"), **extra})
    return env


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120)


@pytest.mark.parametrize(("var", "value", "named"), BAD_SETTINGS)
def test_help_works_with_a_bad_setting(var, value, named, tmp_path):
    env = _env(tmp_path, **{var: value})
    groups = (["loadgen", "--help"], ["fleet", "--help"], ["mock-llm", "--help"]) if var == BAD_SETTINGS[0][0] else ()
    for args in (["--help"], *groups):
        res = _run([TARS, *args], env, tmp_path)
        out, err = res.stdout.decode(), res.stderr.decode()
        assert res.returncode == 0, (args, out, err)
        assert out.startswith("Usage: tars"), (args, out)
        assert err == "" and "Traceback" not in out, (args, err)


@pytest.mark.parametrize(("var", "value", "named"), BAD_SETTINGS)
def test_a_command_that_needs_the_settings_prints_one_line_naming_the_setting(var, value, named, tmp_path):
    env = _env(tmp_path, **{var: value})
    more = (["result", "no-such-id"], ["db", "current"]) if var == BAD_SETTINGS[0][0] else ()
    for args in (["status"], *more):
        line = one_line_error(_run([TARS, *args], env, tmp_path))
        assert named in line, (args, line)


def test_importing_every_module_reads_no_setting_and_builds_no_app(tmp_path):
    """Every module of the five packages imports with a bad setting (tars_tasks.tasks defines the
    Celery tasks on the app, so it is the worker's point of use and is left out)."""
    code = r"""
import importlib, pkgutil, sys
import tars_tasks
assert "tars_tasks.celery_app" not in sys.modules or sys.modules["tars_tasks.celery_app"]._app is None
skip = {"tars_tasks.tasks", "migrations.env"}
names = []
for pkg in ("config", "tars_tasks", "workers", "migrations", "loadgen"):
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name not in skip:
            importlib.import_module(info.name)
            names.append(info.name)
from config.settings import get_settings
assert get_settings.cache_info().currsize == 0, "a module read the settings at import"
import tars_tasks.celery_app as ca
assert ca._app is None, "a module built the Celery app at import"
print(len(names))
"""
    res = _run([sys.executable, "-c", code], _env(tmp_path, TARS_LEASE_TTL_S="-1"), ROOT)
    assert res.returncode == 0, res.stderr.decode()
    assert int(res.stdout) > 80


def test_the_app_is_built_on_first_use_and_celery_finds_it(tmp_path):
    """``celery -A tars_tasks`` resolves ``tars_tasks.app`` (module ``__getattr__``): same object each time."""
    code = r"""
import tars_tasks, tars_tasks.celery_app as ca
assert ca._app is None
from celery.app.utils import find_app
app = find_app("tars_tasks")
assert app is tars_tasks.app is ca.app is ca.get_app()
print(app.main, app.conf.broker_url)
"""
    res = _run([sys.executable, "-c", code], _env(tmp_path), ROOT)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().split() == ["tars_tasks", "memory://"]


def test_a_command_group_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    """The old registry swallowed ImportError: a broken ``loadgen.cli`` made ``tars loadgen``
    "No such command" and dropped it from ``--help``."""
    from tars_tasks import cli

    monkeypatch.setitem(sys.modules, "loadgen.cli", None)  # any import of it raises ImportError
    res = CliRunner().invoke(cli.main, ["loadgen", "--help"])
    assert isinstance(res.exception, ImportError), res.output
    assert "No such command" not in res.output
    res = CliRunner().invoke(cli.main, ["--help"])
    assert isinstance(res.exception, ImportError), res.output


def test_a_broken_breaker_import_is_an_error_not_a_missing_metric(monkeypatch):
    """``breaker_views`` swallowed ImportError as "not part of this build": a broken
    ``workers.breaker`` made the breaker metrics vanish from ``/metrics`` without a word."""
    from tars_tasks.metrics import breaker_views
    from tests.helpers import make_settings

    monkeypatch.setitem(sys.modules, "workers.breaker", None)  # any import of it raises ImportError
    with pytest.raises(ImportError):
        breaker_views(make_settings({}))


def test_every_command_group_is_registered_and_loads():
    from tars_tasks import cli

    runner = CliRunner()
    listed = cli.main.list_commands(None)
    for name in cli.COMMAND_GROUPS:
        assert name in listed
        res = runner.invoke(cli.main, [name, "--help"])
        assert res.exit_code == 0 and res.output.startswith("Usage:"), (name, res.output)
