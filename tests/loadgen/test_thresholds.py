import pytest

from loadgen.thresholds import parse, violations
from tars_tasks.errors import LoadgenError


def _agg(p99_ms: float, error_rate: float) -> dict:
    return {"latency_ms": {"e2e": {"p99": p99_ms}}, "requests": {"window": {"error_rate": error_rate}}}


def test_fail_if_reads_seconds_and_percent_into_milliseconds_and_fractions():
    conds = parse("p99>4s, error_rate>5%")
    assert [(c.metric, c.op, c.value) for c in conds] == [("p99", ">", 4000.0), ("error_rate", ">", 0.05)]


def test_fail_if_names_every_run_that_breaks_a_condition():
    conds = parse("p99>4s,error_rate>5%")
    bad = violations(conds, [("fast", _agg(3999, 0.05)), ("slow", _agg(4001, 0.0)), ("flaky", _agg(10, 0.06))])
    assert len(bad) == 2
    assert bad[0].startswith("slow: p99>4s") and bad[1].startswith("flaky: error_rate>5%")


@pytest.mark.parametrize("expr", ["p99>>4s", "latency>4s", "error_rate>5s", "p99>5%"])
def test_fail_if_rejects_conditions_it_cannot_read(expr):
    with pytest.raises(LoadgenError):
        parse(expr)
