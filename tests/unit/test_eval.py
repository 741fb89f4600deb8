"""Issue 9's pure parts: the held-out set, the judge's verdicts and position swap, the metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gridtune.errors import ConfigError
from gridtune.sweep import SweepConfig, heldout_source, parse_config, parse_input
from localapi import judge as simulated_judge
from models import RowState, store
from tests.unit.test_finetune_helpers import make_context, make_sweep, sweep_config
from worker.evaluation import (
    build_items,
    checks,
    judge_messages,
    pair_outcome,
    parse_verdict,
    summarize,
    verdict_winner,
)

BASE = """
repeats = 3
[dimensions]
age = [18, 30]
gender = ["man", "woman"]
power = ["flight", "telepathy"]
[templates]
prompt = "Describe a {age}-year-old {gender} with the superpower of {power} in at most 100 words."
input = "{age}, {gender}, {power}"
"""


def config_with(eval_section: str) -> SweepConfig:
    return parse_config(BASE + "[eval]\n" + eval_section)


def test_held_out_repeats_and_cells_are_a_pure_function_of_params_and_repeat():
    config = config_with('holdout_repeats = 1\nholdout_cells = { power = ["flight"] }')
    sources = [heldout_source(config, *config.params(i)) for i in range(config.total_requests)]
    again = [heldout_source(config, *config.params(i)) for i in range(config.total_requests)]
    assert sources == again
    for index, source in enumerate(sources):
        params, repeat = config.params(index)
        expected = ("heldout_cell" if params["power"] == "flight" else "heldout_repeat" if repeat == 2 else None)
        assert source == expected, (params, repeat)
    assert sources.count(None) == 4 * 2  # 4 non-flight cells x 2 training repeats


def test_no_eval_section_holds_nothing_out_and_keeps_the_fingerprint():
    plain = parse_config(BASE)
    assert plain.eval is None
    assert all(heldout_source(plain, *plain.params(i)) is None for i in range(plain.total_requests))
    # Sweeps stored before [eval] existed resume under the same fingerprint.
    import hashlib

    from gridtune.sweep import REPORT_OPTIONS, RUN_OPTIONS

    body = {k: v for k, v in plain.snapshot().items() if k not in ("name", "eval")}
    body["model"] = {k: v for k, v in body["model"].items() if k not in RUN_OPTIONS}
    body["dataset"] = {k: v for k, v in body["dataset"].items() if k not in REPORT_OPTIONS}

    assert plain.fingerprint == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert config_with("holdout_repeats = 1").fingerprint != plain.fingerprint


@pytest.mark.parametrize("section, message", [
    ("holdout_repeats = 3", "eval.holdout_repeats: 3 of 3 repeats leaves none for training"),
    ("holdout_cells = { colour = [1] }", "eval.holdout_cells: 'colour' is not a declared dimension"),
    ('holdout_cells = { power = ["swimming"] }', "eval.holdout_cells.power: 'swimming' not among its values"),
    ('holdout_cells = { age = [18, 30] }', "eval.holdout_cells.age: holds out every value"),
    ('inputs = [" "]', "eval.inputs: an input is empty"),
    ("max_words = 0", "eval.max_words"),
    ("holdout_repeats = -1", "eval.holdout_repeats"),
    ('temperature = "hot"', "eval.temperature"),
    ("judges = 2", "eval.judges: unknown key"),
])
def test_bad_eval_settings_are_one_line(section, message):
    with pytest.raises(ConfigError) as error:
        config_with(section)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_free_inputs_parse_to_the_dimensions_they_spell():
    config = config_with('inputs = ["18, man, can eat a lot"]')
    assert parse_input(config, "18, man, can eat a lot") == {"age": 18, "gender": "man", "power": "can eat a lot"}
    assert parse_input(config, "a free sentence") is None


def row(params, repeat, text="an answer", state=RowState.OK, finish_reason="stop"):
    config_input = f"{params['age']}, {params['gender']}, {params['power']}"
    return SimpleNamespace(params=params, repeat=repeat, input_text=config_input, state=state,
                           finish_reason=finish_reason, response_text=text)


def test_items_are_the_held_out_inputs_then_the_free_inputs():
    config = config_with('holdout_repeats = 1\nholdout_cells = { power = ["flight"] }\n'
                         'inputs = ["18, man, can eat a lot", "hello", "18, man, flight"]')
    rows = [row(*config.params(i), text=f"answer {i}") for i in range(config.total_requests)]
    rows[2] = row(*config.params(2), state=RowState.FAILED, text=None)  # (18, man, flight) repeat 2
    rows[5] = row(*config.params(5), text="cut", finish_reason="length")  # (18, man, telepathy) repeat 2
    items = build_items(config, rows)
    held = [i for i in items if i["source"] != "free_input"]
    assert len(held) == 8  # every cell once: 4 flight cells, 4 cells by their last repeat
    first = held[0]
    assert first == {"input": "18, man, flight", "cell": {"age": 18, "gender": "man", "power": "flight"},
                     "source": "heldout_cell", "references": ["answer 0", "answer 1"]}
    assert held[1]["source"] == "heldout_repeat" and held[1]["references"] == []  # its one answer was cut
    free = items[len(held):]
    assert [i["input"] for i in free] == ["18, man, can eat a lot", "hello"]  # "18, man, flight" already asked
    assert free[0]["cell"] == {"age": 18, "gender": "man", "power": "can eat a lot"}
    assert free[1]["cell"] == {"input": "hello"}


def test_the_finalizer_never_writes_held_out_rows(tmp_path):
    ctx = make_context(tmp_path)
    config = sweep_config(finetune={"backend": "none"}, dataset={"validation_fraction": 0.0, "min_examples": 2},
                          eval={"holdout_cells": {"power": ["flight"]}})
    sweep, dataset_id = make_sweep(ctx, config=config)
    dataset = store.get_dataset(ctx.engine, dataset_id)
    assert dataset.dropped["heldout"] == 8
    lines = [json.loads(line) for line in open(dataset.train_path, encoding="utf-8")]
    assert len(lines) == dataset.train_examples == 8
    assert not any("flight" in m["content"] for line in lines for m in line["messages"])


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), ("b", "B"), ("Tie", "tie"), ("**B**", "B"), ("Answer A", "A"), ("Verdict: B.", "B"),
    ("I think answer B is better.", "B"), ("Both are equally good: tie", "tie"),
    ("", None), (None, None), ("Answer A and answer B are both fine", None), ("Neither.", None),
    ("A stubborn man who flies.", None), ("A is better.", "A"), ("B\n", "B"),
])
def test_verdicts_are_read_or_recorded_as_unreadable(text, verdict):
    assert parse_verdict(text) == verdict


def test_swapped_positions_agree_or_make_a_tie():
    # The judge prefers the same answer in both positions: a win (or a loss).
    assert pair_outcome(verdict_winner("base_first", "B"), verdict_winner("tuned_first", "A")) == "win"
    assert pair_outcome(verdict_winner("base_first", "A"), verdict_winner("tuned_first", "B")) == "loss"
    # A judge that always picks the first position disagrees with itself: a tie.
    assert pair_outcome(verdict_winner("base_first", "A"), verdict_winner("tuned_first", "A")) == "tie"
    assert pair_outcome(verdict_winner("base_first", "tie"), verdict_winner("tuned_first", "tie")) == "tie"
    assert pair_outcome(verdict_winner("base_first", None), verdict_winner("tuned_first", "A")) == "invalid"


def test_the_simulated_judge_reads_the_judge_prompt_and_prefers_the_first_on_a_tie():
    config = config_with("max_words = 20")
    item = {"input": "18, man, flight", "cell": {"age": 18, "gender": "man", "power": "flight"}}
    good = "An 18-year-old man whose superpower is flight."
    poor = "Someone."
    for first, second, expected in [(good, poor, "A"), (poor, good, "B"), (poor, poor, "A")]:
        messages = judge_messages(config, item, first, second)
        assert simulated_judge.verdict(messages[-1]["content"]) == expected
        assert parse_verdict(expected) == expected
    assert simulated_judge.verdict("Describe a hero.") is None


def test_checks_count_words_and_the_cells_values():
    cell = {"age": 18, "gender": "man", "power": "flight"}
    assert checks("An 18-year-old MAN who loves Flight.", cell, 10) == {"within_max_words": True, "mentions_values": True}
    assert checks("A man who flies " * 5, cell, 10) == {"within_max_words": False, "mentions_values": False}
    assert checks("anything", {"input": "hello"}, 10)["mentions_values"] is None


def test_metrics_per_cell_and_overall():
    config = config_with("max_words = 5")
    items = [{"input": "18, man, flight", "cell": {"age": 18, "power": "flight"}, "source": "heldout_cell"},
             {"input": "30, man, flight", "cell": {"age": 30, "power": "flight"}, "source": "heldout_cell"},
             {"input": "30, man, flight", "cell": {"age": 30, "power": "flight"}, "source": "heldout_cell"},
             {"input": "hello", "cell": {"input": "hello"}, "source": "free_input"}]
    ok = lambda text: SimpleNamespace(state=RowState.OK, text=text)  # noqa: E731
    answers = {}
    for i in range(4):
        answers[(i, "base")] = ok("nothing useful here at all today")
        answers[(i, "tuned")] = ok(f"{18 if i == 0 else 30} flight hero")
    verdict = lambda winner: SimpleNamespace(state=RowState.OK, winner=winner, verdict_text="x")  # noqa: E731
    verdicts = {(0, "base_first"): verdict("tuned"), (0, "tuned_first"): verdict("tuned"),  # win
                (1, "base_first"): verdict("base"), (1, "tuned_first"): verdict("tuned"),  # tie
                (2, "base_first"): verdict("base"), (2, "tuned_first"): verdict("base"),  # loss
                (3, "base_first"): verdict("invalid"), (3, "tuned_first"): verdict("tuned")}  # unreadable
    summary = summarize(config, items, answers, verdicts,
                        {"overall": {"base": 3.0, "tuned": 2.5}, "cells": {json.dumps(items[0]["cell"], sort_keys=True):
                                                                            {"base": 3.1, "tuned": 2.0}}})
    overall = summary["overall"]
    assert (overall["wins"], overall["ties"], overall["losses"], overall["invalid_verdicts"]) == (1, 1, 1, 1)
    assert overall["win_rate"] == pytest.approx((1 + 0.5) / 3, abs=1e-4)
    assert summary["judged"] == 3 and summary["inputs"] == 4
    assert overall["checks"]["base"] == {"within_max_words": 0.0, "mentions_values": 0.0}
    assert overall["checks"]["tuned"] == {"within_max_words": 1.0, "mentions_values": 1.0}
    assert overall["validation_loss"] == {"base": 3.0, "tuned": 2.5}
    cells = {json.dumps(c["cell"], sort_keys=True): c for c in summary["cells"]}
    first = cells[json.dumps({"age": 18, "power": "flight"}, sort_keys=True)]
    assert (first["n"], first["win_rate"], first["validation_loss"]) == (1, 1.0, {"base": 3.1, "tuned": 2.0})
    second = cells[json.dumps({"age": 30, "power": "flight"}, sort_keys=True)]
    assert (second["n"], second["wins"], second["ties"], second["losses"], second["win_rate"]) == (2, 0, 1, 1, 0.25)
    free = cells[json.dumps({"input": "hello"}, sort_keys=True)]
    assert free["win_rate"] is None and free["invalid_verdicts"] == 1 and free["checks"]["tuned"]["mentions_values"] is None
    assert summary["samples"][1]["verdicts"] == [{"order": "base_first", "winner": "base", "text": "x"},
                                                 {"order": "tuned_first", "winner": "tuned", "text": "x"}]


def test_eval_without_a_tuned_model_or_a_held_out_set_is_one_line(tmp_path, monkeypatch, capsys):
    from models import JobStatus
    from producer.cli import main

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    from gridtune.settings import get_settings, reset_settings

    reset_settings()
    from worker.context import WorkerContext

    ctx = WorkerContext(get_settings())
    config = sweep_config(finetune={"backend": "none"}, dataset={"validation_fraction": 0.0, "min_examples": 2})
    sweep, dataset_id = make_sweep(ctx, config=config)
    assert main(["eval", sweep.name]) == 2
    assert "has no fine-tune job yet" in capsys.readouterr().err
    # A tuned model, but nothing held out and no free inputs: nothing to evaluate.
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "openai", "gpt-4o-mini-2024-07-18")
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED, fine_tuned_model="ft:gpt-4o-mini-2024-07-18:x:y:z")
    assert main(["eval", sweep.name]) == 2
    err = capsys.readouterr().err
    assert "has nothing to evaluate: add an [eval] section" in err and err.count("\n") == 1
    assert main(["eval", "nope"]) == 2
