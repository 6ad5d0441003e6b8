"""``tars mock-llm``: run the mock provider on 127.0.0.1 (see :mod:`loadgen.mock_llm.server`)."""

from __future__ import annotations

import json
import os

import click

from loadgen.mock_llm.server import MockConfig, serve


@click.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--latency", default="uniform:20:60", show_default=True, help="fixed:MS or uniform:LOW_MS:HIGH_MS.")
@click.option("--model-latency", multiple=True, help="MODEL=SPEC, per model; repeat.")
@click.option("--error-rate", type=float, default=0.0, show_default=True, help="Fraction answered 500.")
@click.option("--overload-rate", type=float, default=0.0, show_default=True, help="Fraction answered 529/503.")
@click.option("--timeout-rate", type=float, default=0.0, show_default=True, help="Fraction that hang --hang-s.")
@click.option("--hang-s", type=float, default=30.0, show_default=True)
@click.option("--rpm", type=int, default=0, show_default=True, help="Own request limit per model (0 = none).")
@click.option("--tpm", type=int, default=0, show_default=True, help="Own token limit per model (0 = none).")
@click.option("--window-s", type=float, default=60.0, show_default=True, help="Length of the mock's 'minute'.")
@click.option("--retry-after-s", type=float, default=None, help="Fixed Retry-After for 429s.")
@click.option("--limit-status", type=click.Choice(["429", "529"]), default="429", show_default=True)
@click.option("--output-tokens", default="20:60", show_default=True, help="LOW:HIGH output tokens per answer.")
@click.option("--expected-key-env", default=None,
              help="Name of an environment variable holding the one API key accepted (others get 401).")
@click.option("--config-json", default=None, help="JSON object of further MockConfig fields.")
@click.option("--seed", type=int, default=None)
def mock_llm(host: str, port: int, latency: str, model_latency: tuple[str, ...], error_rate: float,
             overload_rate: float, timeout_rate: float, hang_s: float, rpm: int, tpm: int, window_s: float,
             retry_after_s: float | None, limit_status: str, output_tokens: str, expected_key_env: str | None,
             config_json: str | None, seed: int | None) -> None:
    """A mock Anthropic + OpenAI server that counts what it receives (GET /_mock/stats)."""
    lo, _, hi = output_tokens.partition(":")
    cfg = MockConfig(
        latency=latency,
        model_latency=dict(m.split("=", 1) for m in model_latency),
        error_rate=error_rate, overload_rate=overload_rate, timeout_rate=timeout_rate, hang_s=hang_s,
        rpm=rpm, tpm=tpm, window_s=window_s, retry_after_s=retry_after_s, limit_status=int(limit_status),
        output_tokens=(int(lo), int(hi or lo)),
        expected_key=os.environ.get(expected_key_env) if expected_key_env else None,
        seed=seed,
    )
    if config_json:
        cfg.update(json.loads(config_json))
    serve(host=host, port=port, config=cfg)
