import numpy as np
import pytest

from loadgen.schedule import make_schedule
from tars_tasks.errors import LoadgenError


def test_a_constant_schedule_spaces_arrivals_exactly_one_over_the_rate_apart():
    s = make_schedule(rate_per_s=50, arrival="constant", duration_s=2)
    assert len(s) == 100
    assert np.allclose(np.diff(s), 0.02)
    assert s[0] == 0 and s[-1] < 2


def test_a_poisson_schedule_is_the_same_for_the_same_seed_and_has_the_asked_rate():
    a = make_schedule(rate_per_s=200, arrival="poisson", count=20_000, seed=7)
    b = make_schedule(rate_per_s=200, arrival="poisson", count=20_000, seed=7)
    c = make_schedule(rate_per_s=200, arrival="poisson", count=20_000, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 20_000
    assert (len(a) - 1) / a[-1] == pytest.approx(200, rel=0.03)
    gaps = np.diff(a)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: cv = 1


def test_a_schedule_needs_exactly_one_bound_and_a_positive_rate():
    with pytest.raises(LoadgenError):
        make_schedule(rate_per_s=10, duration_s=1, count=5)
    with pytest.raises(LoadgenError):
        make_schedule(rate_per_s=10)
    with pytest.raises(LoadgenError):
        make_schedule(rate_per_s=0, count=5)
