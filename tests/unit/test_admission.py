"""Admission control and degradation as pure decisions over given queue depths."""

import pytest

from config.catalog import load_catalog
from config.settings import Settings
from tars_tasks.admission import Admission, Mode, QueueDepthGauge, mode_for
from tars_tasks.errors import Overloaded

SETTINGS = Settings(_env_file=None, max_queue_depth=100, degrade_high_load_at=0.6, degrade_critical_at=0.85)


def _admission(depths: dict[str, int]) -> Admission:
    gauge = QueueDepthGauge(read_depths=lambda: dict(depths), interval_s=0)
    return Admission(settings=SETTINGS, catalog=load_catalog(), gauge=gauge)


@pytest.mark.parametrize(("load", "mode"), [(0.0, Mode.OPTIMAL), (0.59, Mode.OPTIMAL), (0.6, Mode.HIGH_LOAD),
                                            (0.85, Mode.CRITICAL), (1.0, Mode.FULL)])
def test_modes_follow_the_seeds_thresholds(load, mode):
    assert mode_for(load, settings=SETTINGS) is mode


def test_under_high_load_normal_requests_move_to_the_cheaper_tier_and_high_priority_ones_stay():
    adm = _admission({"haiku": 0, "sonnet": 70, "opus": 0})
    normal, high = adm.decide_many([("sonnet", 5), ("sonnet", 9)])
    assert (normal.tier, normal.degraded_from, normal.mode) == ("haiku", "sonnet", Mode.HIGH_LOAD)
    assert (high.tier, high.degraded_from) == ("sonnet", None)


def test_a_critical_tier_refuses_low_priority_requests_before_anything_is_written():
    adm = _admission({"haiku": 90, "sonnet": 0, "opus": 0})
    with pytest.raises(Overloaded) as info:
        adm.decide_many([("haiku", 5), ("haiku", 0)])  # haiku has no fallback
    assert info.value.retry_after_s and info.value.retry_after_s > 0
    assert adm.decide_many([("haiku", 5)])[0].tier == "haiku"


def test_a_full_tier_refuses_everything_and_counts_what_one_call_adds():
    adm = _admission({"haiku": 98, "sonnet": 0, "opus": 0})
    adm.decide_many([("haiku", 9), ("haiku", 9)])
    with pytest.raises(Overloaded, match="full"):
        adm.decide_many([("haiku", 9)] * 3)


def test_admission_is_off_without_a_queue_limit():
    adm = Admission(settings=Settings(_env_file=None, max_queue_depth=0), catalog=load_catalog(),
                    gauge=QueueDepthGauge(read_depths=lambda: {"haiku": 10**9}, interval_s=0))
    assert adm.decide_many([("haiku", 0)])[0].mode is Mode.OPTIMAL
