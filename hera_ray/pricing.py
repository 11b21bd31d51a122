"""Prices as data, and cost as one function.

A cloud API bills a call by three kinds of token, each at its own price per million: the prompt
tokens it had to read (input), the prompt tokens it found in its prompt cache (cached input,
cheaper), and the tokens it wrote (output). :class:`PriceSheet` holds those three prices,
:class:`TokenCounts` a call's three counts, and :func:`cost` is the one place they meet: the
ledger, budgets, metrics and the bench all price a step with it.

Imports neither Ray nor torch: an edge box reads its prices from its config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hera_ray.errors import InvalidRequest

PER_MTOK = 1_000_000


class PriceSheet(BaseModel):
    """What one model charges, in USD per million tokens of each kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float = Field(..., ge=0, allow_inf_nan=False,
                                  description="USD per million prompt tokens not found in the prompt cache.")
    cached_input_per_mtok: float = Field(..., ge=0, allow_inf_nan=False,
                                         description="USD per million prompt tokens read from the prompt cache (at most input_per_mtok).")
    output_per_mtok: float = Field(..., ge=0, allow_inf_nan=False,
                                   description="USD per million completion tokens.")

    @model_validator(mode="after")
    def _cache_is_not_dearer(self) -> "PriceSheet":
        if self.cached_input_per_mtok > self.input_per_mtok:
            raise ValueError(f"cached_input_per_mtok ({self.cached_input_per_mtok:g}) may not exceed "
                             f"input_per_mtok ({self.input_per_mtok:g})")
        return self

    @classmethod
    def flat(cls, price_per_1k_tokens: float) -> "PriceSheet":
        """The old flat price (one price per 1,000 tokens of any kind) as a sheet.

        >>> PriceSheet.flat(0.002)
        PriceSheet(input_per_mtok=2.0, cached_input_per_mtok=2.0, output_per_mtok=2.0)
        """
        per_mtok = price_per_1k_tokens * (PER_MTOK / 1000)
        return cls(input_per_mtok=per_mtok, cached_input_per_mtok=per_mtok, output_per_mtok=per_mtok)

    @property
    def is_free(self) -> bool:
        return self.input_per_mtok == self.cached_input_per_mtok == self.output_per_mtok == 0


# OpenAI's published list price of gpt-4o-mini (platform.openai.com/docs/pricing, standard tier):
# the list price, before any batch or negotiated discount.
DEFAULT_CLOUD_PRICES = PriceSheet(input_per_mtok=0.15, cached_input_per_mtok=0.075, output_per_mtok=0.60)
#: The edge's default: a box the user already owns costs nothing per token.
FREE = PriceSheet(input_per_mtok=0.0, cached_input_per_mtok=0.0, output_per_mtok=0.0)


def parse_prices(values: PriceSheet | Mapping[str, Any] | None) -> PriceSheet:
    """A sheet from values that came over a process boundary (a report, the wire): None is
    :data:`FREE`; anything a sheet refuses is :class:`~hera_ray.errors.InvalidRequest`."""
    if values is None:
        return FREE
    if isinstance(values, PriceSheet):
        values = values.model_dump()  # re-checked: model_construct() skips validation
    try:
        return PriceSheet.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(": ".join(filter(None, (".".join(str(p) for p in err["loc"]), err["msg"]))) for err in e.errors())
        raise InvalidRequest(f"invalid prices: {problems}") from None


@dataclass(frozen=True)
class TokenCounts:
    """One call's tokens, by how they are billed."""

    uncached_prompt: int = 0
    cached_prompt: int = 0
    completion: int = 0

    def __post_init__(self) -> None:
        for name in ("uncached_prompt", "cached_prompt", "completion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"{name} tokens must be an integer >= 0, got {value!r}")

    @classmethod
    def from_prompt(cls, prompt: int, cached_prompt: int = 0, completion: int = 0) -> "TokenCounts":
        """Counts as an API reports them: the whole prompt, the part of it that was cached, and
        the completion. A cached part larger than the prompt is refused."""
        if cached_prompt > prompt:
            raise InvalidRequest(f"cached prompt tokens ({cached_prompt}) exceed the prompt's ({prompt})")
        return cls(uncached_prompt=prompt - cached_prompt, cached_prompt=cached_prompt, completion=completion)

    @property
    def prompt(self) -> int:
        return self.uncached_prompt + self.cached_prompt

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def cost(tokens: TokenCounts, prices: PriceSheet) -> float:
    """What ``tokens`` cost at ``prices``, in USD.

    A step that read 1,000 new prompt tokens and 9,000 cached ones and wrote 500, at gpt-4o-mini's
    list price: 1,000 × $0.15 + 9,000 × $0.075 + 500 × $0.60 per million
    = $0.00015 + $0.000675 + $0.0003 = $0.001125.

    >>> round(cost(TokenCounts(1_000, 9_000, 500), DEFAULT_CLOUD_PRICES), 9)
    0.001125
    """
    return (tokens.uncached_prompt * prices.input_per_mtok
            + tokens.cached_prompt * prices.cached_input_per_mtok
            + tokens.completion * prices.output_per_mtok) / PER_MTOK
