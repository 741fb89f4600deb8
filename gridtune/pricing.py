"""Cost estimates from a small editable price table (gridtune/prices.toml or $GRIDTUNE_PRICES)."""

from __future__ import annotations

import re
import tomllib
from functools import lru_cache

from gridtune.errors import UserError
from gridtune.files import bundled, read_text
from gridtune.settings import get_settings


@lru_cache(maxsize=4)
def _table(path: str | None) -> dict[str, dict[str, float]]:
    """The price table: {model: {"input", "output", "training": USD per 1M tokens}}; UserError if unusable."""
    source = path or str(bundled("prices.toml"))
    text = read_text(source, "TOML price table")
    try:
        table = tomllib.loads(text)["models"]
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source} (GRIDTUNE_PRICES): not valid TOML: {exc}") from None
    except KeyError:
        raise UserError(f"{source} (GRIDTUNE_PRICES): no [models] table") from None
    for model, row in table.items():
        if not isinstance(row, dict) or not all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                                                for k in ("input", "output")):
            raise UserError(f"{source} (GRIDTUNE_PRICES): models.{model} needs numbers `input` and `output` "
                            "(USD per 1M tokens)")
    return table


def price(model: str) -> dict[str, float] | None:
    """The price row for `model`: exact name, else its base (ft:BASE:..., BASE-2024-07-18)."""
    path = get_settings().prices_path
    table = _table(str(path) if path else None)
    name = model.split(":")[1] if model.startswith("ft:") else model
    candidates = [name, re.sub(r"-\d{4}-\d{2}-\d{2}$", "", name)]
    for candidate in candidates:
        if candidate in table:
            return table[candidate]
    return None


def inference_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    row = price(model)
    if row is None:
        return None
    return (prompt_tokens * row["input"] + completion_tokens * row["output"]) / 1_000_000


def training_cost(model: str, trained_tokens: int) -> float | None:
    row = price(model)
    if row is None or "training" not in row:
        return None
    return trained_tokens * row["training"] / 1_000_000
