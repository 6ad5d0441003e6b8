"""The real HTTP clients (Anthropic Messages, OpenAI Chat Completions) against the mock server:
request shape, usage parsing, and every HTTP failure mapped to the right error class."""

from __future__ import annotations

import pytest

from config.catalog import ModelSpec
from tars_tasks.errors import (
    AuthenticationFailed,
    ContextTooLong,
    PermanentProviderError,
    ProviderConnectionError,
    ProviderNotConfigured,
    ProviderOverloaded,
    ProviderTimeout,
    RateLimited,
    TransientProviderError,
)
from tests.integration.model_calls_support import (  # noqa: F401 - fixture
    FAKE_ANTHROPIC_KEY,
    FAKE_OPENAI_KEY,
    free_port,
    mock_llm,
    shared_mock,
)
from workers.providers import AnthropicProvider, OpenAIProvider, get_provider
from workers.providers.request import ModelRequest

pytestmark = pytest.mark.integration

KEY_ENV = "TARS_TEST_MOCK_KEY"


def _spec(*, provider: str, base_url: str, model: str = "mock-model", timeout_s: float = 5.0) -> ModelSpec:
    return ModelSpec(tier="haiku", model=model, provider=provider, base_url=base_url, api_key_env=KEY_ENV,
                     input_usd_per_mtok=1, output_usd_per_mtok=5, rpm=1000, tpm=10**6, timeout_s=timeout_s,
                     output_tokens=(10, 30))


@pytest.fixture(params=["anthropic", "openai"])
def provider_name(request, monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, FAKE_ANTHROPIC_KEY if request.param == "anthropic" else FAKE_OPENAI_KEY)
    return request.param


@pytest.fixture
def server(shared_mock):  # noqa: F811
    shared_mock.reset(config=True)
    return shared_mock


def _call(name: str, spec: ModelSpec, prompt: str = "Summarise the quarterly report, please."):
    return get_provider(name).complete(spec=spec, request=ModelRequest.from_prompt(prompt), request_id="r-1", attempt=1)


def test_both_clients_round_trip_and_take_usage_from_the_response(provider_name, server):
    spec = _spec(provider=provider_name, base_url=server.url, model=f"m-{provider_name}")
    done = _call(provider_name, spec, prompt="x" * 400)
    assert done.http_status == 200 and done.text
    assert (done.input_tokens, done.output_tokens) == (100, 12)
    assert server.total(spec.model, "input_tokens") == 100 and server.total(spec.model, "output_tokens") == 12


def test_max_tokens_of_the_tier_reaches_the_provider(provider_name, server):
    server.configure(output_tokens=[500, 500])
    done = _call(provider_name, _spec(provider=provider_name, base_url=server.url))
    assert done.output_tokens == 30  # capped by the tier's output_tokens[1], sent as max_tokens


@pytest.mark.parametrize(("status", "error"), [
    (400, PermanentProviderError), (403, PermanentProviderError), (404, PermanentProviderError),
    (401, AuthenticationFailed), (500, TransientProviderError), (503, TransientProviderError),
    (529, ProviderOverloaded),
])
def test_http_statuses_map_to_the_error_classes(provider_name, server, status, error):
    with pytest.raises(error) as info:
        _call(provider_name, _spec(provider=provider_name, base_url=server.url), prompt=f"[[mock:status={status}]]")
    assert info.value.status_code == status
    assert info.value.retryable == (status >= 500)


def test_a_429_is_rate_limited_with_the_servers_retry_after(provider_name, server):
    server.configure(rpm=1, window_s=60, retry_after_s=7)
    spec = _spec(provider=provider_name, base_url=server.url)
    _call(provider_name, spec)
    with pytest.raises(RateLimited) as info:
        _call(provider_name, spec)
    expected = 7.0
    assert info.value.retry_after_s == pytest.approx(expected) and info.value.retryable


def test_a_prompt_beyond_the_context_window_is_context_too_long(provider_name, server):
    server.configure(context_tokens=50)
    with pytest.raises(ContextTooLong) as info:
        _call(provider_name, _spec(provider=provider_name, base_url=server.url), prompt="y" * 1000)
    assert not info.value.retryable


def test_a_hung_call_times_out_at_the_tiers_timeout(provider_name, server):
    server.configure(timeout_rate=1.0, hang_s=5.0)
    with pytest.raises(ProviderTimeout):
        _call(provider_name, _spec(provider=provider_name, base_url=server.url, timeout_s=0.3))


def test_a_refused_connection_is_a_transient_connection_error(provider_name):
    with pytest.raises(ProviderConnectionError):
        _call(provider_name, _spec(provider=provider_name, base_url=f"http://127.0.0.1:{free_port()}"))


def test_a_missing_key_fails_before_any_call_is_made(provider_name, server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ProviderNotConfigured):
        _call(provider_name, _spec(provider=provider_name, base_url=server.url))
    assert server.stats()["models"] == {}


def test_a_wrong_key_is_a_401_and_the_echoed_key_is_redacted(provider_name, mock_llm, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MOCK_ACCEPTED_KEY", "sk-the-only-key-accepted-here")
    server = mock_llm("--expected-key-env", "MOCK_ACCEPTED_KEY")
    with pytest.raises(AuthenticationFailed) as info:
        _call(provider_name, _spec(provider=provider_name, base_url=server.url))
    assert "Incorrect API key" in str(info.value)
    assert "sk-" not in str(info.value)


def test_the_official_anthropic_sdk_parses_the_mocks_answers(server):
    anthropic = pytest.importorskip("anthropic")
    sdk = anthropic.Anthropic(api_key=FAKE_ANTHROPIC_KEY, base_url=server.url, max_retries=0)
    msg = sdk.messages.create(model="mock-sdk", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text and msg.usage.output_tokens == 12 and msg.usage.input_tokens == 2
    with pytest.raises(anthropic.RateLimitError):
        server.configure(force_status={"mock-sdk": 429})
        sdk.messages.create(model="mock-sdk", max_tokens=20, messages=[{"role": "user", "content": "hello"}])


def test_the_official_openai_sdk_parses_the_mocks_answers(server):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=server.url + "/v1", max_retries=0)
    out = sdk.chat.completions.create(model="mock-sdk", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content and out.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="mock-sdk", max_tokens=20,
                                    messages=[{"role": "user", "content": "[[mock:status=400]]"}])


def test_keep_alive_connections_are_reused_across_calls(server):
    from workers.providers.http import shared_pool

    pool = shared_pool(server.url)
    assert pool is shared_pool(server.url)
    before = pool.created
    spec = _spec(provider="anthropic", base_url=server.url)
    import os
    os.environ[KEY_ENV] = FAKE_ANTHROPIC_KEY
    try:
        for _ in range(5):
            _call("anthropic", spec)
    finally:
        del os.environ[KEY_ENV]
    assert pool.created - before <= 1  # sequential calls: one connection, kept alive
    assert isinstance(get_provider("anthropic"), AnthropicProvider)
    assert isinstance(get_provider("openai"), OpenAIProvider)


def _tars(env: dict[str, str], *args: str) -> str:
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "tars_tasks.cli", *args], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_workers_fail_400_and_401_without_retrying_and_never_write_the_keys_anywhere(
        fleet_env, tmp_path, mock_llm, start_worker, db):  # noqa: F811
    from sqlalchemy import text

    from tars_tasks.client import TarsClient
    from tests.helpers import make_settings
    from tests.integration.model_calls_support import MODELS, api_rows, write_catalog

    mock = mock_llm("--latency", "fixed:10")
    catalog = write_catalog(tmp_path / "catalog.toml", haiku={"retry_budget_s": 3},
                            sonnet={"provider": "openai", "fallback": None})
    env = {**fleet_env, "TARS_CATALOG_PATH": str(catalog), "TARS_PROVIDER_BASE_URL": mock.url,
           "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "OPENAI_API_KEY": FAKE_OPENAI_KEY}
    worker = start_worker(tiers=["haiku", "sonnet"], concurrency=20, env=env)
    with TarsClient(settings=make_settings(env)) as client:
        def run(specs):
            return client.wait_many([h.id for h in client.submit_many(specs)], timeout=60)

        ok = run([{"role": r, "prompt": f"fine {i}"} for i in range(3) for r in ("researcher", "engineer")])
        assert all(r.status == "succeeded" and r.attempts == 1 and r.output_tokens > 0 and r.cost_usd > 0
                   for r in ok)  # both clients, through real workers
        bad = run([{"role": r, "prompt": "[[mock:status=400]]"} for r in ("researcher", "engineer")])
        assert all(r.status == "failed" and r.attempts == 1 and "permanent_error" in r.error for r in bad)
        (denied,) = run([{"role": "researcher", "prompt": "[[mock:status=401]]"}])
        assert denied.status == "failed" and denied.attempts == 1 and "auth_error" in denied.error
        # The 401 opened the breaker: the next haiku request is refused without a call.
        calls_before = mock.total(MODELS["haiku"])
        (refused,) = run([{"role": "researcher", "prompt": "after the 401"}])
        assert refused.status == "failed" and refused.attempts == 0 and "circuit_open" in refused.error
        assert mock.total(MODELS["haiku"]) == calls_before

    assert all(r["outcome"] != "in_flight" for r in api_rows(db))
    worker.stop()
    with db.connect() as conn:
        for key in (FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY):
            for table in ("requests", "api_calls", "dead_letters"):
                hits = conn.execute(text(f"SELECT count(*) FROM {table} t WHERE t::text LIKE :k"),
                                    {"k": f"%{key}%"}).scalar()
                assert hits == 0, f"API key found in {table}"
            assert key not in worker.log()
    import re
    assert not re.search(r"\bsk-(ant|proj)", worker.log())  # not even a masked or partial key

    # The dead-letter view lists the failures with their reasons and re-submits them as new requests.
    listed = _tars(env, "dead-letter", "list", "--reason", "auth_error", "--json")
    import json
    assert [r["id"] for r in json.loads(listed)] == [denied.id]
    out = _tars(env, "dead-letter", "list", "--tier", "sonnet")
    assert bad[1].id in out and bad[0].id not in out
    resubmitted = _tars(env, "dead-letter", "resubmit", bad[0].id)
    old, _, new = resubmitted.strip().partition(" -> ")
    assert old == bad[0].id and new and new != old
    with db.connect() as conn:
        row = conn.execute(text("SELECT status, prompt FROM requests WHERE id = :i"), {"i": new}).one()
    assert row.prompt == "[[mock:status=400]]" and row.status in ("queued", "failed")
