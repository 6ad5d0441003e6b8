from loadgen.sweep import KneePolicy, Level, find_knee, oversaturated_because


def _lv(c, thr, p99, err=0.0, ratio=1.0):
    return Level(level=c, throughput=thr, p99_ms=p99, error_rate=err, efficiency=ratio)


def test_the_knee_is_the_last_level_before_p99_or_errors_or_efficiency_break():
    levels = [_lv(1, 1, 1000), _lv(10, 10, 1100), _lv(50, 45, 1500, ratio=0.9), _lv(100, 50, 2600, ratio=0.5)]
    knee = find_knee(levels, KneePolicy())
    assert knee["knee"] == 50 and knee["broke_at"] == 100
    assert any("p99" in w for w in knee["why"]) and any("binding ceiling" in w for w in knee["why"])


def test_a_sweep_stops_when_throughput_falls_below_the_best_level():
    policy = KneePolicy()
    assert oversaturated_because([_lv(10, 10, 100), _lv(50, 40, 200)], policy) is None
    why = oversaturated_because([_lv(10, 10, 100), _lv(50, 40, 200), _lv(100, 30, 900)], policy)
    assert why is not None and "fell" in why


def test_a_sweep_without_a_break_reports_its_last_level_as_healthy():
    knee = find_knee([_lv(1, 1, 100), _lv(2, 2, 110)], KneePolicy())
    assert knee == {"knee": 2, "broke_at": None, "why": []}


def test_an_open_loop_sweep_breaks_where_completions_fall_behind_the_offered_rate():
    levels = [Level(level=r, throughput=t, p99_ms=100, error_rate=0, efficiency=None, offered=r)
              for r, t in ((10, 10), (20, 19.8), (40, 30), (80, 31))]
    knee = find_knee(levels, KneePolicy())
    assert knee["knee"] == 20 and knee["broke_at"] == 40
    assert oversaturated_because(levels, KneePolicy()) is not None


def test_one_failure_in_a_handful_of_requests_does_not_stop_a_sweep():
    # 1 of 6 failed: 16.7% > 2 x 5%, but the 95% interval reaches down to 3%: not evidence
    assert oversaturated_because([Level(level=2, throughput=2.6, p99_ms=None, error_rate=1 / 6, efficiency=0.9,
                                        requests=6)], KneePolicy()) is None
    # 30 of 100 failed is
    why = oversaturated_because([Level(level=2, throughput=2.6, p99_ms=None, error_rate=0.3, efficiency=0.9,
                                       requests=100)], KneePolicy())
    assert why is not None and "error rate 30.0%" in why


def test_the_lightest_levels_overhead_alone_does_not_stop_a_sweep():
    first = _lv(2, 2.6, 300, ratio=0.2)
    assert oversaturated_because([first], KneePolicy()) is None
    # but efficiency that fell further as load was added does
    assert oversaturated_because([first, _lv(6, 2.7, 900, ratio=0.1)], KneePolicy()) is not None
    assert oversaturated_because([first, _lv(6, 7.0, 400, ratio=0.25)], KneePolicy()) is None
