"""Cost estimates from a small editable price table (gridtune/prices.toml or $GRIDTUNE_PRICES)."""

from __future__ import annotations

import re
import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path

from gridtune.settings import get_settings


@lru_cache(maxsize=4)
def _table(path: str | None) -> dict[str, dict[str, float]]:
    data = Path(path).read_bytes() if path else resources.files("gridtune").joinpath("prices.toml").read_bytes()
    return tomllib.loads(data.decode())["models"]


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
