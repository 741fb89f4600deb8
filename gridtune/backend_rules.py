"""What each fine-tune backend accepts, checked here before anything is uploaded or paid for.

One table (`RULES`) and three checks: `config_problems` (at config load: hyperparameters, suffix,
example token limit), `grid_problems` (before `sweep` sends anything: can the grid ever give
enough examples?) and `dataset_problems` (after the dataset is built, before the upload: example
count, longest example, file size). Each returns one line per problem; an empty list means fine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gridtune.sweep import SweepConfig


@dataclass(frozen=True)
class BackendRules:
    min_examples: int = 1
    max_example_tokens: int | None = None  # per training example
    max_file_bytes: int | None = None  # per uploaded file
    max_suffix: int | None = None  # characters
    # hyperparameter -> (lowest, highest) accepted; values outside are refused by the provider
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


# OpenAI's published fine-tuning limits (API reference and fine-tuning guide, 2026-11): at least
# 10 examples, 65,536 tokens per example (gpt-4o-mini), training files up to 512 MB, a suffix of
# up to 64 characters, n_epochs 1..50, batch_size 1..256, learning_rate_multiplier > 0 (..10).
RULES: dict[str, BackendRules] = {
    "openai": BackendRules(min_examples=10, max_example_tokens=65_536, max_file_bytes=512 * 1024**2, max_suffix=64,
                           ranges={"n_epochs": (1, 50), "batch_size": (1, 256),
                                   "learning_rate_multiplier": (1e-9, 10)}),
    "local": BackendRules(min_examples=1),
    "none": BackendRules(min_examples=1),
}


def rules_for(config: SweepConfig) -> BackendRules:
    return RULES[config.finetune.backend]


def min_usable_examples(config: SweepConfig) -> int:
    """The fewest usable training examples this sweep can go on with: the config's or the backend's."""
    return max(config.dataset.min_examples, rules_for(config).min_examples)


def config_problems(config: SweepConfig) -> list[str]:
    backend, rules, settings = config.finetune.backend, rules_for(config), config.finetune
    problems = []
    for name, (low, high) in rules.ranges.items():
        value = getattr(settings, name)
        if value != "auto" and not low <= value <= high:
            problems.append(f"finetune.{name} = {value}: the {backend} backend accepts {low:g} to {high:g}")
    if rules.max_suffix is not None and settings.suffix and len(settings.suffix) > rules.max_suffix:
        problems.append(f"finetune.suffix is {len(settings.suffix)} characters: the {backend} backend accepts "
                        f"at most {rules.max_suffix}")
    if rules.max_example_tokens is not None and settings.max_example_tokens > rules.max_example_tokens:
        problems.append(f"finetune.max_example_tokens = {settings.max_example_tokens:,}: the {backend} backend "
                        f"refuses examples over {rules.max_example_tokens:,} tokens")
    return problems


def grid_problems(config: SweepConfig) -> list[str]:
    """A grid whose distinct inputs are fewer than the minimum can never give a usable dataset.

    Repeats of one combination share one input; a server that ignores sampling settings answers
    them identically, and identical examples are dropped as duplicates.
    """
    if config.finetune.backend == "none" and config.dataset.min_examples <= 1:
        return []
    needed = min_usable_examples(config)
    trainable = trainable_combinations(config)
    if trainable >= needed:
        return []
    why = ("dataset.min_examples" if needed == config.dataset.min_examples
           else f"the {config.finetune.backend} backend's minimum")
    held = "" if trainable == config.combinations else f" outside [eval] holdout_cells (of {config.combinations})"
    return [f"the grid has {trainable} combinations{held}, fewer than the {needed} usable examples needed "
            f"({why}); repeats of a combination may all come back identical and be dropped as duplicates: "
            "add dimension values"]


def trainable_combinations(config: SweepConfig) -> int:
    """Combinations whose rows may enter training: [eval] holdout_cells' values never do."""
    held = config.eval.holdout_cells if config.eval is not None else {}
    return math.prod(
        sum(1 for v in values if json.dumps(v) not in {json.dumps(h) for h in held.get(name, [])})
        for name, values in config.dimensions.items()
    )


def dataset_problems(config: SweepConfig, token_counts: list[int], files: list[str | Path]) -> list[str]:
    """Checks on a built dataset before it is uploaded: example count, longest example, file sizes."""
    backend, rules = config.finetune.backend, rules_for(config)
    problems = []
    needed = min_usable_examples(config)
    if len(token_counts) < needed:
        source = ("dataset.min_examples" if needed == config.dataset.min_examples
                  else f"the {backend} backend's minimum")
        problems.append(f"the training file has {len(token_counts)} examples, fewer than {needed} ({source})")
    if rules.max_example_tokens is not None and token_counts and max(token_counts) > rules.max_example_tokens:
        over = sum(1 for n in token_counts if n > rules.max_example_tokens)
        problems.append(f"{over} examples are longer than the {backend} backend's {rules.max_example_tokens:,} tokens")
    if rules.max_file_bytes is not None:
        for path in files:
            size = Path(path).stat().st_size
            if size > rules.max_file_bytes:
                problems.append(f"{Path(path).name} is {size / 1024**2:,.0f} MB, over the {backend} backend's "
                                f"{rules.max_file_bytes / 1024**2:,.0f} MB")
    return problems
