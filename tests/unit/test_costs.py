"""Exact costs: each provider's real ``usage`` shapes, read into token classes and priced, each class
at its own catalog price, checked in dollars to the cent (and to the exact decimal).

The usage blocks below have the shapes the APIs return (Anthropic Messages: ``input_tokens``
excludes cache reads and writes, ``cache_creation`` splits writes by lifetime; OpenAI Chat
Completions: ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``). Before exact
costs, every cached token was billed at the full input price: these tests fail on that code."""

from __future__ import annotations

import tomllib
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from config.catalog import ModelSpec, load_catalog
from config.pricing import Prices, Usage
from tests.helpers import make_settings
from workers.caller import ModelCaller
from workers.providers import Completion
from workers.providers.request import ModelRequest
from workers.providers.usage import UsageMissing, anthropic_usage, openai_stop_reason, openai_usage

CAT = load_catalog()
CENT = Decimal("0.01")


def cents(d: Decimal) -> Decimal:
    return d.quantize(CENT, rounding=ROUND_HALF_UP)


def price(model: str) -> Prices:
    """The model's prices as the packaged catalog lists them."""
    spec = CAT.by_model(model)
    if spec is not None:
        return spec.prices
    return Prices(**tomllib.loads(Path("config/models.toml").read_text())["prices"][model])


# --- Anthropic ---------------------------------------------------------------------------------

ANTHROPIC_CACHE_WRITE = {  # a first call with a cached system prompt (5-minute lifetime), Sonnet 4.5
    "input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393, "service_tier": "standard",
}
ANTHROPIC_MIXED = {  # reads, and writes of both lifetimes, Opus 4.5
    "input_tokens": 3000, "cache_creation_input_tokens": 20000, "cache_read_input_tokens": 150000,
    "cache_creation": {"ephemeral_5m_input_tokens": 8000, "ephemeral_1h_input_tokens": 12000},
    "output_tokens": 4000, "service_tier": "standard",
}
ANTHROPIC_NO_SPLIT = {  # an older response without the cache_creation breakdown: all 5-minute writes
    "input_tokens": 1200, "cache_creation_input_tokens": 30000, "cache_read_input_tokens": 90000,
    "output_tokens": 2500,
}


def test_an_anthropic_cache_write_is_billed_at_the_cache_write_price():
    u = anthropic_usage(ANTHROPIC_CACHE_WRITE)
    assert u == Usage(input_tokens=21, cache_write_tokens=188086, output_tokens=393)
    cost = price("claude-sonnet-4-5").cost_usd(u)
    # 21 x $3 + 188,086 x $3.75 + 393 x $15 per million
    assert cost == Decimal("0.7112805") and cents(cost) == Decimal("0.71")


def test_anthropic_reads_and_writes_of_both_lifetimes_each_have_their_price():
    u = anthropic_usage(ANTHROPIC_MIXED)
    assert (u.input_tokens, u.cache_write_tokens, u.cache_write_1h_tokens, u.cache_read_tokens, u.output_tokens) == (
        3000, 8000, 12000, 150000, 4000)
    assert u.total_input_tokens == 3000 + 20000 + 150000
    cost = price("claude-opus-4-5").cost_usd(u)
    # 3,000 x $5 + 8,000 x $6.25 + 12,000 x $10 + 150,000 x $0.50 + 4,000 x $25 per million
    assert cost == Decimal("0.36") and cents(cost) == Decimal("0.36")
    flat = Decimal(u.total_input_tokens) * 5 / 10**6 + Decimal(4000) * 25 / 10**6
    assert cents(flat) == Decimal("0.97")  # what billing every input token at the input price said


def test_anthropic_writes_without_the_lifetime_split_are_five_minute_writes():
    u = anthropic_usage(ANTHROPIC_NO_SPLIT)
    assert (u.cache_write_tokens, u.cache_write_1h_tokens) == (30000, 0)
    cost = price("claude-haiku-4-5").cost_usd(u)
    # 1,200 x $1 + 30,000 x $1.25 + 90,000 x $0.10 + 2,500 x $5 per million
    assert cost == Decimal("0.0602") and cents(cost) == Decimal("0.06")


def test_an_anthropic_response_without_usage_is_refused():
    with pytest.raises(UsageMissing):
        anthropic_usage({"output_tokens": 3})
    with pytest.raises(UsageMissing):
        anthropic_usage(None)


# --- OpenAI ------------------------------------------------------------------------------------

OPENAI_CACHED = {  # a long shared prefix, gpt-4.1
    "prompt_tokens": 850000, "completion_tokens": 60000, "total_tokens": 910000,
    "prompt_tokens_details": {"cached_tokens": 640000, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}
OPENAI_REASONING = {  # a reasoning model: reasoning tokens are part of completion_tokens, billed as output
    "prompt_tokens": 12000, "completion_tokens": 50000, "total_tokens": 62000,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 44000, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}
OPENAI_BARE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": None}


def test_openai_cached_input_is_part_of_prompt_tokens_and_billed_at_the_cached_price():
    u = openai_usage(OPENAI_CACHED)
    assert u == Usage(input_tokens=210000, cache_read_tokens=640000, output_tokens=60000)
    cost = price("gpt-4.1").cost_usd(u)
    # 210,000 x $2 + 640,000 x $0.50 + 60,000 x $8 per million
    assert cost == Decimal("1.22") and cents(cost) == Decimal("1.22")
    flat = (Decimal(850000) * 2 + Decimal(60000) * 8) / 10**6
    assert cents(flat) == Decimal("2.18")


def test_openai_reasoning_tokens_are_output():
    u = openai_usage(OPENAI_REASONING)
    assert (u.input_tokens, u.output_tokens) == (12000, 50000)
    assert price("gpt-5-mini").cost_usd(u) == Decimal("0.103")  # 12,000 x $0.25 + 50,000 x $2 per million


def test_openai_usage_without_details_is_all_uncached_input():
    assert openai_usage(OPENAI_BARE) == Usage(input_tokens=10, output_tokens=5)
    with pytest.raises(UsageMissing):
        openai_usage({"total_tokens": 15})


def test_openai_finish_reasons_read_as_stop_reasons():
    assert [openai_stop_reason(r) for r in ("stop", "length", "content_filter", "tool_calls", None)] == [
        "end_turn", "max_tokens", "refusal", "tool_use", None]


# --- batch and the price list --------------------------------------------------------------------


def test_the_batch_discount_applies_to_every_class():
    u = anthropic_usage(ANTHROPIC_MIXED)
    p = price("claude-opus-4-5")
    assert p.batch_multiplier == Decimal("0.5")
    assert p.cost_usd(u, batch=True) == p.cost_usd(u) / 2 == Decimal("0.18")


def test_every_tiers_model_has_listed_prices_with_their_source_and_date():
    for spec in CAT.tiers.values():
        p = spec.prices
        assert p.source and p.source.startswith("https://") and p.as_of
        assert None not in (p.cache_write_5m, p.cache_write_1h, p.cache_read)
        assert p.cache_read < p.input < p.cache_write_5m < p.cache_write_1h < p.output
        assert (spec.input_usd_per_mtok, spec.output_usd_per_mtok) == (p.input, p.output)


def test_a_tiers_own_prices_override_the_list_and_stand_alone_for_unlisted_models(tmp_path):
    text = Path("config/models.toml").read_text().replace(
        'model = "claude-haiku-4-5"', 'model = "claude-haiku-4-5"\ninput_usd_per_mtok = 0.8', 1)
    (tmp_path / "c.toml").write_text(text)
    spec = load_catalog(tmp_path / "c.toml").spec("haiku")
    assert spec.prices.input == Decimal("0.8") and spec.prices.cache_read == Decimal("0.1")
    lone = ModelSpec(tier="haiku", model="unlisted", input_usd_per_mtok=2, output_usd_per_mtok=4, rpm=1, tpm=1)
    assert lone.cost_usd(input_tokens=10**6, cache_read_tokens=10**6, output_tokens=10**6) == Decimal(8)
    with pytest.raises(ValueError, match="no input price"):
        ModelSpec(tier="haiku", model="unlisted", rpm=1, tpm=1)


# --- the attempt row ----------------------------------------------------------------------------


class UsageProvider:
    name = "scripted"

    def __init__(self, completion: Completion) -> None:
        self.completion = completion

    def complete(self, *, spec, request, request_id, attempt):
        return self.completion


class Rows:
    def __init__(self) -> None:
        self.recorded: list = []

    def record(self, api_rows):
        self.recorded.extend(api_rows)


def test_the_attempt_row_stores_each_class_and_their_exact_cost():
    u = anthropic_usage(ANTHROPIC_MIXED)
    rows = Rows()
    caller = ModelCaller(settings=make_settings({}), catalog=CAT, writer=rows, redis_client=None)
    caller._providers = {t: UsageProvider(Completion.of(text="ok", usage=u, stop_reason="end_turn")) for t in CAT.tiers}
    system = "s" * 4000
    request = ModelRequest.from_fields(prompt="p" * 400, system=system,
                                       messages=[{"role": "user", "content": "m" * 1600},
                                                 {"role": "assistant", "content": "a" * 800}])
    out = caller.call(request_id="00000000-0000-0000-0000-000000000002", tier="opus", request=request, worker="w")
    assert out.status == "succeeded" and out.stop_reason == "end_turn"
    (row,) = out.api_rows
    assert {k: getattr(row, k) for k in u.columns()} == u.columns()
    assert row.cost_usd == Decimal("0.36")
    # the row written before the call: input estimated over the whole request, at the input price
    (before,) = rows.recorded
    whole = len(system) + 1 + 1600 + 1 + 800 + 1 + 400  # the texts joined by newlines
    assert before.outcome == "in_flight" and before.input_tokens == -(-whole // 4)
    assert before.cost_usd == Decimal(before.input_tokens) * 5 / 10**6
