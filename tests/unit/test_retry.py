from tenacity import RetryError

from config.catalog import load_catalog
from tars_tasks.errors import PermanentProviderError, RateLimited, TransientProviderError
from workers.retry import retrying_for


def _run(errors):
    spec = load_catalog().spec("haiku")
    sleeps: list[float] = []
    calls = iter(errors)

    def attempt():
        exc = next(calls)
        if exc is not None:
            raise exc
        return "ok"

    try:
        for att in retrying_for(spec, sleep=sleeps.append):
            with att:
                result = attempt()
        return result, sleeps
    except (TransientProviderError, PermanentProviderError, RetryError) as exc:
        return exc, sleeps


def test_transient_errors_are_retried_until_success():
    result, sleeps = _run([TransientProviderError("x"), TransientProviderError("y"), None])
    assert result == "ok" and len(sleeps) == 2


def test_permanent_errors_are_not_retried():
    result, sleeps = _run([PermanentProviderError("bad request", status_code=400), None])
    assert isinstance(result, PermanentProviderError) and sleeps == []


def test_retry_after_is_a_floor_on_the_backoff():
    result, sleeps = _run([RateLimited("slow down", retry_after_s=7.5), None])
    assert result == "ok" and sleeps[0] >= 7.5


def test_attempts_are_capped_and_the_last_error_is_raised():
    spec = load_catalog().spec("haiku")
    result, sleeps = _run([TransientProviderError(f"e{i}") for i in range(spec.max_attempts + 2)])
    assert isinstance(result, TransientProviderError)
    assert len(sleeps) == spec.max_attempts - 1
