"""The price table: online and batch prices, GRIDTUNE_PRICES, and one-line errors for a bad table."""

from __future__ import annotations

import pytest

from gridtune import pricing
from gridtune.errors import UserError
from gridtune.settings import reset_settings
from producer.cli import main


def test_the_bundled_table_knows_batch_prices_at_half_the_online_price():
    online = pricing.inference_cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000)
    batch = pricing.inference_cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000, "batch")
    assert online == pytest.approx(0.15 + 0.60) and batch == pytest.approx(online / 2)
    assert pricing.inference_cost("no-such-model", 10, 10) is None


def use_table(monkeypatch, tmp_path, text: str):
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("GRIDTUNE_PRICES", str(path))
    reset_settings()


def test_gridtune_prices_replaces_the_table_and_batch_defaults_to_half(monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path, '[models."house-model"]\ninput = 2.0\noutput = 4.0\n'
                                     '[models."cheap"]\ninput = 1\noutput = 1\nbatch_input = 0.1\nbatch_output = 0.2\n')
    assert pricing.inference_cost("house-model", 1_000_000, 0) == pytest.approx(2.0)
    assert pricing.inference_cost("house-model", 0, 1_000_000, "batch") == pytest.approx(2.0)
    assert pricing.inference_cost("cheap", 1_000_000, 1_000_000, "batch") == pytest.approx(0.3)
    assert pricing.price("gpt-4o-mini") is None  # the bundled table is not merged in


@pytest.mark.parametrize(("text", "words"), [
    ("not toml [", "not valid TOML"),
    ("[other]\nx = 1\n", "no [models"),
    ('[models."m"]\ninput = 1\n', "needs input and output"),
    ('[models."m"]\ninput = 1\noutput = -1\n', "m.output must be a number >= 0"),
    ('[models."m"]\ninput = 1\noutput = 1\nbatch = 1\n', "needs input and output"),
])
def test_a_bad_table_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, text, words):
    use_table(monkeypatch, tmp_path, text)
    with pytest.raises(UserError, match="price table"):
        pricing.price("m")
    (tmp_path / "s.toml").write_text('[dimensions]\nn = [1]\n[templates]\nprompt = "{n}"\ninput = "{n}"\n')
    assert main(["estimate", "--config", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_missing_table_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDTUNE_PRICES", str(tmp_path / "nope.toml"))
    reset_settings()
    with pytest.raises(UserError, match="nope.toml: no such file"):
        pricing.price("gpt-4o-mini")
