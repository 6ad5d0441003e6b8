"""Real model requests end to end: multi-turn and system-prompt requests submitted through the
producer API, stored in Postgres, read back by real ``tars worker`` processes, sent on the wire by
the Anthropic and OpenAI clients to the mock server, and finished with the text, the stop reason
and the usage by token class — each class stored per attempt, priced at its own catalog price and
summed into the request's totals; the same on the embedded default (SQLite, in process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from config.request_limits import JSON_INSTRUCTION
from tars_tasks.client import TarsClient
from tests.helpers import ROOT, make_settings
from tests.integration.model_calls_support import (  # noqa: F401 - fixture
    FAKE_ANTHROPIC_KEY,
    FAKE_OPENAI_KEY,
    MODELS,
    api_rows,
    mock_llm,
    write_catalog,
)
from workers.providers.request import ModelRequest

pytestmark = pytest.mark.integration

REVIEWER = "You review the fleet's reports. Name every figure that does not follow from the rows."
#: A role default long enough for OpenAI's prompt cache (over 1,024 tokens).
AUDITOR = "You audit load reports. " + "Every figure must be recomputable from the raw rows; say which is not. " * 70
TURNS = [{"role": "user", "content": "What did run one measure?"},
         {"role": "assistant", "content": "Throughput at ten concurrent requests."}]
MILLION = Decimal(10**6)


def _fleet(fleet_env, tmp_path, mock, **catalog) -> dict[str, str]:
    path = write_catalog(tmp_path / "catalog.toml", **catalog)
    return {**fleet_env, "TARS_CATALOG_PATH": str(path), "TARS_PROVIDER_BASE_URL": mock.url,
            "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "OPENAI_API_KEY": FAKE_OPENAI_KEY}


def _body(mock, pred):
    found = [b["body"] for b in mock.bodies() if pred(b["body"])]
    assert len(found) == 1, found
    return found[0]


def _row(db, rid: str) -> dict:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM requests WHERE id = :i"), {"i": rid}).one()._mapping)


def test_multi_turn_and_system_prompt_requests_run_end_to_end_on_real_workers(fleet_env, tmp_path, mock_llm,  # noqa: F811
                                                                               start_worker, db):
    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "30:30")
    env = _fleet(fleet_env, tmp_path, mock, sonnet={"provider": "openai", "fallback": None},
                 roles={"reviewer": {"tier": "sonnet", "system": REVIEWER, "max_tokens": 200, "temperature": 0.1}})
    start_worker(tiers=["haiku", "sonnet"], concurrency=10, env=env)
    with TarsClient(settings=make_settings(env)) as client:
        a = client.submit(role="researcher", system="Be exact.", messages=TURNS, prompt="And run two?",
                          max_tokens=25, temperature=0.3, stop=["<<END>>"],
                          metadata={"user_id": "acct-1", "ticket": "T-9"})
        o = client.submit(role="reviewer", messages=[*TURNS, {"role": "user", "content": "Is that figure sound?"}])
        j = client.submit(role="reviewer", prompt="Rate the report.", system="", response_format="json")
        ra, ro, rj = client.wait_many([a.id, o.id, j.id], timeout=60)

    # Anthropic (haiku): system top-level, three turns, the request's options
    sent = _body(mock, lambda b: b.get("metadata", {}).get("user_id") == "acct-1")
    assert sent == {"model": MODELS["haiku"], "max_tokens": 25, "system": "Be exact.",
                    "messages": [*TURNS, {"role": "user", "content": "And run two?"}], "temperature": 0.3,
                    "stop_sequences": ["<<END>>"], "metadata": {"user_id": "acct-1"}}
    assert (ra.status, ra.stop_reason, ra.output_tokens) == ("succeeded", "max_tokens", 25)
    assert ra.input_tokens == ModelRequest.from_fields(prompt="And run two?", messages=TURNS,
                                                       system="Be exact.").estimated_input_tokens()
    assert ra.metadata == {"user_id": "acct-1", "ticket": "T-9"} and ra.result

    # OpenAI (sonnet), the role's defaults: its system prompt first, its limit and temperature
    sent = _body(mock, lambda b: b.get("messages", [{}])[-1].get("content") == "Is that figure sound?")
    assert sent["messages"][0] == {"role": "system", "content": REVIEWER} and sent["messages"][1:3] == TURNS
    assert (sent["max_completion_tokens"], sent["temperature"]) == (200, 0.1) and "response_format" not in sent
    assert (ro.status, ro.stop_reason, ro.output_tokens) == ("succeeded", "end_turn", 30)

    # system "" drops the role's system prompt; JSON mode adds only the instruction
    sent = _body(mock, lambda b: b.get("response_format") is not None)
    assert sent["messages"] == [{"role": "system", "content": JSON_INSTRUCTION},
                                {"role": "user", "content": "Rate the report."}]
    assert sent["response_format"] == {"type": "json_object"} and isinstance(json.loads(rj.result), dict)

    # stored as asked (the role's defaults filled in), and the totals are the attempts' sums
    row = _row(db, o.id)
    assert (row["system"], row["max_tokens"], row["temperature"], row["prompt"]) == (REVIEWER, 200, 0.1, None)
    assert row["messages"][-1] == {"role": "user", "content": "Is that figure sound?"}
    assert _row(db, j.id)["system"] == "" and _row(db, a.id)["stop"] == ["<<END>>"]
    for r in (ra, ro, rj):
        (call,) = api_rows(db, where=f"request_id = '{r.id}'")
        assert (call["input_tokens"], call["output_tokens"], call["cache_read_tokens"]) == (
            r.input_tokens, r.output_tokens, 0)
        assert Decimal(call["cost_usd"]) == r.cost_usd == (Decimal(r.input_tokens) * 1 + r.output_tokens * 5) / MILLION

    # tars result shows the stop reason and the usage by class
    out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", "result", a.id], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=60)
    shown = json.loads(out.stdout)
    assert shown["stop_reason"] == "max_tokens" and shown["cache_read_tokens"] == 0 and shown["output_tokens"] == 25


def test_cached_input_is_stored_per_attempt_and_priced_at_its_own_price_end_to_end(fleet_env, tmp_path, mock_llm,  # noqa: F811
                                                                                    start_worker, db):
    from tars_tasks.metrics import render
    from tars_tasks.status import usage_by_class

    mock = mock_llm("--latency", "fixed:5", "--output-tokens", "40:40")
    prices = {MODELS["sonnet"]: {"input": 3.0, "output": 15.0, "cache_read": 0.3, "source": "https://example.test",
                                 "as_of": "2026-12"}}
    env = _fleet(fleet_env, tmp_path, mock, prices=prices, roles={"auditor": {"tier": "sonnet", "system": AUDITOR}},
                 sonnet={"provider": "openai", "fallback": None, "input_usd_per_mtok": None,
                         "output_usd_per_mtok": None})
    start_worker(tiers=["sonnet"], concurrency=4, env=env)
    results = []
    with TarsClient(settings=make_settings(env)) as client:
        for i in range(3):  # one after the other: the first call fills the cache, the next two read it
            results.append(client.submit(role="auditor", prompt=f"Audit run {i}.").wait(timeout=60))
    assert all(r.status == "succeeded" for r in results)
    first, *later = results
    assert first.cache_read_tokens == 0 and all(r.cache_read_tokens >= 1024 for r in later)
    model = MODELS["sonnet"]
    calls = api_rows(db)
    assert sum(c["cache_read_tokens"] for c in calls) == mock.total(model, "cache_read_tokens") > 0
    assert sum(c["input_tokens"] for c in calls) == mock.total(model, "input_tokens")
    assert sum(c["output_tokens"] for c in calls) == mock.total(model, "output_tokens") == 120
    for r in results:
        (c,) = [c for c in calls if c["request_id"] == r.id]
        expect = (Decimal(c["input_tokens"]) * 3 + Decimal(c["cache_read_tokens"]) * Decimal("0.3")
                  + Decimal(c["output_tokens"]) * 15) / MILLION
        assert Decimal(c["cost_usd"]) == r.cost_usd == expect
        assert (r.input_tokens, r.cache_read_tokens) == (c["input_tokens"], c["cache_read_tokens"])
    # the bill, from what the provider counted, to the cent
    billed = (Decimal(mock.total(model, "input_tokens")) * 3 + Decimal(mock.total(model, "cache_read_tokens"))
              * Decimal("0.3") + Decimal(mock.total(model, "output_tokens")) * 15) / MILLION
    assert sum(r.cost_usd for r in results) == billed and round(billed, 2) == round(sum(r.cost_usd for r in results), 2)
    settings = make_settings(env)
    usage = usage_by_class(settings)["sonnet"]
    assert usage["cache_read_tokens"] == mock.total(model, "cache_read_tokens") and Decimal(usage["cost_usd"]) == billed
    metrics = render(settings=settings)
    assert f'tars_tokens_total{{kind="cache_read",tier="sonnet"}} {float(usage["cache_read_tokens"])}' in metrics


def test_a_plain_celery_message_may_carry_a_conversation(fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    from celery import Celery

    from tests.faults.harness import wait_terminal

    mock = mock_llm("--latency", "fixed:5")
    env = _fleet(fleet_env, tmp_path, mock)
    start_worker(tiers=["haiku"], concurrency=4, env=env)
    rid = str(uuid.uuid4())
    stock = Celery("someone-else", broker=fleet_env["TARS_BROKER_URL"])
    stock.send_task("tars.run_request", task_id=rid, queue="tars.haiku",
                    kwargs={"role": "researcher", "system": "Plain.", "messages": [*TURNS, {"role": "user",
                                                                                          "content": "More?"}]})
    assert wait_terminal(db, [rid], timeout=60)
    row = _row(db, rid)
    assert row["status"] == "succeeded" and row["system"] == "Plain." and len(row["messages"]) == 3
    sent = _body(mock, lambda b: b.get("system") == "Plain.")
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]


def test_the_row_written_before_the_call_estimates_the_whole_request(fleet_env, start_worker, db):
    """A worker killed mid-call leaves its attempt "billed, outcome unknown" with the input of the
    whole request — system prompt and every turn — at the input price, not the prompt's alone."""
    env = {"TARS_SIM_CRASH_MARKER": "__crash__", "TARS_SIM_LATENCY": "fixed:5"}
    system, turns = "s" * 4000, [{"role": "user", "content": "__crash__ " + "m" * 2000},
                                 {"role": "assistant", "content": "a" * 1000}]
    worker = start_worker(tiers=["haiku"], concurrency=2, env=env)
    with TarsClient(settings=make_settings(fleet_env)) as client:
        handle = client.submit(role="researcher", system=system, messages=turns, prompt="p")
    deadline = time.monotonic() + 60
    while worker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.proc.poll() is not None, "the crash marker did not kill the worker"
    (call,) = api_rows(db, where=f"request_id = '{handle.id}'")
    expected = ModelRequest.from_fields(prompt="p", messages=turns, system=system).estimated_input_tokens()
    assert expected > 1500  # the prompt alone would be 1 token
    assert call["outcome"] == "in_flight" and call["input_tokens"] == expected
    assert Decimal(call["cost_usd"]) == Decimal(expected) * 1 / MILLION  # haiku input at $1 per million


EMBEDDED = textwrap.dedent("""
    import json
    from tars_tasks.embedded import run_in_process
    (h,), (r,) = run_in_process([{"role": "validator", "messages": %s, "max_tokens": 60}], timeout_s=60)
    print(json.dumps({"status": r.status, "stop_reason": r.stop_reason, "output_tokens": r.output_tokens,
                      "input_tokens": r.input_tokens, "result": r.result, "cost": str(r.cost_usd)}))
""")


def test_a_multi_turn_request_runs_on_the_embedded_default(tmp_path):
    turns = [*TURNS, {"role": "user", "content": "Check it."}]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), TARS_SIM_LATENCY="fixed:5", TARS_SIM_FAILURE_RATE="0")
    out = subprocess.run([sys.executable, "-c", EMBEDDED % json.dumps(turns)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["status"] == "succeeded"
    # the validator's defaults: its JSON system prompt; the request's own max_tokens caps the answer
    assert r["stop_reason"] == "max_tokens" and r["output_tokens"] == 60 and isinstance(json.loads(r["result"]), dict)
    from config.catalog import load_catalog

    d = load_catalog().defaults_for("validator")
    expected = ModelRequest.from_fields(messages=turns, system=d.system, response_format="json")
    assert r["input_tokens"] == expected.estimated_input_tokens()
    assert Decimal(r["cost"]) == (Decimal(r["input_tokens"]) * 1 + Decimal(60) * 5) / MILLION
    import sqlite3

    (db_file,) = (tmp_path / "data").rglob("embedded.db")
    with sqlite3.connect(db_file) as conn:
        messages, system = conn.execute("SELECT messages, system FROM requests").fetchone()
    assert json.loads(messages) == turns and system == d.system
