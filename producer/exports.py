"""`export`: a sweep's rows as CSV, JSONL, Parquet or a Hugging Face `datasets` folder.

Two sets: every row (one per request, with its fate in `split`), and the training set itself
(train and validation after filtering and split, as the finalizer wrote them). Each row's fate
comes from `worker.dataset.row_fates`, the finalizer's own decision, so `split` here always
matches train.jsonl. Parquet is written by pyarrow, the `datasets` folder by `datasets`
(`Dataset.save_to_disk`, read back with `datasets.load_from_disk`).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from gridtune.errors import UserError

# Parquet / datasets columns after the grid's dimensions (all rows); the training set adds
# `messages` (the chat example trained on) and keeps only train and validation rows.
ROW_COLUMNS = ("request_index", "repeat", "prompt", "input", "response", "finish_reason", "prompt_tokens",
               "completion_tokens", "cost_usd", "split", "near_duplicate_of", "refusal_like")
# Rows per Parquet row group: memory stays bounded however many rows the sweep has.
BATCH_ROWS = 10_000


@contextmanager
def open_out(path: str):
    try:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            yield handle
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def export_rows_text(engine, sweep, config, csv_path: str | None, jsonl_path: str | None, legacy: bool) -> None:
    """--csv (the tutorial's columns, one row per request) and --jsonl (a chat line per whole ok answer)."""
    from models import RowState, store
    from worker.dataset import chat_example, incomplete_reason, legacy_example

    written = lines = 0
    with ExitStack() as stack:
        csv_writer = jsonl = None
        if csv_path:
            handle = stack.enter_context(open_out(csv_path))
            # The tutorial's columns, with this sweep's dimensions in place of age/gender/power.
            columns = list(config.dimensions) + ["prompt", "sub_prompt", "response_txt", "finish_reason", "state",
                                                 "error"]
            csv_writer = csv.writer(handle)
            csv_writer.writerow(columns)
        if jsonl_path:
            jsonl = stack.enter_context(open_out(jsonl_path))
        for row in store.iter_rows(engine, sweep.id):
            if csv_writer:
                csv_writer.writerow([row.params.get(n) for n in config.dimensions] + [
                    row.prompt, row.input_text, row.response_text or "", row.finish_reason or "",
                    row.state, row.error or ""])
            # Whole answers only: an incomplete one (truncated, filtered) is never a training line.
            if (jsonl and row.state == RowState.OK and row.response_text
                    and not incomplete_reason(row.finish_reason)):
                example = (legacy_example(row.input_text, row.response_text) if legacy
                           else chat_example(config, row.input_text, row.response_text))
                jsonl.write(json.dumps(example, ensure_ascii=False) + "\n")
                lines += 1
            written += 1
    if csv_path:
        print(f"exported {written:,} rows of {sweep.name} to {csv_path}", file=sys.stderr)
    if jsonl_path:
        dataset = store.latest_dataset(engine, sweep.id)
        training = (f"the training set has {dataset.train_examples:,} examples: --training-set PATH writes it"
                    if dataset else "no training set yet")
        print(f"exported {lines:,} lines to {jsonl_path}: one per whole ok answer, duplicates included, "
              f"no split ({training})", file=sys.stderr)


def export_training_jsonl(engine, sweep, path: str) -> None:
    """Copy the finalizer's train.jsonl (deduplicated, validated, what is uploaded) to `path`."""
    dataset = _dataset(engine, sweep)
    try:
        data = Path(dataset.train_path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {dataset.train_path}: {exc.strerror}; run the sweep again to rebuild it") from None
    with open_out(path) as handle:
        handle.write(data.decode("utf-8"))
    print(f"exported the training set of {sweep.name} to {path}: {dataset.train_examples:,} examples "
          f"(validation: {dataset.validation_examples:,} in {dataset.validation_path or 'none'})", file=sys.stderr)


def _dataset(engine, sweep):
    from models import store

    dataset = store.latest_dataset(engine, sweep.id)
    if dataset is None:
        raise UserError(f"sweep {sweep.name} has no training set yet (state {sweep.state})")
    return dataset


# --- Parquet and `datasets` -----------------------------------------------------------------------
def require(module: str, what: str):
    """Import an optional library, or one clear line (UserError, exit 2) saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"pyarrow": "pyarrow", "datasets": "datasets"}[module.split(".")[0]]
        extra = "" if package == "pyarrow" else " (or the `local` extra: pip install -e '.[local]')"
        raise UserError(f"{what} needs the `{package}` package: pip install {package}{extra}") from None


def _dimension_type(pa, values: list[Any]):
    """One Arrow type for a dimension's values: bool, int64, float64 or (mixed) string."""
    kinds = {type(v) for v in values}
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def _schema(pa, config, training: bool):
    dims = list(config.dimensions)
    columns = ROW_COLUMNS + (("messages",) if training else ())
    if clash := sorted(set(dims) & set(columns)):
        raise UserError(f"dimension {clash[0]!r} has the name of an export column; rename the dimension "
                        "to export as Parquet or a datasets folder")
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    types = {"request_index": pa.int64(), "repeat": pa.int64(), "prompt_tokens": pa.int64(),
             "completion_tokens": pa.int64(), "cost_usd": pa.float64(), "near_duplicate_of": pa.int64(),
             "refusal_like": pa.bool_(), "messages": pa.list_(message)}
    fields = [(d, _dimension_type(pa, config.dimensions[d])) for d in dims]
    fields += [(c, types.get(c, pa.string())) for c in columns]
    return pa.schema(fields)


def _value(kind, value: Any) -> Any:
    """A dimension value in its column's type (mixed dimensions are strings, as written)."""
    import pyarrow as pa

    if value is None:
        return None
    if kind == pa.string():
        return value if isinstance(value, str) else json.dumps(value)
    if kind == pa.float64():
        return float(value)
    return value


def fated_records(engine, sweep, config, training: bool) -> Iterator[dict[str, Any]]:
    """Export records in request order: every row with its fate, or (training) train/validation only."""
    from models import store
    from worker.dataset import TRAIN, VALIDATION, dataset_row, row_fates

    stored: dict[int, Any] = {}

    def feed():
        for generation in store.iter_rows(engine, sweep.id):
            row = dataset_row(generation)
            stored[row.request_index] = generation  # the one row in flight: its prompt is not in DatasetRow
            yield row

    for row, fate in row_fates(feed(), config):
        generation = stored.pop(row.request_index)
        if training and fate.split not in (TRAIN, VALIDATION):
            continue
        record = dict(row.params or {})
        record.update(request_index=row.request_index, repeat=row.repeat, prompt=generation.prompt,
                      input=row.input_text, response=row.response, finish_reason=row.finish_reason,
                      prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                      cost_usd=row.cost_usd, split=fate.split,
                      near_duplicate_of=fate.near[0] if fate.near else None, refusal_like=fate.refusal_like)
        if training:
            record["messages"] = fate.example["messages"]
        yield record


def write_parquet(engine, sweep, config, path: str | Path, training: bool) -> dict[str, int]:
    """Stream the records into a Parquet file (pyarrow), BATCH_ROWS per row group; counts by split."""
    pa = require("pyarrow", "--parquet")
    pq = require("pyarrow.parquet", "--parquet")
    schema = _schema(pa, config, training)
    dims = {d: schema.field(d).type for d in config.dimensions}
    counts: dict[str, int] = {}
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        writer = pq.ParquetWriter(tmp, schema)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    batch: list[dict[str, Any]] = []
    try:
        with writer:
            for record in fated_records(engine, sweep, config, training):
                for d, kind in dims.items():
                    record[d] = _value(kind, record.get(d))
                counts[record["split"]] = counts.get(record["split"], 0) + 1
                batch.append(record)
                if len(batch) == BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch or not counts:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counts


def write_hf_dataset(engine, sweep, config, directory: str | Path, training: bool) -> dict[str, int]:
    """A `datasets` folder (save_to_disk): one Dataset of every row, or (training) a DatasetDict
    with "train" and "validation" (when it has rows). Written through a temporary Parquet file."""
    datasets = require("datasets", "--hf-dataset" if not training else "--training-set-hf-dataset")
    datasets.disable_progress_bars()  # one summary line per export, as for the other formats
    pq = require("pyarrow.parquet", "--hf-dataset")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{directory} exists and is not an empty folder: name a new one")
    with tempfile.TemporaryDirectory(prefix="gridtune-export-") as tmp:
        parquet = Path(tmp) / "rows.parquet"
        counts = write_parquet(engine, sweep, config, parquet, training)
        table = pq.read_table(parquet, memory_map=True)
        if training:
            import pyarrow.compute as pc

            parts = {name: datasets.Dataset(table.filter(pc.equal(table["split"], name)))
                     for name in ("train", "validation") if counts.get(name)}
            data = datasets.DatasetDict(parts)
        else:
            data = datasets.Dataset(table)
        try:
            data.save_to_disk(str(target))
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise UserError(f"cannot write {directory}: {exc.strerror or exc}") from None
    return counts


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {split}" for split, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no rows"


def export_tables(engine, sweep, config, *, parquet: str | None = None, hf_dataset: str | None = None,
                  training_parquet: str | None = None, training_hf_dataset: str | None = None) -> None:
    """--parquet / --hf-dataset (every row) and the --training-set-* variants (train + validation)."""
    if training_parquet or training_hf_dataset:
        dataset = _dataset(engine, sweep)
    for path, training, kind in ((parquet, False, "parquet"), (hf_dataset, False, "hf"),
                                 (training_parquet, True, "parquet"), (training_hf_dataset, True, "hf")):
        if not path:
            continue
        write = write_parquet if kind == "parquet" else write_hf_dataset
        counts = write(engine, sweep, config, path, training)
        what = "the training set" if training else "every row"
        print(f"exported {what} of {sweep.name} to {path} ({'Parquet' if kind == 'parquet' else 'a datasets folder'}): "
              f"{describe_counts(counts)}", file=sys.stderr)
        if training and counts.get("train", 0) != dataset.train_examples:
            print(f"gridtune: note: the finalizer wrote {dataset.train_examples:,} training examples but this "
                  f"config now selects {counts.get('train', 0):,} (was the config replaced since?)", file=sys.stderr)
