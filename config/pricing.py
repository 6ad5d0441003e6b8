"""Token classes and their prices: what one model call costs, exactly.

Providers bill input tokens in classes with prices of their own:

* **Anthropic** (Messages API ``usage``): ``input_tokens`` (not cached), ``cache_creation_input_tokens``
  (prompt-cache writes; split by TTL in ``cache_creation.ephemeral_5m_input_tokens`` /
  ``ephemeral_1h_input_tokens``, a 5-minute write costing 1.25x input and a 1-hour write 2x),
  ``cache_read_input_tokens`` (0.1x input) and ``output_tokens``.
* **OpenAI** (Chat Completions ``usage``): ``prompt_tokens`` *includes*
  ``prompt_tokens_details.cached_tokens`` (billed at the cached-input price); the rest is billed
  as input. ``completion_tokens`` (reasoning tokens included) is output.
* **Batch** (both): the Message Batches API / Batch API bills every class at a discount
  (``batch_multiplier``, 0.5 for both today).

:class:`Usage` is one call's tokens by class, already normalised (``input_tokens`` never includes
cached tokens); :class:`Prices` is one model's list prices per million tokens, with the page they
come from. Prices are data (``[prices."MODEL"]`` in ``config/models.toml``); nothing here knows
a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

MILLION = Decimal(1_000_000)

#: The token classes, as ``api_calls`` / ``requests`` columns name them.
TOKEN_CLASSES: tuple[str, ...] = ("input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                                  "cache_read_tokens", "output_tokens")


@dataclass(frozen=True, slots=True)
class Usage:
    """One call's tokens by billing class."""

    #: Input not read from or written to a prompt cache (billed at the input price).
    input_tokens: int = 0
    output_tokens: int = 0
    #: Prompt-cache writes with the default 5-minute lifetime (Anthropic).
    cache_write_tokens: int = 0
    #: Prompt-cache writes with a 1-hour lifetime (Anthropic ``ttl: "1h"``).
    cache_write_1h_tokens: int = 0
    #: Input read from a prompt cache (Anthropic cache reads, OpenAI cached input).
    cache_read_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        """Every input token the model saw, whatever its class."""
        return self.input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens + self.cache_read_tokens

    @property
    def total_tokens(self) -> int:
        return self.total_input_tokens + self.output_tokens

    def columns(self) -> dict[str, int]:
        """The ``api_calls`` columns of this usage."""
        return {c: getattr(self, c) for c in TOKEN_CLASSES}


class Prices(BaseModel):
    """List prices of one model in US dollars per million tokens, by token class.

    A class the list does not give (``None``) is priced at the input price: say so in the
    catalog rather than rely on it for a model with prompt caching.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write_5m: Decimal | None = Field(default=None, ge=0)
    cache_write_1h: Decimal | None = Field(default=None, ge=0)
    cache_read: Decimal | None = Field(default=None, ge=0)
    #: Factor applied to every class for work sent through the provider's batch API.
    batch_multiplier: Decimal = Field(default=Decimal(1), gt=0, le=1)
    #: Where these prices were read (a URL), and when (ISO date or month).
    source: str | None = None
    as_of: str | None = None

    def per_mtok(self, token_class: str) -> Decimal:
        """Dollars per million tokens of one class (see :data:`TOKEN_CLASSES`)."""
        price = {"input_tokens": self.input, "output_tokens": self.output,
                 "cache_write_tokens": self.cache_write_5m, "cache_write_1h_tokens": self.cache_write_1h,
                 "cache_read_tokens": self.cache_read}[token_class]
        return self.input if price is None else price

    def cost_usd(self, usage: Usage, *, batch: bool = False) -> Decimal:
        """Dollars the provider bills for ``usage`` (exact decimal; ``batch``: at the batch discount)."""
        micro = sum((Decimal(getattr(usage, c)) * self.per_mtok(c) for c in TOKEN_CLASSES), Decimal(0))
        cost = micro / MILLION
        return cost * self.batch_multiplier if batch else cost
