"""The mock LLM server (``tars mock-llm``): both wire protocols, faults, limits, and counters."""

from loadgen.mock_llm.server import MockConfig, MockLLM, serve

__all__ = ["MockConfig", "MockLLM", "serve"]
