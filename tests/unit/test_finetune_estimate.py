"""Epochs, billed training tokens and prices before a fine-tune is submitted."""

from __future__ import annotations

import json

import pytest

from gridtune import pricing
from gridtune.sweep import FinetuneSettings
from localapi.finetune import default_epochs as server_default_epochs
from tests.unit.test_finetune_helpers import sweep_config
from worker.dataset import chat_example
from worker.finetune.estimate import default_epochs, estimate_training, example_tokens
from worker.tokens import count_messages


@pytest.mark.parametrize(("examples", "epochs"), [
    (1, 25),        # 3n < 100: min(25, 100 // n)
    (4, 25),
    (5, 20),
    (10, 10),
    (33, 3),        # 99 < 100, and 100 // 33 = 3
    (34, 3),        # 102: the plain 3
    (8_333, 3),     # 24,999 <= 25,000
    (8_334, 2),     # 25,002 > 25,000: max(1, 25,000 // n)
    (12_500, 2),
    (12_501, 1),
    (100_000, 1),
])
def test_auto_epochs(examples, epochs):
    assert default_epochs(examples) == epochs


def test_auto_epochs_agree_with_the_local_server():
    for examples in [*range(1, 400), *range(8_000, 8_700), 12_500, 12_501, 25_000, 25_001, 1_000_000]:
        assert default_epochs(examples) == server_default_epochs(examples), examples


def test_training_tokens_cap_each_example_and_multiply_by_epochs():
    settings = FinetuneSettings(base_model="gpt-4o-mini-2024-07-18", max_example_tokens=1_000)
    estimate = estimate_training([10, 100, 5_000], settings)
    assert estimate.examples == 3 and estimate.epochs == 25  # 3 examples: min(25, 100 // 3)
    assert estimate.tokens_per_epoch == 10 + 100 + 1_000
    assert estimate.training_tokens == 25 * 1_110
    assert estimate.cost_usd == pytest.approx(25 * 1_110 * 3.00 / 1_000_000)


def test_configured_epochs_win_and_unknown_models_have_no_price():
    settings = FinetuneSettings(base_model="my-org/llama-tiny", n_epochs=2)
    estimate = estimate_training([40] * 50, settings)
    assert estimate.epochs == 2 and estimate.training_tokens == 2 * 50 * 40
    assert estimate.cost_usd is None
    assert "no price for my-org/llama-tiny" in estimate.describe(settings.base_model)


def test_describe_and_data():
    settings = FinetuneSettings(base_model="gpt-4.1-mini", n_epochs=3)
    estimate = estimate_training([1_000] * 100, settings)
    assert estimate.describe(settings.base_model) == (
        "estimate: 100 examples, 3 epochs x 100,000 tokens = 300,000 training tokens, about $1.50")
    assert estimate.as_data() == {"type": "estimate", "examples": 100, "epochs": 3, "tokens_per_epoch": 100_000,
                                  "training_tokens": 300_000, "cost_usd": pytest.approx(1.5)}


def test_example_tokens_count_every_line_of_the_file(tmp_path):
    config = sweep_config()
    examples = [chat_example(config, f"{age}, man, flight", "A hero " * age) for age in (18, 30, 90)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples) + "\n")
    assert example_tokens(path, "o200k_base") == [count_messages(e["messages"], "o200k_base") for e in examples]


@pytest.mark.parametrize(("model", "price"), [
    ("gpt-4o-mini-2024-07-18", 3.00),
    ("ft:gpt-4o-mini-2024-07-18:org:superhero:abc123", 3.00),
    ("gpt-4.1-nano", 1.50),
    ("davinci-002", 6.00),
    ("babbage-002", 0.40),
])
def test_training_prices(model, price):
    assert pricing.training_cost(model, 2_000_000) == pytest.approx(2 * price)
