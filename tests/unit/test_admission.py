"""Admission control and degradation as pure decisions over a given fleet mode and queue depths."""

import pytest

from config.catalog import load_catalog
from config.settings import Settings
from tars_tasks.admission import Admission, Mode, QueueDepthGauge, mode_for
from tars_tasks.errors import Overloaded

SETTINGS = Settings(_env_file=None, max_queue_depth=100, degrade_high_load_at=0.6, degrade_critical_at=0.85)


def _admission(depths: dict[str, int], mode: Mode = Mode.OPTIMAL) -> Admission:
    gauge = QueueDepthGauge(read_depths=lambda: dict(depths), interval_s=0)
    return Admission(settings=SETTINGS, catalog=load_catalog(), gauge=gauge, mode=lambda: mode)


@pytest.mark.parametrize(("load", "mode"), [(0.0, Mode.OPTIMAL), (0.59, Mode.OPTIMAL), (0.6, Mode.HIGH_LOAD),
                                            (0.85, Mode.CRITICAL), (1.0, Mode.FULL)])
def test_modes_follow_the_seeds_thresholds(load, mode):
    assert mode_for(load, settings=SETTINGS) is mode


def test_under_high_load_normal_requests_move_to_the_cheaper_tier_and_high_priority_ones_stay():
    adm = _admission({"haiku": 0, "sonnet": 0, "opus": 0}, mode=Mode.HIGH_LOAD)
    normal, high, opus, haiku = adm.decide_many([("sonnet", 5), ("sonnet", 9), ("opus", 0), ("haiku", 0)])
    assert (normal.tier, normal.degraded_from, normal.mode) == ("haiku", "sonnet", Mode.HIGH_LOAD)
    assert (high.tier, high.degraded_from) == ("sonnet", None)
    assert (opus.tier, opus.degraded_from) == ("sonnet", "opus")
    assert (haiku.tier, haiku.degraded_from) == ("haiku", None)  # nothing cheaper
    assert not any(d.cache_or_refuse for d in (normal, high, opus, haiku))


def test_in_critical_mode_low_priority_requests_are_admitted_only_from_cache():
    adm = _admission({"haiku": 0, "sonnet": 0, "opus": 0}, mode=Mode.CRITICAL)
    low, normal, high = adm.decide_many([("sonnet", 0), ("sonnet", 5), ("sonnet", 9)])
    assert (low.tier, low.cache_or_refuse) == ("haiku", True)
    assert (normal.tier, normal.cache_or_refuse) == ("haiku", False)
    assert (high.tier, high.cache_or_refuse) == ("sonnet", False)


def test_the_mode_is_the_fleets_not_the_queue_depth_a_producer_sampled():
    adm = _admission({"haiku": 0, "sonnet": 90, "opus": 0}, mode=Mode.OPTIMAL)
    (d,) = adm.decide_many([("sonnet", 0)])
    assert (d.tier, d.mode, d.cache_or_refuse) == ("sonnet", Mode.OPTIMAL, False)


def test_a_full_tier_refuses_everything_and_counts_what_one_call_adds():
    adm = _admission({"haiku": 98, "sonnet": 0, "opus": 0})
    adm.decide_many([("haiku", 9), ("haiku", 9)])
    with pytest.raises(Overloaded, match="full") as info:
        adm.decide_many([("haiku", 9)] * 3)
    assert info.value.retry_after_s and info.value.retry_after_s > 0


def test_admission_is_off_without_a_queue_limit():
    adm = Admission(settings=Settings(_env_file=None, max_queue_depth=0), catalog=load_catalog(),
                    gauge=QueueDepthGauge(read_depths=lambda: {"haiku": 10**9}, interval_s=0))
    assert adm.decide_many([("haiku", 0)])[0].mode is Mode.OPTIMAL
