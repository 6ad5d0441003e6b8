"""The CLI as a new user meets it: a fresh directory, no TARS_ settings, no services — and then
the environment going wrong (Redis down, Postgres down, a database without the schema, input
that is not text). Every such case is one clear line on stderr and a non-zero exit, never a
traceback; nothing claims to have queued work that nothing will run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import free_port

TARS = str(Path(sys.executable).with_name("tars"))
PORTS = {"low": 21000, "high": 21999}


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env.update({"XDG_DATA_HOME": str(tmp / "data"), "TARS_SIM_LATENCY": "fixed:10", **extra})
    return env


def tars(args: list[str], *, cwd: Path, env: dict[str, str], stdin: bytes | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([TARS, *args], cwd=cwd, env=env, input=stdin, capture_output=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (asserting there is exactly that)."""
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert "Traceback" not in out + err, out + err
    assert res.returncode != 0, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd, _env(tmp_path)


# --- first contact on the embedded default ------------------------------------------------------


def test_status_result_and_dead_letter_list_work_in_a_fresh_directory(fresh, tmp_path):
    cwd, env = fresh
    st_ = tars(["status"], cwd=cwd, env=env)
    assert st_.returncode == 0 and b"Traceback" not in st_.stdout + st_.stderr, st_.stderr
    assert b"embedded default" in st_.stdout and str(tmp_path / "data" / "tars" / "embedded.db").encode() in st_.stdout
    assert "no such table" not in one_line_error(tars(["result", "no-such-id"], cwd=cwd, env=env))
    dl = tars(["dead-letter", "list"], cwd=cwd, env=env)
    assert dl.returncode == 0 and dl.stdout.strip() == b"no failed requests match", dl.stderr
    assert (tmp_path / "data" / "tars" / "embedded.db").exists()
    assert list(cwd.iterdir()) == []  # nothing written into the user's current directory


def test_submit_on_the_embedded_default_runs_the_request_in_process_and_wait_returns_its_result(fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "researcher", "--prompt", "Summarise RFC 9110", "--wait"], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["status"] == "succeeded" and result["result"] and result["tier_used"] == "haiku"
    assert b"ran in this process" in res.stderr
    again = json.loads(tars(["result", result["id"]], cwd=cwd, env=env).stdout)
    assert again["status"] == "succeeded"  # stored where `tars result` finds it


def test_dollars_print_as_plain_decimals_a_zero_saving_included(fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "researcher", "--prompt", "hello", "--wait"], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["saved_usd"] == "0.000000000" and "E" not in result["cost_usd"], result  # not "0E-9"
    st_ = tars(["status"], cwd=cwd, env=env).stdout.decode()
    assert "the response cache saved $0.000000" in st_ and "E-" not in st_, st_


def test_submit_without_wait_on_the_embedded_default_never_reports_work_that_nothing_will_run(fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "engineer", "--prompt", "hello"], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["created"] is True and out["status"] == "succeeded"  # created, and it did run
    rows = json.loads(tars(["status", "--json"], cwd=cwd, env=env).stdout)["requests"]
    assert rows == {"succeeded": 1}  # no queued row left behind


def test_submit_takes_the_whole_model_request_and_status_shows_its_tokens_by_class(fresh):
    """``tars submit`` carries what ``submit`` takes: system, earlier turns, max_tokens, temperature,
    stop, JSON mode and metadata; ``tars status`` then shows the attempt's tokens by billing class."""
    from workers.providers.request import ModelRequest

    cwd, env = fresh
    env = {**env, "TARS_SIM_FAILURE_RATE": "0"}
    turns = [{"role": "user", "content": "What did run 1 measure?"}, {"role": "assistant", "content": "Throughput."}]
    res = tars(["submit", "--role", "analyst", "--system", "Answer in one line.", "--messages", json.dumps(turns),
                "--prompt", "And run 2?", "--max-tokens", "7", "--temperature", "0.5", "--stop", "NEVER",
                "--stop", "EITHER", "--metadata", "ticket=OPS-7", "--metadata", "user_id=u-42", "--wait"],
               cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["status"], r["stop_reason"], r["output_tokens"]) == ("succeeded", "max_tokens", 7)
    assert r["input_tokens"] == ModelRequest.from_fields(prompt="And run 2?", messages=turns,
                                                         system="Answer in one line.").estimated_input_tokens()
    assert r["metadata"] == {"ticket": "OPS-7", "user_id": "u-42"}
    st_ = tars(["status"], cwd=cwd, env={**env, "COLUMNS": "200"})
    shown = st_.stdout.decode()
    assert "tokens by billing class" in shown, shown
    table = shown[shown.index("tokens by billing class"):].splitlines()
    row = next(ln for ln in table if ln.strip("\u2502 ").startswith("haiku"))
    assert [c.strip() for c in row.split("\u2502")[1:7]] == ["haiku", "1", str(r["input_tokens"]), "0", "0", "0"]
    js = tars(["submit", "--role", "researcher", "--messages", json.dumps(turns[:1]), "--response-format", "json",
               "--wait"], cwd=cwd, env=env)
    assert js.returncode == 0, js.stderr
    assert isinstance(json.loads(json.loads(js.stdout)["result"]), dict)


@pytest.mark.parametrize(("args", "says"), [
    (["--prompt", "p", "--temperature", "3"], "temperature"),
    (["--prompt", "p", "--max-tokens", "0"], "max_tokens"),
    (["--messages", "[{\"role\": \"user\""], "messages"),
    (["--messages", "{}"], "messages"),
    (["--prompt", "p", "--metadata", "no-equals-sign"], "metadata"),
    ([], "prompt is required"),
])
def test_a_bad_model_field_on_the_command_line_is_one_line(args, says, fresh):
    cwd, env = fresh
    line = one_line_error(tars(["submit", "--role", "researcher", *args], cwd=cwd, env=env))
    assert says in line, line


def test_worker_refuses_without_a_real_broker(fresh):
    cwd, env = fresh
    line = one_line_error(tars(["worker", "--tier", "haiku"], cwd=cwd, env=env, timeout=30))
    assert "TARS_BROKER_URL" in line and "in-process" in line


# --- a real fleet's database without the schema ------------------------------------------------------


@pytest.fixture
def empty_pg(pg_url) -> str:
    name = f"{pg_url.rsplit('/', 1)[1]}_empty"
    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.mark.parametrize("args", [["status"], ["result", "abc"], ["dead-letter", "list"],
                                  ["submit", "--role", "engineer", "--prompt", "x"]])
def test_a_database_without_the_schema_says_run_tars_db_upgrade(args, empty_pg, redis_url, tmp_path):
    env = _env(tmp_path, TARS_BROKER_URL=redis_url, TARS_DATABASE_URL=empty_pg)
    line = one_line_error(tars(args, cwd=tmp_path, env=env, timeout=60))
    assert "run `tars db upgrade`" in line, line


# --- services down --------------------------------------------------------------------------------


def _closed_port() -> int:
    return free_port(**PORTS)


REDIS_COMMANDS = [["status"], ["submit", "--role", "engineer", "--prompt", "x"],
                  ["loadgen", "run", "baseline", "--count", "1", "--fleet", "local"],
                  ["loadgen", "run", "baseline", "--count", "1", "--fleet", "external"]]
POSTGRES_COMMANDS = [["db", "upgrade"], ["db", "current"], ["status"], ["result", "abc"],
                     ["submit", "--role", "engineer", "--prompt", "x"], ["dead-letter", "list"],
                     ["dead-letter", "resubmit", "--all-matching"],
                     ["loadgen", "run", "baseline", "--count", "1", "--fleet", "local"]]


@pytest.mark.parametrize("args", REDIS_COMMANDS, ids=" ".join)
def test_redis_down_is_one_line_and_a_non_zero_exit(args, pg_url, tmp_path):
    env = _env(tmp_path, TARS_BROKER_URL=f"redis://127.0.0.1:{_closed_port()}/0", TARS_DATABASE_URL=pg_url)
    line = one_line_error(tars(args, cwd=tmp_path, env=env, timeout=60))
    assert "unavailable" in line and "Connection refused" in line, line


@pytest.mark.parametrize("args", POSTGRES_COMMANDS, ids=" ".join)
def test_postgres_down_is_one_line_and_a_non_zero_exit(args, redis_url, tmp_path):
    env = _env(tmp_path, TARS_BROKER_URL=redis_url,
               TARS_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{_closed_port()}/tars")
    line = one_line_error(tars(args, cwd=tmp_path, env=env, timeout=60))
    assert "database unavailable" in line, line


# --- input that is not text -------------------------------------------------------------------------


@pytest.mark.parametrize("stdin,what", [(b"before\x00after", "NUL"), (b"caf\xe9 au lait", "UTF-8"),
                                        (b"\xff\xfe\x00", "UTF-8")])
def test_a_prompt_from_stdin_that_is_not_text_is_refused_in_one_line(stdin, what, fresh):
    cwd, env = fresh
    line = one_line_error(tars(["submit", "--role", "engineer", "--prompt", "-"], cwd=cwd, env=env, stdin=stdin))
    assert what in line and "standard input" in line, line


@pytest.mark.parametrize("args", [["submit", "--role", b"\xff".decode("utf-8", "surrogateescape"), "--prompt", "x"],
                                  ["submit", "--role", "engineer", "--prompt", b"ok \xc3".decode("utf-8",
                                                                                                 "surrogateescape")],
                                  ["result", b"\xfe\xff".decode("utf-8", "surrogateescape")],
                                  ["dead-letter", "list", "--reason", b"\x80".decode("utf-8", "surrogateescape")],
                                  ["loadgen", "run", b"base\xffline".decode("utf-8", "surrogateescape")]])
def test_an_argument_that_is_not_valid_utf8_is_refused_in_one_line(args, fresh):
    cwd, env = fresh
    argv = [os.fsencode(a) for a in args]  # the raw bytes, as a shell would pass them
    res = subprocess.run([TARS.encode(), *argv], cwd=cwd, env=env, capture_output=True, timeout=60)
    assert "not valid UTF-8" in one_line_error(res)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=64).filter(lambda b: b"\x00" in b or not _is_utf8(b)))
def test_any_non_text_bytes_on_stdin_are_one_line_and_exit_2(data, tmp_path):
    env = _env(tmp_path)
    res = tars(["submit", "--role", "engineer", "--prompt", "-"], cwd=tmp_path, env=env, stdin=data, timeout=60)
    one_line_error(res)
    assert res.returncode == 2


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("deadline, words", [("1x", "deadline '1x' has an unknown unit 'x': use s, m, h or d"),
                                             ("0", "deadline must be more than 0"),
                                             ("soon", "deadline must be a duration such as 24h")])
def test_a_bad_deadline_is_one_error_line_and_exit_2(deadline, words, fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "researcher", "--prompt", "hi", "--deadline", deadline], cwd=cwd, env=env)
    assert words in one_line_error(res)
    assert res.returncode == 2


def test_a_batch_lane_with_a_deadline_it_cannot_promise_is_one_error_line_and_exit_2(fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "researcher", "--prompt", "hi", "--lane", "batch", "--deadline", "1h"],
               cwd=cwd, env=env)
    assert "shorter than the providers' batch window (24h)" in one_line_error(res)
    assert res.returncode == 2


def test_a_short_deadline_runs_interactively_on_the_embedded_default(fresh):
    cwd, env = fresh
    res = tars(["submit", "--role", "researcher", "--prompt", "hi", "--deadline", "90m", "--wait"], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "succeeded"
