"""The dataset report the finalizer stores (issue 9, requirement 4): its contract shape and counts."""

import hashlib
import json

import pytest

from gridtune.errors import ConfigError
from gridtune.sweep import REPORT_OPTIONS, RUN_OPTIONS, parse_config
from worker.dataset import DatasetRow, row_fates, write_dataset
from worker.dataset_report import NearDuplicates, RefusalPatterns, digest

CONFIG = """
repeats = 3
[dimensions]
age = [18, 30]
power = ["flight", "strength"]
[templates]
prompt = "A {age}-year-old hero with {power}."
input = "{age}, {power}"
[dataset]
validation_fraction = 0
"""

CELL_KEYS = {"cell", "requests", "ok", "failed", "dropped", "kept", "train", "validation", "heldout",
             "prompt_tokens", "completion_tokens", "cost_usd"}
STORY = ("{name} was born in a small harbour town where the fishing boats left before dawn and came back "
         "after dark, and every child learnt to read the weather from the colour of the clouds over the hills")


def rows_for(config, answer, state="ok", finish="stop", cost=0.001):
    """One DatasetRow per request; answer(index, params, repeat) -> text."""
    out = []
    for index in range(config.total_requests):
        params, repeat = config.params(index)
        _, input_text = config.render(params)
        out.append(DatasetRow(state, finish, answer(index, params, repeat), input_text, None, params, repeat, index,
                              10, 20, cost))
    return out


def distinct(index, params, repeat):
    # Unrelated words per request: no two answers are near-duplicates.
    words = [hashlib.sha1(f"{index}-{i}".encode()).hexdigest()[:6] for i in range(25)]
    return f"Hero {params['age']} {params['power']}: " + " ".join(words)


def test_report_has_the_contract_shape_and_counts_each_cell(tmp_path):
    config = parse_config(CONFIG)
    data = rows_for(config, distinct)
    data[1] = data[1]._replace(state="failed", response=None, prompt_tokens=None, completion_tokens=None,
                               cost_usd=None)
    data[2] = data[2]._replace(finish_reason="length")
    data[4] = data[4]._replace(response=data[3].response)  # an exact duplicate within the cell
    summary = write_dataset(data, config, tmp_path)
    report = summary.report
    assert json.loads((tmp_path / "report.json").read_text()) == report == json.loads(json.dumps(report))
    assert set(report) >= {"dimensions", "cells", "lengths", "duplicates", "refusals", "totals"}
    assert report["dimensions"] == ["age", "power"]
    assert len(report["cells"]) == 4 and all(set(c) >= CELL_KEYS for c in report["cells"])
    first, second = report["cells"][0], report["cells"][1]
    assert first["cell"] == {"age": 18, "power": "flight"} and second["cell"] == {"age": 18, "power": "strength"}
    assert (first["requests"], first["ok"], first["failed"], first["kept"], first["train"]) == (3, 2, 1, 1, 1)
    assert first["dropped"] == {"truncated": 1, "duplicates": 0, "near_duplicates": 0, "refusal_like": 0}
    assert second["dropped"]["duplicates"] == 1 and second["kept"] == 2
    assert first["prompt_tokens"] == 20 and first["completion_tokens"] == 40
    assert first["cost_usd"] == pytest.approx(0.002) and first["heldout"] == 0
    totals = report["totals"]
    assert totals == {"requests": 12, "ok": 11, "failed": 1, "kept": 9, "train": 9, "validation": 0,
                      "heldout": 0, "prompt_tokens": 110, "completion_tokens": 220,
                      "cost_usd": pytest.approx(0.011)}
    assert totals["train"] == summary.train.examples
    lengths = report["lengths"]
    assert lengths["unit"] == "words" and sum(lengths["counts"]) == 9
    assert len(lengths["edges"]) == len(lengths["counts"]) + 1 and lengths["edges"][0] == 0
    assert lengths["max"] == 28 and lengths["p50"] == 28 and lengths["p90"] == 28
    assert report["duplicates"]["exact"] == 1
    assert report["duplicates"]["near"]["flagged"] == 0 and report["refusals"]["count"] == 0
    assert digest(report) is None


def test_unpriced_rows_give_a_null_cost():
    config = parse_config(CONFIG)
    report = write_report(config, rows_for(config, distinct, cost=None))
    assert report["cells"][0]["cost_usd"] is None and report["totals"]["cost_usd"] is None


def write_report(config, rows, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        return write_dataset(rows, config, Path(tmp or out)).report


def near_answer(index, params, repeat):
    # Every repeat of a cell tells the cell's own 30 words with " again" added per repeat:
    # near-duplicates within a cell (similarity 0.93-0.97), never exact ones, nothing across cells.
    cell = f"{params['age']}-{params['power']}"
    return " ".join(hashlib.sha1(f"{cell}-{i}".encode()).hexdigest()[:6] for i in range(30)) + " again" * repeat


def test_near_duplicates_are_flagged_and_kept_by_default():
    config = parse_config(CONFIG)
    report = write_report(config, rows_for(config, near_answer))
    near = report["duplicates"]["near"]
    assert near["threshold"] == 0.9 and near["dropped"] == 0
    assert near["flagged"] >= 4  # at least one later repeat in each of the 4 cells
    pair = near["pairs"][0]
    assert pair["a"] < pair["b"] and pair["similarity"] >= 0.9
    assert report["totals"]["kept"] == 12
    assert "near-duplicate answers" in digest(report)


def test_near_duplicates_are_dropped_when_the_config_says_so():
    config = parse_config(CONFIG + "drop_near_duplicates = true\nnear_duplicate_threshold = 0.8\n")
    report = write_report(config, rows_for(config, near_answer))
    near = report["duplicates"]["near"]
    assert near["threshold"] == 0.8 and near["flagged"] == near["dropped"] == 8  # 2 of 3 repeats, 4 cells
    assert report["totals"]["kept"] == 4
    assert all(c["dropped"]["near_duplicates"] == 2 for c in report["cells"])


def test_near_duplicate_index_finds_close_texts_only():
    index = NearDuplicates(0.9)
    base = STORY.format(name="Ann")
    assert index.check(0, base) is None
    assert index.check(1, "A completely different answer about a dragon who guards the mountain pass at night.") is None
    found = index.check(2, base + " again")
    assert found is not None and found[0] == 0 and found[1] >= 0.9
    # One word of 37 changed: 3 of 35 word 3-grams differ, Jaccard 32/38 = 0.84.
    assert index.check(3, base.replace("harbour", "river")) is None
    lower = NearDuplicates(0.7)
    lower.check(0, base)
    assert lower.check(1, base.replace("harbour", "river")) is not None


def test_refusal_like_answers_are_flagged_with_default_patterns():
    patterns = RefusalPatterns(parse_config(CONFIG).dataset.refusal_patterns)
    for text in ("I'm sorry, but I can't help with that.", "I can’t create content about real people.",
                 "As an AI language model, I cannot describe a person.", "I am unable to comply."):
        assert patterns.match(text), text
    for text in ("I can't be stopped! said the hero.", "She is sorry for nothing and flies at dawn.",
                 "A brave woman of 30 who can lift a truck."):
        assert not patterns.match(text), text


def test_refusal_like_answers_are_counted_and_optionally_dropped():
    refusing = lambda index, params, repeat: (  # noqa: E731
        "I'm sorry, but I can't help with that request." if index in (0, 5) else distinct(index, params, repeat))
    config = parse_config(CONFIG)
    report = write_report(config, rows_for(config, refusing))
    assert report["refusals"]["count"] == 2 and report["refusals"]["examples"] == [0, 5]
    assert report["refusals"]["dropped"] == 0 and report["totals"]["kept"] == 12
    assert "2 refusal-like answers (kept)" in digest(report)
    dropping = parse_config(CONFIG + 'drop_refusal_like = true\nrefusal_patterns = ["^I.m sorry"]\n')
    report = write_report(dropping, rows_for(dropping, refusing))
    assert report["refusals"]["patterns"] == ["^I.m sorry"]
    assert report["refusals"]["dropped"] == 2 and report["totals"]["kept"] == 10
    assert report["cells"][0]["dropped"]["refusal_like"] == 1


def test_one_fate_per_row_in_request_order():
    config = parse_config(CONFIG)
    data = rows_for(config, distinct)
    data[3] = data[3]._replace(finish_reason="content_filter")
    fates = [(row.request_index, fate.split) for row, fate in row_fates(data, config)]
    assert [i for i, _ in fates] == list(range(12))
    assert dict(fates)[3] == "content_filter" and {s for i, s in fates if i != 3} == {"train"}
    # Old-style tuples still work: positions stand in for request indices.
    old = [("ok", "stop", "An answer.", "x"), ("failed", None, None, "y")]
    assert [(r.request_index, f.split) for r, f in row_fates(old, config)] == [(0, "train"), (1, "failed")]


def test_a_refusal_pattern_that_is_not_a_regex_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dataset.refusal_patterns: .*not a regular expression"):
        parse_config(CONFIG + 'refusal_patterns = ["(unclosed"]\n')


def test_the_new_keys_at_their_defaults_keep_an_old_sweeps_fingerprint():
    config = parse_config(CONFIG)
    body = {k: v for k, v in config.snapshot().items() if k not in ("name", "eval")}  # eval: None = no [eval]
    body["model"] = {k: v for k, v in body["model"].items() if k not in RUN_OPTIONS}
    body["dataset"] = {k: v for k, v in body["dataset"].items() if k not in REPORT_OPTIONS}
    old = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert config.fingerprint == old
    assert parse_config(CONFIG + "drop_near_duplicates = true\n").fingerprint != old


def test_finalize_stores_the_report_in_the_database_and_beside_train_jsonl(tmp_path):
    from gridtune.settings import Settings
    from models import store
    from producer.summary import after_sweep
    from tests.unit.test_finetune_helpers import make_sweep
    from worker.context import WorkerContext

    ctx = WorkerContext(Settings(DATABASE_URL=f"sqlite:///{tmp_path}/s.db", GRIDTUNE_DATA_DIR=str(tmp_path / "d")))
    sweep, dataset_id = make_sweep(ctx, "rep")
    dataset = store.latest_dataset(ctx.engine, sweep.id)
    assert dataset.id == dataset_id and dataset.report is not None
    on_disk = json.loads((tmp_path / "d" / "rep" / "report.json").read_text())
    assert on_disk == dataset.report
    assert dataset.report["totals"]["requests"] == sweep.total_requests
    assert dataset.report["totals"]["train"] == dataset.train_examples
    assert f"report    {tmp_path.resolve() / 'd' / 'rep' / 'report.json'}" in "\n".join(after_sweep(ctx.engine, "rep"))


def test_the_report_is_stored_as_json_on_postgres_too(postgres_db, tmp_path):
    # The column gets report.json's own text (RawJSON): it must read back as the same document.
    from gridtune.settings import Settings
    from models import store
    from tests.unit.test_finetune_helpers import make_sweep
    from worker.context import WorkerContext

    ctx = WorkerContext(Settings(DATABASE_URL=postgres_db, GRIDTUNE_DATA_DIR=str(tmp_path / "d")))
    sweep, _ = make_sweep(ctx, "pg")
    dataset = store.latest_dataset(ctx.engine, sweep.id)
    assert dataset.report == json.loads((tmp_path / "d" / "pg" / "report.json").read_text())
    assert dataset.report["totals"]["requests"] == sweep.total_requests
