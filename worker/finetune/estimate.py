"""What a fine-tune will cost before it is submitted: epochs, billed training tokens, dollars."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gridtune import pricing
from gridtune.errors import UserError
from gridtune.files import read_text
from gridtune.sweep import FinetuneSettings
from worker.tokens import count_messages

AUTO_EPOCHS = 3
# "auto" aims for at least 100 and at most 25,000 examples seen over all epochs.
MIN_EXAMPLES_SEEN = 100
MAX_EXAMPLES_SEEN = 25_000


def default_epochs(examples: int) -> int:
    """OpenAI's "auto" epoch count for a training file of `examples` examples."""
    if examples <= 0:
        return AUTO_EPOCHS
    if AUTO_EPOCHS * examples < MIN_EXAMPLES_SEEN:
        return min(25, MIN_EXAMPLES_SEEN // examples)
    if AUTO_EPOCHS * examples > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // examples)
    return AUTO_EPOCHS


def example_tokens(path: str | Path, encoding: str) -> list[int]:
    """Token count of every example in a chat-format JSONL file, in file order.

    The file is read by `gridtune.files.read_text` (UTF-8, or a UTF with a byte-order mark: an
    editor may have re-saved it); UserError names the file and line of anything unusable.
    """
    counts = []
    for number, line in enumerate(read_text(path, "JSONL training file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            counts.append(count_messages(messages, encoding))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{path} line {number}: not a chat-format example ({exc.__class__.__name__})") from None
    return counts


@dataclass(frozen=True)
class Estimate:
    examples: int
    epochs: int
    tokens_per_epoch: int  # sum of min(limit, tokens) over the examples
    training_tokens: int
    cost_usd: float | None  # None: the base model is not in the price table

    def describe(self, base_model: str) -> str:
        if self.cost_usd is None:
            cost = f"no price for {base_model} in the price table"
        else:
            cost = f"about ${self.cost_usd:,.2f}"
        return (
            f"estimate: {self.examples:,} examples, {self.epochs} epochs x {self.tokens_per_epoch:,} tokens "
            f"= {self.training_tokens:,} training tokens, {cost}"
        )

    def as_data(self) -> dict:
        return {
            "type": "estimate",
            "examples": self.examples,
            "epochs": self.epochs,
            "tokens_per_epoch": self.tokens_per_epoch,
            "training_tokens": self.training_tokens,
            "cost_usd": self.cost_usd,
        }


def estimate_training(token_counts: list[int], settings: FinetuneSettings) -> Estimate:
    """Billed training tokens ~ epochs x sum(min(limit, tokens of each example))."""
    epochs = settings.n_epochs if settings.n_epochs != "auto" else default_epochs(len(token_counts))
    per_epoch = sum(min(settings.max_example_tokens, tokens) for tokens in token_counts)
    training_tokens = epochs * per_epoch
    return Estimate(
        examples=len(token_counts),
        epochs=epochs,
        tokens_per_epoch=per_epoch,
        training_tokens=training_tokens,
        cost_usd=pricing.training_cost(settings.base_model, training_tokens),
    )
