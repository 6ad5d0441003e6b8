"""Dollars saved by degradation and by the batch lane, on records whose savings are known by
construction (no fleet): the rules of loadgen/costcontrols.py, the Markdown that states them with
the prices used, and tests/loadgen/recompute.py's second implementation agreeing with both."""

from __future__ import annotations

from decimal import Decimal

from loadgen import costcontrols
from loadgen.records import CallRow, RequestRecord
from tests.loadgen import recompute

#: Per-tier prices as the report states them (USD per million tokens), the project's list prices.
PRICES = {
    "haiku": {"model": "claude-haiku-4-5", "input": "1.00", "output": "5.00", "cache_write_5m": "1.25",
              "cache_write_1h": "2.00", "cache_read": "0.10", "batch_multiplier": "0.5"},
    "sonnet": {"model": "claude-sonnet-4-5", "input": "3.00", "output": "15.00", "cache_write_5m": "3.75",
               "cache_write_1h": "6.00", "cache_read": "0.30", "batch_multiplier": "0.5"},
    "opus": {"model": "claude-opus-4-5", "input": "5.00", "output": "25.00", "cache_write_5m": "6.25",
             "cache_write_1h": "10.00", "cache_read": "0.50", "batch_multiplier": "0.5"},
}
M = Decimal(1_000_000)


def _call(tier: str, *, inp: int, out: int, batch: bool = False, cw: int = 0, cw1h: int = 0,
          cr: int = 0) -> CallRow:
    p = {k: Decimal(v) for k, v in PRICES[tier].items() if k != "model"}
    cost = (inp * p["input"] + out * p["output"] + (cw - cw1h) * p["cache_write_5m"] + cw1h * p["cache_write_1h"]
            + cr * p["cache_read"]) / M
    return CallRow(tier=tier, outcome="ok", input_tokens=inp, output_tokens=out,
                   cost_usd=cost * p["batch_multiplier"] if batch else cost, latency_ms=10.0, ratelimit_wait_ms=0.0,
                   cache_write_tokens=cw, cache_read_tokens=cr, cache_write_1h_tokens=cw1h, batch=batch)


def _rec(i: int, *, requested: str, queued: str, calls: list[CallRow], lane: str = "interactive",
         status: str = "succeeded", done: float = 1.0, mode: str | None = None, priority: int = 5) -> RequestRecord:
    return RequestRecord(
        id=f"r{i}", status=status, reason=None if status == "succeeded" else "provider_error", origin=100.0 + i,
        done_at=100.0 + i + done, intended_at=None, sent_at=100.0 + i, submitted_at=100.0 + i, started_at=100.0 + i,
        finished_at=100.0 + i + done, tier_requested=requested, tier_used=calls[-1].tier if calls else None,
        worker="w", attempts=len(calls), api_calls=len(calls), input_tokens=sum(c.input_tokens for c in calls),
        output_tokens=sum(c.output_tokens for c in calls), cost_usd=sum((c.cost_usd for c in calls), Decimal(0)),
        ratelimit_wait_ms=0.0, calls_waited=0, done_via="event", calls=calls, lane=lane, tier_queued=queued,
        served_mode=mode or ("high_load" if queued != requested else "optimal"), priority=priority)


def records() -> list[RequestRecord]:
    return [
        # degraded sonnet -> haiku: 1000 in, 200 out. At sonnet: 0.003 + 0.003; at haiku: 0.001 + 0.001
        _rec(0, requested="sonnet", queued="haiku", calls=[_call("haiku", inp=1000, out=200)]),
        # degraded opus -> sonnet, with prompt-cache classes: 100 5m writes, 50 1h writes, 400 reads
        _rec(1, requested="opus", queued="sonnet", calls=[_call("sonnet", inp=0, out=100, cw=150, cw1h=50, cr=400)]),
        # degraded but failed: no saving counted
        _rec(2, requested="sonnet", queued="haiku", calls=[_call("haiku", inp=500, out=0)], status="failed"),
        # fell back after a failure (queued on its own tier): not degradation
        _rec(3, requested="sonnet", queued="sonnet", calls=[_call("sonnet", inp=10, out=0),
                                                           _call("haiku", inp=1000, out=100)]),
        # batch lane, haiku: 2000 in, 400 out at half price
        _rec(4, requested="haiku", queued="haiku", calls=[_call("haiku", inp=2000, out=400, batch=True)],
             lane="batch", done=5.0),
        # batch lane, sonnet; and its interactive twin
        _rec(5, requested="sonnet", queued="sonnet", calls=[_call("sonnet", inp=1000, out=1000, batch=True)],
             lane="batch", done=5.0),
        _rec(6, requested="sonnet", queued="sonnet", calls=[_call("sonnet", inp=1000, out=1000)]),
        # a batch-lane request the batch did not answer, sent on to the interactive lane: no batch saving
        _rec(7, requested="haiku", queued="haiku", calls=[_call("haiku", inp=100, out=100)], lane="batch", done=9.0),
        # queued on sonnet in optimal; the worker found the fleet in high load and ran it on haiku
        # (served_mode becomes the mode that moved it): degradation, 100 in and 100 out
        _rec(8, requested="sonnet", queued="sonnet", calls=[_call("haiku", inp=100, out=100)], mode="high_load"),
        # high priority keeps its tier in every mode: on haiku it is a fallback, not degradation
        _rec(9, requested="sonnet", queued="sonnet", calls=[_call("haiku", inp=100, out=100)], mode="high_load",
             priority=9),
    ]


def expected() -> tuple[Decimal, Decimal]:
    deg = (Decimal("0.006") - Decimal("0.002")  # r0
           + (100 * Decimal(25) + 100 * Decimal("6.25") + 50 * Decimal(10) + 400 * Decimal("0.5")) / M
           - (100 * Decimal(15) + 100 * Decimal("3.75") + 50 * Decimal(6) + 400 * Decimal("0.3")) / M  # r1
           + (100 * Decimal(3) + 100 * Decimal(15)) / M - (100 * Decimal(1) + 100 * Decimal(5)) / M)  # r8
    batch = ((2000 * Decimal(1) + 400 * Decimal(5)) / M / 2  # r4: half of its interactive price
             + (1000 * Decimal(3) + 1000 * Decimal(15)) / M / 2)  # r5
    return deg, batch


def test_saved_by_degradation_and_by_batch_are_the_known_amounts():
    f = costcontrols.figures(records(), mode_changes=[], start=100.0, end=120.0, prices=PRICES)
    deg, batch = expected()
    assert Decimal(f["saved_degradation_usd"]) == deg
    assert Decimal(f["saved_batch_usd"]) == batch
    assert f["savings"]["degraded_requests"] == 3 and f["savings"]["batch_calls"] == 2


def test_the_lanes_table_compares_dollars_per_request():
    f = costcontrols.figures(records(), mode_changes=[], start=100.0, end=120.0, prices=PRICES)
    lanes = f["lanes"]
    assert [ln["lane"] for ln in lanes["rows"]] == ["interactive", "batch"]
    inter, bat = lanes["rows"]
    assert (inter["requests"], bat["requests"]) == (7, 3)
    assert Decimal(bat["usd"]) == sum((c.cost_usd for i in (4, 5, 7) for c in records()[i].calls), Decimal(0))
    assert Decimal(lanes["ratio"]) == Decimal(bat["usd_per_request"]) / Decimal(inter["usd_per_request"])
    assert bat["tokens"]["output_tokens"] == 400 + 1000 + 100


def test_the_markdown_states_the_rules_and_prices_and_recompute_agrees(tmp_path):
    import json

    f = costcontrols.figures(records(), mode_changes=[], start=100.0, end=120.0, prices=PRICES)
    f["file"] = costcontrols.write_mode_changes(tmp_path, "x-00", [])
    md = "\n".join(costcontrols.report_lines(f))
    assert "estimate at the same tokens" in md
    for tier, p in PRICES.items():
        assert f"| {tier} | {p['model']} | {p['input']} | {p['output']} |" in md
    (tmp_path / "requests-x-00.jsonl").write_text("".join(json.dumps(r.as_json()) + "\n" for r in records()))
    run_doc = {"records_file": "requests-x-00.jsonl", "aggregates": {"cost_controls": f},
               "drive": {"started_at": 100.0, "ended_at": 120.0}, "config": {"prices": PRICES}}
    problems: list[str] = []
    checked = recompute.check_cost(md, tmp_path, run_doc, problems)
    assert not problems, problems
    assert checked > 20
    # and a wrong printed saving is caught
    bad = md.replace(f"${Decimal(f['saved_batch_usd']):.6f}", "$0.000001", 1)
    assert bad != md
    problems = []
    recompute.check_cost(bad, tmp_path, run_doc, problems)
    assert any("batch" in p for p in problems), problems


def test_recompute_refuses_prices_the_calls_were_not_billed_at(tmp_path):
    """The report must state the catalog the workers ran with: a call billed at other prices is caught."""
    import json

    f = costcontrols.figures(records(), mode_changes=[], start=100.0, end=120.0, prices=PRICES)
    f["file"] = costcontrols.write_mode_changes(tmp_path, "x-00", [])
    (tmp_path / "requests-x-00.jsonl").write_text("".join(json.dumps(r.as_json()) + "\n" for r in records()))
    other = {**PRICES, "haiku": {**PRICES["haiku"], "output": "4.00"}}
    run_doc = {"records_file": "requests-x-00.jsonl", "aggregates": {"cost_controls": f},
               "drive": {"started_at": 100.0, "ended_at": 120.0}, "config": {"prices": other}}
    problems: list[str] = []
    recompute.check_cost("\n".join(costcontrols.report_lines(f)), tmp_path, run_doc, problems)
    assert any("not billed at the stated prices" in p for p in problems), problems
    assert any("prices of haiku" in p for p in problems), problems


def test_a_batch_lane_scenario_needs_a_provider_with_a_batch_api():
    from loadgen.scenarios import PRESETS, Scenario

    assert PRESETS["batch"].problems() == []
    bad = Scenario(name="b", title="b", count=4, duration_s=None, lanes=("interactive", "batch"))
    assert any("mock_provider" in p for p in bad.problems())
    assert any("lanes must be" in p for p in Scenario(name="c", title="c", lanes=("fast",)).problems())


def test_the_batch_mix_sends_each_request_once_per_lane_with_the_same_prompt_and_role():
    from loadgen.scenarios import DEFAULT_ROLES, RequestMix

    mix = RequestMix(roles=DEFAULT_ROLES, seed=1, lanes=("interactive", "batch"), cache=False)
    plain = RequestMix(roles=DEFAULT_ROLES, seed=1)
    for k in range(50):
        a, b = mix(2 * k), mix(2 * k + 1)
        assert (a.pop("lane"), b.pop("lane")) == ("interactive", "batch")
        assert a == b == {**plain(k), "cache": False}
