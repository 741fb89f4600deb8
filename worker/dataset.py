"""The finalizer's work: stored rows -> a validated chat-format training set (and validation set).

Reads the database, never the chord's results. Streams rows, so 100k rows need little memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from gridtune.backend_rules import min_usable_examples
from gridtune.sweep import SweepConfig, heldout_source
from models import RowState, SweepState, session_scope, store
from models.db import RawJSON
from models.schema import Dataset
from worker.context import WorkerContext
from worker.tokens import count_messages, encoding_name

log = logging.getLogger(__name__)

KNOWN_ROLES = {"system", "user", "assistant", "function"}
KNOWN_MESSAGE_KEYS = {"role", "content", "name", "function_call", "weight"}
LEGACY_SEPARATOR = " ->"
LEGACY_STOP = " END"
# The one finish reason that means the answer is whole. Everything else (length, content_filter,
# tool_calls, any value a gateway invents) is an incomplete answer and never becomes training data.
# A missing finish_reason (some compatible servers send none) is taken as whole: nothing says otherwise.
COMPLETE_FINISH_REASONS = frozenset({"stop"})


def incomplete_reason(finish_reason: str | None) -> str | None:
    """The `dropped` key for an answer that is not whole, or None when it is.

    "length" -> "truncated", "content_filter" -> "content_filter", any other value v ->
    "finish_reason=v"; "stop" and None -> None.
    """
    if finish_reason is None or finish_reason in COMPLETE_FINISH_REASONS:
        return None
    if finish_reason == "length":
        return "truncated"
    if finish_reason == "content_filter":
        return "content_filter"
    return f"finish_reason={finish_reason}"


def validate_example(example: Any) -> list[str]:
    """The fine-tuning format checks for one chat example; an empty list means valid."""
    if not isinstance(example, dict):
        return ["not a JSON object"]
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["`messages` must be a non-empty list"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"message {i} is not an object")
            continue
        if unknown := set(message) - KNOWN_MESSAGE_KEYS:
            problems.append(f"message {i} has unknown keys {sorted(unknown)}")
        if message.get("role") not in KNOWN_ROLES:
            problems.append(f"message {i} has unknown role {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"message {i} has empty or non-string content")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant message")
    return problems


# --- the training format: one definition for the uploaded file, `ask` and any evaluation -------
# The file that is uploaded (and trained on locally) is always the chat-format train.jsonl; the
# optional legacy.jsonl is an export for other tools and is never trained on by gridtune. So the
# tuned model has seen exactly `prompt_messages(...)` followed by its answer, with no separator
# and no stop word; whoever samples it must send the same.


def prompt_messages(config: SweepConfig, input_text: str) -> list[dict[str, str]]:
    """The turns a training example shows before the answer: [system?, user(input_text)]."""
    messages = []
    if config.templates.system:
        messages.append({"role": "system", "content": config.templates.system})
    messages.append({"role": "user", "content": input_text})
    return messages


def prompt_stop(config: SweepConfig) -> list[str] | None:
    """Stop sequences for sampling the tuned model: none, since chat examples end with the answer."""
    return None


def chat_example(config: SweepConfig, input_text: str, response: str) -> dict[str, Any]:
    """One training line: prompt_messages + the assistant's answer."""
    return {"messages": prompt_messages(config, input_text) + [{"role": "assistant", "content": response}]}


def legacy_example(input_text: str, response: str) -> dict[str, str]:
    """The tutorial's prompt/completion form: separator ' ->', leading space, stop word ' END'.

    An export for tools that train on prompt/completion pairs; gridtune itself never uploads it.
    """
    return {"prompt": input_text + LEGACY_SEPARATOR, "completion": " " + response.strip() + LEGACY_STOP}


def in_validation(seed: int, fraction: float, input_text: str, response: str) -> bool:
    """Deterministic split: the same example always lands on the same side."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{input_text}\x00{response}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class DatasetRow(NamedTuple):
    """One stored row as the finalizer and the exports see it.

    The first four (five) fields are the old row tuple, so tests may still pass
    (state, finish_reason, response, input_text[, refusal]); the rest feed the report (cell,
    tokens, cost in USD) and the held-out rule (params, repeat).
    """

    state: str
    finish_reason: str | None
    response: str | None
    input_text: str
    refusal: str | None = None
    params: dict[str, Any] | None = None
    repeat: int = 0
    request_index: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None


# A row's fate (`Fate.split`): one of these, or the reason it was dropped (see row_fates).
TRAIN, VALIDATION, HELDOUT, FAILED = "train", "validation", "heldout", "failed"


def is_heldout(config: SweepConfig, params: dict[str, Any], repeat: int) -> bool:
    """Whether the request (params, repeat) is held out of training for evaluation.

    [eval]'s rule: `gridtune.sweep.heldout_source` (a pure function of config, params, repeat).
    """
    return heldout_source(config, params, repeat) is not None


@dataclass(frozen=True)
class Fate:
    """What becomes of one row.

    split: TRAIN, VALIDATION, HELDOUT, FAILED, or the dropped reason ("truncated",
    "content_filter", "finish_reason=<v>", "refused", "duplicates", "refusal_like",
    "near_duplicates", "invalid", "too_long"). example/tokens: the chat example and its token
    count when it is written (train/validation). whole: the answer is usable (not failed,
    incomplete or refused). near: (earlier request index, estimated similarity) when the answer
    is a near-duplicate of an earlier one, dropped or not. refusal_like: the answer matched a
    [dataset] refusal_patterns entry, dropped or not.
    """

    split: str
    example: dict[str, Any] | None = None
    tokens: int = 0
    whole: bool = False
    near: tuple[int, float] | None = None
    refusal_like: bool = False


def as_row(row: DatasetRow | tuple, position: int) -> DatasetRow:
    """A DatasetRow from a row or an old-style tuple; request_index defaults to the position."""
    row = row if isinstance(row, DatasetRow) else DatasetRow(*row)
    return row if row.request_index is not None else row._replace(request_index=position)


def row_fates(rows: Iterable[DatasetRow | tuple], config: SweepConfig) -> Iterator[tuple[DatasetRow, Fate]]:
    """The one decision of each row's fate, in order, used by the finalizer and the exports.

    Rows must come in the same order each time (request order) for the same result: duplicates
    keep the first. Order of checks: failed -> incomplete -> provider refusal -> held out ->
    exact duplicate (same input and answer) -> refusal-like -> near-duplicate -> invalid ->
    too long -> validation or train (`in_validation`). Refusal-like and near-duplicate answers are
    only dropped when [dataset] drop_refusal_like / drop_near_duplicates say so. Streams: what it
    keeps per row is a 20-byte key and the near-duplicate index (see worker/dataset_report.py).
    """
    from worker.dataset_report import NearDuplicates, RefusalPatterns

    settings = config.dataset
    encoding = encoding_name(config.finetune.base_model)
    limit = config.finetune.max_example_tokens
    refusals = RefusalPatterns(settings.refusal_patterns)
    near_index = NearDuplicates(settings.near_duplicate_threshold)
    seen: set[bytes] = set()
    for position, raw in enumerate(rows):
        row = as_row(raw, position)
        response = row.response
        if row.state != RowState.OK or not response:
            yield row, Fate(FAILED)
            continue
        if why := incomplete_reason(row.finish_reason):
            yield row, Fate(why)
            continue
        if row.refusal:
            yield row, Fate("refused")
            continue
        if is_heldout(config, row.params or {}, row.repeat):
            yield row, Fate(HELDOUT, whole=True)
            continue
        key = hashlib.sha1(f"{row.input_text}\x00{response}".encode()).digest()
        if key in seen:
            yield row, Fate("duplicates", whole=True)
            continue
        seen.add(key)
        refusal_like = refusals.match(response)
        if refusal_like and settings.drop_refusal_like:
            yield row, Fate("refusal_like", whole=True, refusal_like=True)
            continue
        near = near_index.check(row.request_index, response)
        if near and settings.drop_near_duplicates:
            yield row, Fate("near_duplicates", whole=True, near=near, refusal_like=refusal_like)
            continue
        example = chat_example(config, row.input_text, response)
        if validate_example(example):
            yield row, Fate("invalid", whole=True, near=near, refusal_like=refusal_like)
            continue
        tokens = count_messages(example["messages"], encoding)
        if tokens > limit:
            yield row, Fate("too_long", whole=True, near=near, refusal_like=refusal_like)
            continue
        split = VALIDATION if in_validation(settings.split_seed, settings.validation_fraction,
                                            row.input_text, response) else TRAIN
        yield row, Fate(split, example, tokens, True, near, refusal_like)


@dataclass
class Split:
    path: Path
    examples: int = 0
    tokens: int = 0
    sha256: str = ""


@dataclass
class DatasetSummary:
    train: Split
    validation: Split | None
    legacy_path: Path | None
    dropped: dict[str, int] = field(default_factory=dict)
    encoding: str = "o200k_base"
    inputs: int = 0  # distinct inputs with a whole answer
    identical_inputs: int = 0  # of those, inputs answered more than once, always with the same text
    report_path: Path | None = None  # report.json: the dataset report (worker/dataset_report.py)
    report_head: dict[str, Any] | None = None  # the report without its cells (for summaries)

    @property
    def report(self) -> dict[str, Any] | None:
        """The whole report, read from report.json (it can be large: a cell per grid combination)."""
        return json.loads(self.report_path.read_text(encoding="utf-8")) if self.report_path else None


class _Writer:
    """Writes JSON lines to `path` atomically (a temp file renamed on success) and hashes them."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_suffix(path.suffix + ".tmp")
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.hash = hashlib.sha256()

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        self.file.write(line)
        self.hash.update(line.encode())

    def commit(self) -> str:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.hash.hexdigest()

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


# Dropped reasons always present in DatasetSummary.dropped (others appear when they occur).
BASE_DROPPED = ("failed", "truncated", "duplicates", "too_long", "invalid")


def write_dataset(rows: Iterable[DatasetRow | tuple], config: SweepConfig, out_dir: Path) -> DatasetSummary:
    """Writes train/validation(/legacy) JSONL and report.json; returns what went where and why.

    rows: DatasetRow, or tuples (state, finish_reason, response_text, input_text[, refusal, ...])
    in the DatasetRow field order. Each row's fate is `row_fates`'s: dropped ones are counted by
    reason (failed rows under "failed"); held-out ones are counted in the report only.
    `identical_inputs` counts inputs answered more than once, always with the same text.
    """
    from worker.dataset_report import ReportBuilder

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = config.dataset
    encoding = encoding_name(config.finetune.base_model)
    dropped: dict[str, int] = dict.fromkeys(BASE_DROPPED, 0)
    # input -> (its one answer so far, None once answers differ; how many usable answers)
    answers: dict[str, tuple[bytes | None, int]] = {}
    report = ReportBuilder(config)
    train = Split(out_dir / "train.jsonl")
    validation = Split(out_dir / "validation.jsonl") if settings.validation_fraction > 0 else None
    writers = {TRAIN: _Writer(train.path)}
    if validation:
        writers[VALIDATION] = _Writer(validation.path)
    legacy = _Writer(out_dir / "legacy.jsonl") if settings.legacy_format else None
    try:
        for row, fate in row_fates(rows, config):
            report.add(row, fate)
            if fate.whole:
                answer = hashlib.sha1(row.response.encode()).digest()
                first, count = answers.get(row.input_text, (answer, 0))
                answers[row.input_text] = (first if first == answer else None, count + 1)
            if fate.split not in (TRAIN, VALIDATION, HELDOUT):
                dropped[fate.split] = dropped.get(fate.split, 0) + 1
                continue
            if fate.split == HELDOUT:
                dropped[HELDOUT] = dropped.get(HELDOUT, 0) + 1  # recorded with the dataset; `eval` asks them
                continue
            split = train if fate.split == TRAIN else validation
            writers[fate.split].write(fate.example)
            split.examples += 1
            split.tokens += fate.tokens
            if legacy:
                legacy.write(legacy_example(row.input_text, row.response))
        train.sha256 = writers[TRAIN].commit()
        if validation:
            if validation.examples:
                validation.sha256 = writers[VALIDATION].commit()
            else:
                writers[VALIDATION].discard()
                validation = None
        legacy_path = None
        if legacy:
            legacy.commit()
            legacy_path = legacy.path
    except BaseException:
        for writer in writers.values():
            writer.discard()
        if legacy:
            legacy.discard()
        raise
    report_path = out_dir / "report.json"
    head = report.write(report_path)
    repeated = sum(1 for answer, count in answers.values() if answer is not None and count > 1)
    return DatasetSummary(train, validation, legacy_path, dropped, encoding,
                          inputs=len(answers), identical_inputs=repeated, report_path=report_path, report_head=head)


def likely_causes(dropped: dict[str, int], inputs: int | None, identical_inputs: int | None,
                  kept: int = 0) -> list[str]:
    """What the drop counts say about the sweep, each with its likely cause (for summaries).

    dropped: the finalizer's counts; inputs / identical_inputs: see DatasetSummary; kept: the
    examples written (train + validation). Notes: most inputs answered identically on every repeat,
    most answers truncated, and any other incomplete answers.
    """
    causes = []
    answered = sum(n for why, n in dropped.items() if why != "failed") + kept
    if identical_inputs and inputs and identical_inputs * 2 > inputs:
        causes.append(f"{identical_inputs} of {inputs} inputs got the same answer on every repeat: the server "
                      "probably ignores temperature/top_p/seed (some need a field of their own to sample: "
                      "set it under [model.extra_body])")
    truncated = dropped.get("truncated", 0)
    if truncated and truncated * 2 > answered:
        causes.append(f"{truncated} answers were cut at [model] max_output_tokens: raise it")
    incomplete = {why: n for why, n in dropped.items() if n and (why == "content_filter" or why.startswith("finish_reason="))}
    if incomplete:
        causes.append("incomplete answers left out: " + ", ".join(f"{n} {why}" for why, n in incomplete.items()))
    return causes


@dataclass(frozen=True)
class FinalizeResult:
    state: str
    dataset_id: int | None = None
    message: str = ""


def dataset_row(row: Any) -> DatasetRow:
    """A stored Generation as a DatasetRow."""
    return DatasetRow(row.state, row.finish_reason, row.response_text, row.input_text, row.refusal, row.params,
                      row.repeat, row.request_index, row.prompt_tokens, row.completion_tokens, row.cost_usd)


def _rows(ctx: WorkerContext, sweep_id: int) -> Iterator[DatasetRow]:
    for row in store.iter_rows(ctx.engine, sweep_id):
        yield dataset_row(row)


def finalize_sweep(ctx: WorkerContext, sweep_id: int) -> FinalizeResult:
    engine = ctx.engine
    sweep = store.get_sweep_by_id(engine, sweep_id)
    counts = store.sweep_counts(engine, sweep)
    if counts.missing:
        # A chord from an interrupted enqueue cannot complete; one that did means rows are
        # still missing (the broker lost tasks). `sweep` again resumes and finalizes.
        log.warning("sweep %s: %d requests have no row yet; not finalizing", sweep.name, counts.missing)
        return FinalizeResult("incomplete", message=f"{counts.missing} requests have no row")
    if not store.claim_finalizer(engine, sweep_id):
        log.info("sweep %s: already finalized (state %s)", sweep.name, sweep.state)
        return FinalizeResult("already_finalized")
    config = store.sweep_config(sweep)
    out_dir = ctx.settings.data_dir / sweep.name
    summary = write_dataset(_rows(ctx, sweep_id), config, out_dir)
    dropped = ", ".join(f"{n} {why}" for why, n in summary.dropped.items() if n) or "none"
    needed = min_usable_examples(config)
    if summary.train.examples < needed:
        message = (
            f"only {summary.train.examples} usable training examples (at least {needed} needed"
            f"{'' if needed == config.dataset.min_examples else f' by the {config.finetune.backend} backend'}); "
            f"dropped: {dropped}"
        )
        kept = summary.train.examples + (summary.validation.examples if summary.validation else 0)
        if causes := likely_causes(summary.dropped, summary.inputs, summary.identical_inputs, kept):
            message += "; " + "; ".join(causes)
        if sweep.stop_reason:
            message += f"; the sweep was stopped: {sweep.stop_reason}"
        store.set_sweep_state(engine, sweep_id, SweepState.FAILED, message)
        log.error("sweep %s: %s", sweep.name, message)
        return FinalizeResult(SweepState.FAILED, message=message)
    with session_scope(engine) as session:
        dataset = Dataset(
            sweep_id=sweep_id,
            train_path=str(summary.train.path.resolve()),
            validation_path=str(summary.validation.path.resolve()) if summary.validation else None,
            legacy_path=str(summary.legacy_path.resolve()) if summary.legacy_path else None,
            train_examples=summary.train.examples,
            validation_examples=summary.validation.examples if summary.validation else 0,
            train_tokens=summary.train.tokens,
            validation_tokens=summary.validation.tokens if summary.validation else 0,
            train_sha256=summary.train.sha256,
            validation_sha256=summary.validation.sha256 if summary.validation else None,
            dropped=summary.dropped,
            encoding=summary.encoding,
            inputs=summary.inputs,
            identical_inputs=summary.identical_inputs,
            # The file's own text: the report is not rebuilt as Python objects (one per cell).
            report=RawJSON(summary.report_path.read_text(encoding="utf-8")),
        )
        session.add(dataset)
        session.flush()
        dataset_id = dataset.id
    store.set_sweep_state(engine, sweep_id, SweepState.DATASET_READY)
    from worker.dataset_report import digest

    log.info(
        "sweep %s: dataset ready: %d train / %d validation examples, %d tokens; dropped: %s%s",
        sweep.name, summary.train.examples, dataset.validation_examples, summary.train.tokens, dropped,
        f"; {note}" if (note := digest(summary.report_head)) else "",
    )
    return FinalizeResult(SweepState.DATASET_READY, dataset_id=dataset_id)
