from loadgen import capabilities


def _agg(*, waited=0, workers=1, reasons=None, fallbacks=0):
    return {"rate_limit": {"requests_waited": waited}, "workers": {"count": workers},
            "requests": {"run": {"failures_by_reason": reasons or {}}}, "fallbacks": {"count": fallbacks}}


def test_a_capability_counts_as_exercised_only_when_the_runs_data_show_it_acting():
    present = {"fleet_rate_limiter": True, "degradation_modes": False, "admission_control": False}
    req = ("fleet_rate_limiter", "degradation_modes", "admission_control", "worker_processes")
    missing = capabilities.not_exercised(req, _agg(), fleet_processes=1, present=present)
    assert len(missing) == 4
    assert "present, but no request in this run shows it acting" in missing[0]
    assert "not present in this code base" in missing[1]
    acting = _agg(waited=3, workers=5, reasons={"rejected:overloaded": 2}, fallbacks=1)
    assert capabilities.not_exercised(req, acting, fleet_processes=5, present=present) == []
