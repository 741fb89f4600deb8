"""`export --parquet / --hf-dataset` and their --training-set-* variants, loaded back as people load them
(pandas/pyarrow, `datasets.load_from_disk`)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.unit.test_cli_errors import error_line, run_main

CONFIG = """
repeats = 3
[dimensions]
age = [18, 30]
gender = ["man", "woman"]
power = ["flight", "strength"]
[templates]
prompt = "Describe a {age}-year-old {gender} who has {power}."
input = "{age}, {gender}, {power}"
system = "You write hero descriptions."
[dataset]
validation_fraction = 0.25
min_examples = 4
[finetune]
backend = "none"
"""


@pytest.fixture
def finalized(tmp_path, monkeypatch):
    """A finalized sweep of 24 requests: one failed, one truncated, one exact duplicate; (engine, sweep)."""
    from gridtune.settings import Settings, reset_settings
    from gridtune.sweep import parse_config, request_at
    from models import RowState, store
    from worker.context import WorkerContext
    from worker.dataset import finalize_sweep

    db = f"sqlite:///{tmp_path / 'g.db'}"
    monkeypatch.setenv("DATABASE_URL", db)
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    ctx = WorkerContext(Settings(DATABASE_URL=db, GRIDTUNE_DATA_DIR=str(tmp_path / "data")))
    config = parse_config(CONFIG)
    sweep, _ = store.create_or_resume_sweep(ctx.engine, "heroes", config)
    for index in range(config.total_requests):
        request = request_at(config, index)
        row = dict(sweep_id=sweep.id, request_index=index, repeat=request.repeat, params=request.params,
                   prompt=request.prompt, input_text=request.input_text, state=RowState.OK,
                   response_text=f"Hero {index}: a {request.params['age']}-year-old who can {request.params['power']}.",
                   finish_reason="stop", prompt_tokens=12, completion_tokens=30, cost_usd=0.0001)
        if index == 1:
            row.update(state=RowState.FAILED, response_text=None, finish_reason=None, error="boom",
                       prompt_tokens=None, completion_tokens=None, cost_usd=None)
        elif index == 2:
            row.update(finish_reason="length")
        elif index == 4:
            row.update(response_text=f"Hero 3: a {request.params['age']}-year-old who can {request.params['power']}.")
        store.insert_generation(ctx.engine, row)
    assert finalize_sweep(ctx, sweep.id).dataset_id is not None
    return ctx.engine, store.get_sweep(ctx.engine, "heroes")


def test_parquet_of_every_row_loads_with_pandas_and_pyarrow(finalized, tmp_path, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    from models import store

    out = tmp_path / "rows.parquet"
    code, err = run_main(["export", "heroes", "--parquet", str(out)], capsys)
    assert code == 0, err
    assert f"exported every row of heroes to {out} (Parquet)" in err
    frame = pd.read_parquet(out)
    assert len(frame) == 24
    assert list(frame.columns[:3]) == ["age", "gender", "power"]
    assert {"prompt", "input", "response", "finish_reason", "prompt_tokens", "completion_tokens",
            "split"} <= set(frame.columns)
    assert pq.read_schema(out).field("age").type == "int64"
    by_index = frame.set_index("request_index")
    assert by_index.loc[1, "split"] == "failed" and by_index.loc[2, "split"] == "truncated"
    assert by_index.loc[4, "split"] == "duplicates"
    assert by_index.loc[0, "age"] == 18 and by_index.loc[0, "input"] == "18, man, flight"
    assert by_index.loc[0, "prompt"] == "Describe a 18-year-old man who has flight."
    dataset = store.latest_dataset(finalized[0], finalized[1].id)
    # The same fates as the finalizer's: the split column counts what train.jsonl holds.
    assert (frame["split"] == "train").sum() == dataset.train_examples
    assert (frame["split"] == "validation").sum() == dataset.validation_examples


def test_hf_dataset_of_every_row_and_the_training_set_load_from_disk(finalized, tmp_path, capsys):
    import datasets
    import pandas as pd

    from models import store

    code, err = run_main(["export", "heroes", "--hf-dataset", str(tmp_path / "rows"),
                          "--training-set-hf-dataset", str(tmp_path / "train"),
                          "--training-set-parquet", str(tmp_path / "train.parquet")], capsys)
    assert code == 0, err
    rows = datasets.load_from_disk(str(tmp_path / "rows"))
    assert rows.num_rows == 24 and {"age", "gender", "power", "response", "split"} <= set(rows.column_names)
    assert rows[1]["split"] == "failed" and rows[0]["gender"] == "man"
    training = datasets.load_from_disk(str(tmp_path / "train"))
    dataset = store.latest_dataset(finalized[0], finalized[1].id)
    assert training["train"].num_rows == dataset.train_examples
    assert training["validation"].num_rows == dataset.validation_examples
    # The training set itself: the same examples as train.jsonl, in the same order.
    lines = [json.loads(line) for line in open(dataset.train_path, encoding="utf-8")]
    assert [row["messages"] for row in training["train"]] == [line["messages"] for line in lines]
    assert set(training["train"]["split"]) == {"train"}
    frame = pd.read_parquet(tmp_path / "train.parquet")
    assert len(frame) == dataset.train_examples + dataset.validation_examples
    assert set(frame["split"]) == {"train", "validation"}


def test_a_missing_library_is_one_line_and_exit_2(finalized, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    code, err = run_main(["export", "heroes", "--hf-dataset", str(tmp_path / "rows")], capsys)
    assert code == 2 and "needs the `datasets` package" in error_line(err)


def test_training_set_exports_need_a_finalized_dataset(tmp_path, capsys, monkeypatch):
    from gridtune.settings import reset_settings
    from gridtune.sweep import parse_config
    from models import get_engine, store

    db = f"sqlite:///{tmp_path / 'g.db'}"
    monkeypatch.setenv("DATABASE_URL", db)
    reset_settings()
    store.create_or_resume_sweep(get_engine(db), "fresh", parse_config(CONFIG))
    code, err = run_main(["export", "fresh", "--training-set-parquet", str(tmp_path / "t.parquet")], capsys)
    assert code == 2 and "has no training set yet" in error_line(err)
