"""Cost estimates from a small editable price table (gridtune/prices.toml or $GRIDTUNE_PRICES).

Prices are USD per 1M tokens. Each model row has `input` and `output` (online calls), optionally
`batch_input` and `batch_output` (the Batch API; half the online price where absent, as OpenAI
charges) and `training` (fine-tuning).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from gridtune.errors import UserError
from gridtune.files import bundled, read_text
from gridtune.settings import get_settings

Mode = Literal["online", "batch"]
BATCH_DISCOUNT = 0.5  # what the Batch API charges of the online price when a row names no batch price
_PRICE_KEYS = ("input", "output", "batch_input", "batch_output", "training")


@dataclass(frozen=True)
class Price:
    """One model's prices, USD per 1M tokens."""

    input: float
    output: float
    batch_input: float
    batch_output: float
    training: float | None = None

    def per_token(self, mode: Mode) -> tuple[float, float]:
        """(input, output) USD per token in `mode`."""
        if mode == "batch":
            return self.batch_input / 1_000_000, self.batch_output / 1_000_000
        return self.input / 1_000_000, self.output / 1_000_000


@lru_cache(maxsize=4)
def _table(path: str | None) -> dict[str, Price]:
    source = path or str(bundled("prices.toml"))
    text = read_text(source, "TOML price table")  # one reader for every user file: encodings, BOMs
    try:
        models = tomllib.loads(text)["models"]
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"price table {source}: not valid TOML: {exc}") from None
    except KeyError:
        raise UserError(f'price table {source}: no [models."NAME"] tables') from None
    table = {}
    for name, row in models.items():
        if not isinstance(row, dict) or set(row) - set(_PRICE_KEYS) or not {"input", "output"} <= set(row):
            raise UserError(f"price table {source}: model {name!r} needs input and output prices "
                            f"(and may have {', '.join(_PRICE_KEYS[2:])}), nothing else")
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"price table {source}: {name}.{key} must be a number >= 0, not {value!r}")
        table[name] = Price(
            input=float(row["input"]), output=float(row["output"]),
            batch_input=float(row.get("batch_input", row["input"] * BATCH_DISCOUNT)),
            batch_output=float(row.get("batch_output", row["output"] * BATCH_DISCOUNT)),
            training=float(row["training"]) if "training" in row else None,
        )
    return table


def price(model: str) -> Price | None:
    """The price row for `model`: exact name, else its base (ft:BASE:..., BASE-2024-07-18).

    Raises UserError when the table (GRIDTUNE_PRICES) cannot be read or is malformed.
    """
    path = get_settings().prices_path
    table = _table(str(path) if path else None)
    name = model.split(":")[1] if model.startswith("ft:") else model
    candidates = [name, re.sub(r"-\d{4}-\d{2}-\d{2}$", "", name)]
    for candidate in candidates:
        if candidate in table:
            return table[candidate]
    return None


def inference_cost(model: str, prompt_tokens: int, completion_tokens: int, mode: Mode = "online") -> float | None:
    """USD for `prompt_tokens` in and `completion_tokens` out; None when the model has no price."""
    row = price(model)
    if row is None:
        return None
    per_input, per_output = row.per_token(mode)
    return prompt_tokens * per_input + completion_tokens * per_output


def training_cost(model: str, trained_tokens: int) -> float | None:
    row = price(model)
    if row is None or row.training is None:
        return None
    return trained_tokens * row.training / 1_000_000
