from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.catalog import LatencyProfile, load_catalog
from config.keys import TIERS


def test_packaged_catalog_has_every_tier_and_routes_every_role_to_one():
    cat = load_catalog()
    assert set(TIERS) <= set(cat.tiers)
    assert all(tier in cat.tiers for tier in cat.roles.values())


def test_cost_is_tokens_times_price_per_million_exactly():
    spec = load_catalog().spec("sonnet")
    cost = spec.cost_usd(input_tokens=1234, output_tokens=567)
    assert cost == (Decimal(1234) * spec.input_usd_per_mtok + Decimal(567) * spec.output_usd_per_mtok) / 10**6
    assert spec.cost_usd(input_tokens=0, output_tokens=0) == 0


def test_a_catalog_routing_a_role_to_a_missing_tier_is_rejected(tmp_path: Path):
    text = Path("config/models.toml").read_text().replace('[roles.researcher]\ntier = "haiku"',
                                                          '[roles.researcher]\ntier = "nano"')
    assert 'tier = "nano"' in text
    bad = tmp_path / "models.toml"
    bad.write_text(text)
    with pytest.raises(ValidationError, match="unknown tier 'nano'"):
        load_catalog(bad)


@pytest.mark.parametrize(
    ("spec", "mean"),
    [("uniform:500:2500", 1500.0), ("fixed:20", 20.0), ("uniform:0:0", 0.0)],
)
def test_latency_specs_parse_to_profiles_with_the_right_mean(spec, mean):
    assert LatencyProfile.parse(spec).mean_ms == mean


@pytest.mark.parametrize("spec", ["uniform:5", "gauss:1:2", "fixed", "uniform:9:1"])
def test_bad_latency_specs_are_refused(spec):
    with pytest.raises(ValueError):
        LatencyProfile.parse(spec)
